"""'dwa': dynamic weight average (Liu, Johns & Davison, MTAN, CVPR 2019; docs/methods.md §4).

  lambda_t(k) = T exp(r_t / tau) / sum_i exp(r_i / tau),   r_t = lbar_t(k-1) / lbar_t(k-2),
  loss = sum_t lambda_t l_t + regulariser,                  l_t = w_t L_t,

where lbar_t(k) is task t's mean objective over period k (the paper's epoch; here
`config.dwa.period` steps) and tau = `config.dwa.temperature` (2). lambda = 1 for the first two
periods. The running sums and the last two period means live in `state.extra`, so a resumed run
weights exactly as an uninterrupted one. Logs loss, <task>_loss, weight/<task>, grad_norm,
learning_rate.
"""

import jax
import jax.numpy as jnp

from mtl_jax import ConfigError
from mtl_jax import methods


def dwa_weights(history: jax.Array, periods: jax.Array, temperature: float) -> jax.Array:
  """lambda (T,) from the (2, T) means of periods k-2 and k-1; ones before two periods."""
  ratio = history[1] / history[0]
  weights = history.shape[1] * jax.nn.softmax(ratio / temperature)
  return jnp.where(periods >= 2, weights, jnp.ones_like(weights))


@methods.register('dwa')
class DWA(methods.Method):
  """Dynamic weight average (module docstring)."""

  def __init__(self, trainer):
    super().__init__(trainer)
    self.period, self.temperature = int(self.config.dwa.period), float(self.config.dwa.temperature)
    if self.period < 1 or self.temperature <= 0:
      raise ConfigError(f'config.dwa.period={self.period} must be >= 1 and '
                        f'config.dwa.temperature={self.temperature} > 0')

  def init_extra(self, params):
    num = len(self.task_names)
    return {'sum': jnp.zeros((num,), jnp.float32), 'history': jnp.ones((2, num), jnp.float32),
            'periods': jnp.zeros((), jnp.int32)}

  def train_step(self, state, rest, batch):
    extra = state.extra
    weights = dwa_weights(extra['history'], extra['periods'], self.temperature)

    def loss_fn(params):
      objectives, (reg, per_task, stats) = self.task_objectives(state, rest, params, batch)
      return jnp.sum(weights * objectives) + reg, (objectives, per_task, stats)

    (loss, (objectives, per_task, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    total = extra['sum'] + objectives
    end = (state.step + 1) % self.period == 0
    extra = {'sum': jnp.where(end, 0.0, total),
             'history': jnp.where(end, jnp.stack([extra['history'][1], total / self.period]),
                                  extra['history']),
             'periods': extra['periods'] + end.astype(jnp.int32)}
    state, scalars = self.apply_gradients(state, grads, batch_stats=stats, extra=extra)
    return state, {'loss': loss, **scalars, **{f'{t}_loss': v for t, v in per_task.items()},
                   **{f'weight/{t}': weights[i] for i, t in enumerate(self.task_names)}}
