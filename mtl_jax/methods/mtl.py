"""'mtl': the weighted-sum multi-task objective of both references (the default method).

loss = sum_t w_t L_t (+ lambda_lb L_cv for MLoRE's router gates), `config.loss_weights`,
`config.load_balancing_weight` (docs/mlore.md §4, docs/mtlora.md §8); one gradient step of the
configured optimizer on every trainable parameter. Logs loss, <task>_loss, grad_norm,
learning_rate.
"""

import jax

from mtl_jax import methods


@methods.register('mtl')
class MTL(methods.Method):
  """Weighted sum of the task losses, one optimizer step (mtl_jax/methods/__init__.py)."""

  def train_step(self, state, rest, batch):
    def loss_fn(params):
      preds, aux, batch_stats = self.forward(state, rest, params, batch['image'])
      total, per_task = self.losses(preds, batch, aux)
      return total, (per_task, batch_stats)

    (loss, (per_task, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    state, scalars = self.apply_gradients(state, grads, batch_stats=batch_stats)
    return state, {'loss': loss, **scalars, **{f'{k}_loss': v for k, v in per_task.items()}}
