"""'taml': task-agnostic meta-learning (Jamal & Qi 2019) as the user's fork computes it
(docs/methods.md §3): MAML (mtl_jax/methods/maml.py) plus the spread of the adapted parameters,

  R = lam * (1/T) sum_t sum_i || theta_t,i' - mean_s theta_s,i' ||^2,

`config.taml.lam`, where i runs over the leaves of theta_t as the fork lines them up: the shared
leaves, and each of task t's own leaves paired with the other tasks' leaf at the same place
(task t's TS-LoRA of a layer with task s's TS-LoRA of that layer); own leaves whose shapes differ
between tasks (heads with different output counts) are left out. As in the fork, R is computed
on stopped-gradient copies: it is logged (as `spread` and inside `loss`) but does not change the
update, which is MAML's. With
`config.taml.in_gradient=True` R is differentiated through the inner steps (second order) and
its gradient is added to the meta-gradient; to first order that gradient is exactly zero (the
deviations from the mean sum to zero), which is why the option differentiates through the inner
update. Logs MAML's scalars plus spread.
"""

import jax
import jax.numpy as jnp

from mtl_jax import methods
from mtl_jax import sharding
from mtl_jax.methods import maml


@methods.register('taml')
class TAML(maml.MAML):
  """MAML + the spread regulariser (module docstring)."""

  keeps_adapted = True  # spread() reads every theta_t'

  def __init__(self, trainer):
    super().__init__(trainer)
    self.lam, self.in_gradient = float(self.config.taml.lam), bool(self.config.taml.in_gradient)

  def spread(self, adapted: dict) -> jax.Array:
    """(1/T) sum_t sum_i ||theta_t,i' - mean_s theta_s,i'||^2 of {task: theta_t'} (module
    docstring: the leaves i)."""
    lined_up = {}  # place (path with the task replaced by '*') -> [theta_t,i' for each task]
    for task, tree in adapted.items():
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        owner = self.owner(path)
        if owner in ('', task):
          parts = sharding.path_str(path).split('/')
          lined_up.setdefault('/'.join('*' if p == task else p for p in parts), []).append(leaf)
    total = 0.0
    for leaves in lined_up.values():
      if len(leaves) == len(adapted) and len({x.shape for x in leaves}) == 1:
        stacked = jnp.stack(leaves)
        total += jnp.sum((stacked - jnp.mean(stacked, axis=0)) ** 2)
    return total / len(adapted)

  def train_step(self, state, rest, batch):
    meta_loss, grads, _, scalars, stats, adapted = self.meta_gradients(state, rest, batch)
    spread = self.spread(jax.lax.stop_gradient(adapted))
    if self.in_gradient and self.lam:
      support, _ = (self.shard_rows(b) for b in maml.split_support_query(batch))
      def regulariser(params):
        def body(carry, task, key):
          k_in, _ = jax.random.split(key)
          theta, _, _ = self.adapt(state, rest, params, support, task, k_in, state.batch_stats,
                                   self.inner_lr)
          return carry, theta
        _, thetas = self.over_tasks(body, None, self.step_key(state))
        return self.lam * self.spread(self.unstack(thetas))
      reg_grads = jax.grad(regulariser)(state.params)
      grads = jax.tree.map(jnp.add, grads, reg_grads)
    state, opt_scalars = self.apply_gradients(state, grads, batch_stats=stats)
    return state, {**scalars, **opt_scalars, 'loss': meta_loss + self.lam * spread,
                   'spread': spread}
