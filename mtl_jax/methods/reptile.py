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
    key, stats, params = self.step_key(state), state.batch_stats, state.params
    owners = self.owners(params)
    lr = self.schedule(state.step)
    shared_delta = jax.tree.map(jnp.zeros_like, params)
    new, losses, per_task = params, [], {}
    for i, task in enumerate(self.task_names):
      k_in, k_out = jax.random.split(jax.random.fold_in(key, i))
      adapted, _, stats = self.adapt(state, rest, params, batch, task, k_in, stats, self.inner_lr)
      loss, (unweighted, _) = self.task_loss(state, rest, jax.lax.stop_gradient(adapted), batch,
                                             task, k_out, stats)
      delta = jax.tree.map(jnp.subtract, adapted, params)
      shared_delta = jax.tree.map(lambda s, d, o: s + d if o == '' else s, shared_delta, delta,
                                  owners)
      new = jax.tree.map(lambda n, d, o, task=task: n + lr * d if o == task else n, new, delta,
                         owners)
      losses.append(loss)
      per_task[task] = unweighted
    num = len(self.task_names)
    new = jax.tree.map(lambda n, s, o: n + lr * s / num if o == '' else n, new, shared_delta,
                       owners)
    step = jax.tree.map(jnp.subtract, new, params)
    state = state.replace(step=state.step + 1, params=new, batch_stats=stats)
    return state, {'loss': sum(losses) / num, 'learning_rate': lr,
                   'step_norm': optax.global_norm(step),
                   **{f'{t}_loss': v for t, v in per_task.items()}}
