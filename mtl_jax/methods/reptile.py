"""'reptile': Reptile (Nichol et al. 2018) over tasks, as the user's fork runs it
(docs/methods.md §3).

For each task t, from the current theta, `config.maml.inner_steps` plain SGD steps at
`config.maml.inner_lr` on w_t L_t of the **full** batch adapt theta_t (the shared leaves and t's
own) to theta_t'. Then, with lr = the schedule's current learning rate (no optimizer step):

  task t's own leaves:  theta + lr * (theta_t' - theta)
  shared leaves:        theta + lr * mean_t (theta_t' - theta)

The optimizer state is left as it is (a Reptile run has no optimizer step, no clipping, no weight
decay). Logs loss (as the fork: the mean over tasks of w_t L_t at theta_t', one more forward pass
per task), <task>_loss (unweighted, at theta_t'), learning_rate, step_norm (of the update).
The loop over tasks is MAML's (`config.maml.loop`, mtl_jax/methods/maml.py): a `lax.scan` over
task indices by default.
"""

import jax
import jax.numpy as jnp
import optax

from mtl_jax import methods
from mtl_jax.methods import maml


@methods.register('reptile')
class Reptile(maml.MAML):
  """Reptile over tasks (module docstring); reuses MAML's inner loop."""

  def train_step(self, state, rest, batch):
    params, owners, lr = state.params, self.owners(state.params), self.schedule(state.step)

    def body(carry, task, key):
      deltas, stats = carry
      k_in, k_out = jax.random.split(key)
      adapted, _, stats = self.adapt(state, rest, params, batch, task, k_in, stats, self.inner_lr)
      loss, (unweighted, _) = self.loss_of(task)(
          state, rest, jax.lax.stop_gradient(adapted), batch, task, k_out, stats)
      # theta_t' - theta is exactly 0 on the other tasks' own leaves (adapt leaves them as they
      # are), so the sum over tasks holds each task's own delta and the shared deltas' sum.
      deltas = jax.tree.map(lambda s, a, p: s + (a - p), deltas, adapted, params)
      return (deltas, stats), (loss, unweighted)

    init = (jax.tree.map(jnp.zeros_like, params), state.batch_stats)
    (deltas, stats), (losses, unweighted) = self.over_tasks(body, init, self.step_key(state))
    num = len(self.task_names)
    new = jax.tree.map(lambda p, d, o: p + lr * d / num if o == '' else p + lr * d, params,
                       deltas, owners)
    step = jax.tree.map(jnp.subtract, new, params)
    state = state.replace(step=state.step + 1, params=new, batch_stats=stats)
    return state, {'loss': jnp.sum(losses) / num, 'learning_rate': lr,
                   'step_norm': optax.global_norm(step),
                   **{f'{t}_loss': unweighted[k] for k, t in enumerate(self.task_names)}}
