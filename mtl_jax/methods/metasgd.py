"""'metasgd': Meta-SGD (Li et al. 2017) over tasks, as the user's fork trains it
(docs/methods.md §3).

MAML (mtl_jax/methods/maml.py) whose inner learning rates are learned: one scalar for the shared
leaves and one per task (the fork's later version), initialised to `config.metasgd.init`. The
inner step is differentiated (second order, the fork's `create_graph=True`), so the query loss
reaches the learning rates: theta_t' = theta - alpha_{shared | t} * grad L_s. The rates are
trained by a second instance of the configured optimizer (same schedule) in `state.extra`,
checkpointed with the rest; the global-norm clipping covers the LoRA gradients and the rates'
together, as in the fork. As in the fork the rates are raw values (no log parameterisation, no
clamp). The fork takes exactly one inner step whatever MAML_INNER_STEPS says; here
`config.maml.inner_steps` (default 1) is honoured. Logs MAML's scalars plus
inner_lr/<shared | task>.
"""

import jax
import jax.numpy as jnp
import optax

from mtl_jax import methods
from mtl_jax.methods import maml

SHARED = 'shared'  # key of the shared leaves' rate in state.extra['inner_lr']


@methods.register('metasgd')
class MetaSGD(maml.MAML):
  """MAML with learned per-group inner learning rates (module docstring)."""

  learn_inner_lrs = True

  def __init__(self, trainer):
    super().__init__(trainer)
    self.through_inner = True

  def init_extra(self, params):
    init = float(self.config.metasgd.init)
    lrs = {name: jnp.full((), init, jnp.float32)
           for name in (SHARED, *self.task_names)}
    return {'inner_lr': lrs, 'inner_lr_opt': self.tx.init(lrs)}

  def inner_lrs(self, state):
    return state.extra['inner_lr']

  def leaf_lrs(self, lrs, params):
    return jax.tree.map(lambda owner: lrs[owner or SHARED], self.owners(params))

  def train_step(self, state, rest, batch):
    _, grads, lr_grads, scalars, stats, _ = self.meta_gradients(state, rest, batch)
    norm, clip = optax.global_norm((grads, lr_grads)), float(self.config.optimizer.grad_clip_norm)
    if clip:  # one global norm over both; each optimizer's own clipping is then a no-op
      scale = jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-30))
      grads, lr_grads = jax.tree.map(lambda g: g * scale, (grads, lr_grads))
    lrs = state.extra['inner_lr']
    lrs, lr_opt = self.update_method_params(lr_grads, lrs, state.extra['inner_lr_opt'])
    state, opt_scalars = self.apply_gradients(
        state, grads, batch_stats=stats, extra={'inner_lr': lrs, 'inner_lr_opt': lr_opt})
    return state, {**scalars, **opt_scalars, 'grad_norm': norm,
                   **{f'inner_lr/{k}': v for k, v in lrs.items()}}
