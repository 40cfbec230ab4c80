"""Gradient-conflict diagnostics: the user's fork's conflict ratio (`TRAIN.ENABLE_CONFLICT_RATIO`)
plus pairwise cosines, for any method (docs/methods.md §5).

Every `config.conflict.every_steps` steps the trainer evaluates, on that step's batch and
parameters before the update (train mode, the step's RNG key), the per-task gradients g_t of
l_t = w_t L_t on the shared trainable parameters (`Method.owner`: not a head, not a task's own
LoRA). With the Gram matrix G[s, t] = g_s . g_t, G_sum = sum_t g_t and o_t = G_sum - g_t (the other
tasks' summed gradient):

  ratio_t = sqrt(max(0, |g_t|^2 - (g_t . o_t)^2 / |o_t|^2) / |g_t|^2)    (|sin angle(g_t, o_t)|,
            0 if |g_t|^2 or |o_t|^2 <= 1e-12)
  cr      = mean_t ratio_t                                                (the fork's CR)
  cos_st  = G[s, t] / sqrt(G[s, s] G[t, t])

One jitted function: one forward, T vmapped backward passes, everything else on the T x T Gram
matrix. Written to metrics.jsonl / TensorBoard as conflict/cr, conflict/ratio/<task> and
conflict/cos/<s>_<t>; at the end of training `WORKDIR/conflict_ratio.txt` in the fork's format
(one `epoch=E, batch=I, global_step=K, cr=X.XXXXXX` line per measurement, then
`global_average_cr: X.XXXXXX`), generated from metrics.jsonl so that a resumed run writes the
same file.
"""

import itertools

from etils import epath
import jax
import jax.numpy as jnp

from mtl_jax import reporting
from mtl_jax.methods import pcgrad

EPS = 1e-12
FILE = 'conflict_ratio.txt'


def conflict_scalars(g: jax.Array, tasks: tuple[str, ...]) -> dict[str, jax.Array]:
  """conflict/cr, conflict/ratio/<task>, conflict/cos/<s>_<t> from the Gram matrix `g` (T, T)."""
  sq = jnp.diag(g)
  total = jnp.sum(g)
  dot = jnp.sum(g, axis=1) - sq  # g_t . o_t
  others = total - 2 * jnp.sum(g, axis=1) + sq  # |o_t|^2 = |G_sum|^2 - 2 g_t . G_sum + |g_t|^2
  proj = dot ** 2 / (others + EPS)
  ratio = jnp.sqrt(jnp.maximum(sq - proj, 0.0) / (sq + EPS))
  ratio = jnp.where((sq <= EPS) | (others <= EPS), 0.0, ratio)
  out = {'conflict/cr': jnp.mean(ratio)}
  out.update({f'conflict/ratio/{t}': ratio[i] for i, t in enumerate(tasks)})
  for (i, s), (j, t) in itertools.combinations(enumerate(tasks), 2):
    out[f'conflict/cos/{s}_{t}'] = g[i, j] / jnp.sqrt(jnp.maximum(sq[i] * sq[j], EPS ** 2))
  return out


def measure(method, state, rest, batch) -> dict[str, jax.Array]:
  """The conflict scalars of `batch` at `state` (module docstring); jitted by the trainer."""
  _, _, grads, _, _, _ = method.task_gradients(state, rest, state.params, batch)
  shared = jax.tree.map(lambda o: o == '', method.owners(state.params))
  return conflict_scalars(pcgrad.gram(grads, shared), method.task_names)


def write_file(workdir, steps_per_epoch: int = 0) -> None:
  """WORKDIR/conflict_ratio.txt from metrics.jsonl (fork format; epoch 0 and batch = step - 1
  when `steps_per_epoch` is 0)."""
  rows = [(m['step'], m['conflict/cr']) for m in reporting.read_metrics(workdir)
          if 'conflict/cr' in m]
  lines = []
  for step, cr in rows:
    epoch, batch = divmod(step - 1, steps_per_epoch) if steps_per_epoch else (0, step - 1)
    lines.append(f'epoch={epoch}, batch={batch}, global_step={step}, cr={cr:.6f}\n')
  if not lines:
    lines.append('# No conflict ratio values were recorded.\n')
  mean = sum(cr for _, cr in rows) / len(rows) if rows else 0.0
  lines.append(f'global_average_cr: {mean:.6f}\n')
  path = epath.Path(workdir) / FILE
  tmp = path.parent / (FILE + '.tmp')
  tmp.write_text(''.join(lines))
  tmp.rename(path)
