"""'uncertainty': homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018), in
LibMTL's form (docs/methods.md §4):

  loss = sum_t [ l_t / (2 exp(s_t)) + s_t / 2 ] + regulariser,     l_t = w_t L_t,

with one learned log variance s_t per task, initialised to `config.uncertainty.init` (LibMTL:
-0.5) and trained by a second instance of the configured optimizer in `state.extra`. For fixed
l_t the optimum is s_t = log l_t, i.e. an effective weight 1 / (2 l_t) whatever w_t is.
Logs loss, <task>_loss, weight/<task> = 1 / (2 exp(s_t)), grad_norm, learning_rate.
"""

import jax
import jax.numpy as jnp

from mtl_jax import methods


def weighted_loss(objectives: jax.Array, log_vars: jax.Array) -> jax.Array:
  """sum_t l_t / (2 exp(s_t)) + s_t / 2 of the (T,) task objectives and log variances."""
  return jnp.sum(objectives / (2 * jnp.exp(log_vars)) + log_vars / 2)


@methods.register('uncertainty')
class Uncertainty(methods.Method):
  """Uncertainty weighting (module docstring)."""

  def init_extra(self, params):
    log_vars = jnp.full((len(self.task_names),), float(self.config.uncertainty.init), jnp.float32)
    return {'log_var': log_vars, 'log_var_opt': self.tx.init(log_vars)}

  def train_step(self, state, rest, batch):
    def loss_fn(params, log_vars):
      objectives, (reg, per_task, stats) = self.task_objectives(state, rest, params, batch)
      return weighted_loss(objectives, log_vars) + reg, (per_task, stats)

    (loss, (per_task, stats)), (grads, s_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params, state.extra['log_var'])
    log_vars, s_opt = self.update_method_params(s_grads, state.extra['log_var'],
                                                state.extra['log_var_opt'])
    state, scalars = self.apply_gradients(state, grads, batch_stats=stats,
                                          extra={'log_var': log_vars, 'log_var_opt': s_opt})
    weights = 1 / (2 * jnp.exp(state.extra['log_var']))
    return state, {'loss': loss, **scalars, **{f'{t}_loss': v for t, v in per_task.items()},
                   **{f'weight/{t}': weights[i] for i, t in enumerate(self.task_names)}}
