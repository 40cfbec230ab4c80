"""`Method`, the base class of training methods (contract: mtl_jax/methods/__init__.py)."""

from typing import Any

from flax import nnx
import jax
import optax

from mtl_jax import losses


class Method:
  """A training method bound to one `train.Trainer` (its config, tasks, model graph, optimizer).

  Subclasses implement `train_step`; `init_extra` adds train state. Attributes: `trainer`,
  `config`, `tasks`, `tx` (the configured optax optimizer), `schedule` (step -> learning rate).
  """

  def __init__(self, trainer):
    self.trainer = trainer
    self.config = trainer.config
    self.tasks = trainer.tasks
    self.tx = trainer.tx
    self.schedule = trainer.schedule

  def init_extra(self, params: dict) -> Any:
    """Extra train state of this method (`TrainState.extra`), from the initial parameters."""
    del params
    return {}

  def train_step(self, state, rest, batch) -> tuple[Any, dict[str, jax.Array]]:
    raise NotImplementedError

  # -- building blocks -------------------------------------------------------------------------

  def step_key(self, state) -> jax.Array:
    """The step's RNG key: fold_in(key(seed), step), so a resumed run draws the same numbers."""
    return jax.random.fold_in(jax.random.key(self.config.seed), state.step)

  def forward(self, state, rest, params: dict, images: jax.Array, key: jax.Array | None = None):
    """Train-mode forward with `params` -> (preds, aux, batch_stats).

    The model's RNG streams (drop path, router noise) are re-seeded from `key` (default
    `step_key(state)`); batch_stats are the BatchNorm statistics after this batch.
    """
    model = self.trainer.model(self.trainer.train_graph, state, rest, params)
    streams = self.trainer.rng_streams
    if streams:
      key = self.step_key(state) if key is None else key
      nnx.reseed(model, **{s: jax.random.fold_in(key, i) for i, s in enumerate(streams)})
    preds, aux = model(images)
    return preds, aux, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

  def losses(self, preds, batch, aux, tasks=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(configured weighted total, unweighted per-task losses) of `tasks` (default: all)."""
    config = self.config
    return losses.compute_losses(
        self.tasks if tasks is None else tasks, preds, batch, convention=config.convention,
        weights=dict(config.loss_weights), edge_w=config.edge_w, aux=aux,
        load_balancing_weight=config.load_balancing_weight)

  def apply_gradients(self, state, grads: dict, **replace) -> tuple[Any, dict[str, jax.Array]]:
    """One optimizer step -> (state at step + 1 with `replace` fields, {'grad_norm',
    'learning_rate'})."""
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    scalars = {'grad_norm': optax.global_norm(grads), 'learning_rate': self.schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         **replace), scalars
