"""'famo': fast adaptive multitask optimization (Liu et al., NeurIPS 2023; docs/methods.md §4),
as its official code does it.

Task weights z = softmax(xi) over learned logits xi (init 0). With D_t = l_t - m_t + 1e-8
(l_t = w_t L_t, m_t = 0 the minimum losses) and c = sum_t z_t / D_t (no gradient), the model
descends

  sum_t (z_t / c) log D_t   (+ the regulariser),

i.e. every task's log loss, weighted. After the optimizer step, the same batch is evaluated
again at the new parameters (a forward pass only) and delta_t = log D_t(before) - log D_t(after),
the decrease of each log loss, drives xi: its gradient is J_softmax(xi)^T delta, and xi takes one
Adam step with learning rate `config.famo.lr` (0.025) and L2 decay `config.famo.gamma` (0.01,
torch.optim.Adam's weight_decay). Tasks whose log loss fell most lose weight. xi and its Adam
state live in `state.extra`. Logs loss, <task>_loss, weight/<task>, grad_norm, learning_rate.
"""

import jax
import jax.numpy as jnp
import optax

from mtl_jax import methods

EPS = 1e-8


def famo_loss(objectives: jax.Array, logits: jax.Array) -> jax.Array:
  """sum_t (z_t / c) log(l_t + eps), c = stop_gradient(sum_t z_t / (l_t + eps))."""
  z = jax.nn.softmax(logits)
  d = objectives + EPS
  c = jax.lax.stop_gradient(jnp.sum(z / d))
  return jnp.sum(jax.lax.stop_gradient(z) / c * jnp.log(d))


def logit_gradient(logits: jax.Array, before: jax.Array, after: jax.Array) -> jax.Array:
  """J_softmax(xi)^T delta, delta = log(before + eps) - log(after + eps)."""
  delta = jnp.log(before + EPS) - jnp.log(after + EPS)
  _, vjp = jax.vjp(jax.nn.softmax, logits)
  return vjp(delta)[0]


def logit_optimizer(lr: float, gamma: float) -> optax.GradientTransformation:
  """torch.optim.Adam(lr, weight_decay=gamma): L2 added to the gradient, then Adam."""
  return optax.chain(optax.add_decayed_weights(gamma), optax.scale_by_adam(), optax.scale(-lr))


@methods.register('famo')
class FAMO(methods.Method):
  """FAMO (module docstring)."""

  def __init__(self, trainer):
    super().__init__(trainer)
    cfg = self.config.famo
    self.logit_tx = logit_optimizer(float(cfg.lr), float(cfg.gamma))

  def init_extra(self, params):
    logits = jnp.zeros((len(self.task_names),), jnp.float32)
    return {'logits': logits, 'logits_opt': self.logit_tx.init(logits)}

  def train_step(self, state, rest, batch):
    logits, key = state.extra['logits'], self.step_key(state)

    def loss_fn(params):
      objectives, (reg, per_task, stats) = self.task_objectives(state, rest, params, batch, key)
      return famo_loss(objectives, logits) + reg, (objectives, reg, per_task, stats)

    (_, (before, reg, per_task, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    new_state, scalars = self.apply_gradients(state, grads, batch_stats=stats)
    after, _ = self.task_objectives(new_state, rest, new_state.params, batch, key)
    updates, logits_opt = self.logit_tx.update(
        logit_gradient(logits, before, jax.lax.stop_gradient(after)), state.extra['logits_opt'],
        logits)
    new_logits = optax.apply_updates(logits, updates)
    new_state = new_state.replace(extra={'logits': new_logits, 'logits_opt': logits_opt})
    z = jax.nn.softmax(logits)
    return new_state, {'loss': jnp.sum(before) + reg, **scalars,
                       **{f'{t}_loss': v for t, v in per_task.items()},
                       **{f'weight/{t}': z[i] for i, t in enumerate(self.task_names)}}
