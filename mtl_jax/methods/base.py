"""`Method`, the base class of training methods (contract: mtl_jax/methods/__init__.py)."""

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from mtl_jax import losses
from mtl_jax import sharding


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
    self.task_names = tuple(self.tasks)  # config order

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

  def forward(self, state, rest, params: dict, images: jax.Array, key: jax.Array | None = None,
              batch_stats: dict | None = None):
    """Train-mode forward with `params` -> (preds, aux, batch_stats).

    The model's RNG streams (drop path, router noise) are re-seeded from `key` (default
    `step_key(state)`); batch_stats are the BatchNorm statistics after this batch, starting from
    `batch_stats` (default `state.batch_stats`).
    """
    model = self.bind(state, rest, params, key, batch_stats)
    preds, aux = model(images)
    return preds, aux, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

  def bind(self, state, rest, params: dict, key: jax.Array | None = None,
           batch_stats: dict | None = None, frozen: dict | None = None) -> nnx.Module:
    """The train-mode model with `params`, `frozen` (default `state.frozen`) and `batch_stats`,
    its RNG streams seeded from `key` (as `forward`)."""
    stats = state.batch_stats if batch_stats is None else batch_stats
    frozen = state.frozen if frozen is None else frozen
    model = nnx.merge(self.trainer.train_graph, params, frozen, stats, rest)
    streams = self.trainer.rng_streams
    if streams:
      key = self.step_key(state) if key is None else key
      nnx.reseed(model, **{s: jax.random.fold_in(key, i) for i, s in enumerate(streams)})
    return model

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

  def update_method_params(self, grads, params, opt_state):
    """One step of a second instance of the configured optimizer on a method's own parameters
    (Meta-SGD's rates, uncertainty's log variances) kept in `state.extra` -> (params, opt_state)."""
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # -- per-task structure (docs/methods.md §1) -------------------------------------------------

  def owner(self, path) -> str:
    """The task a parameter belongs to: the first path component naming a task (TS-LoRA
    `lora_tasks_A/<task>`, `heads/<task>`, per-task downsamplers), else '' (shared). Leaves that
    stack every task on one axis (MLoRE's task LoRA) count as shared."""
    for part in sharding.path_str(path).split('/'):
      if part in self.tasks:
        return part
    return ''

  def owners(self, tree) -> Any:
    """`owner` of every leaf of `tree` (a params-like dict), as a tree of str."""
    return jax.tree_util.tree_map_with_path(lambda p, _: self.owner(p), tree)

  def keep_other_tasks(self, old: dict, new: dict, task: str) -> dict:
    """`new`, except the leaves of tasks other than `task`, which keep `old` (BatchNorm statistics
    after a forward pass that only computes `task`'s path)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, o, n: o if self.owner(p) not in ('', task) else n, old, new)

  def task_objectives(self, state, rest, params: dict, batch, key=None, batch_stats=None
                      ) -> tuple[jax.Array, tuple[jax.Array, dict, dict]]:
    """The per-task objectives l_t = w_t L_t, a (T,) vector in config order -> (l, (regulariser,
    unweighted per-task losses, batch_stats)). The regulariser is what the loss adds to the task
    terms (MLoRE's lambda_lb L_cv; else 0): every method adds it unchanged."""
    preds, aux, stats = self.forward(state, rest, params, batch['image'], key, batch_stats)
    total, per_task = self.losses(preds, batch, aux)
    weights = self.config.loss_weights
    objectives = jnp.stack([weights[t] * per_task[t] for t in self.task_names])
    return objectives, (total - jnp.sum(objectives), per_task, stats)

  def task_gradients(self, state, rest, params: dict, batch, key=None):
    """One forward, T backward passes (vmapped): -> (l (T,), regulariser, per-task gradient tree
    with a leading T axis, gradient tree of the regulariser, per-task losses, batch_stats)."""
    def f(p):
      objectives, (reg, per_task, stats) = self.task_objectives(state, rest, p, batch, key)
      return (objectives, reg), (per_task, stats)

    (objectives, reg), vjp, (per_task, stats) = jax.vjp(f, params, has_aux=True)
    num = len(self.task_names)
    grads = jax.vmap(lambda ct: vjp((ct, jnp.zeros(())))[0])(jnp.eye(num))
    reg_grads = vjp((jnp.zeros(num), jnp.ones(())))[0]
    return objectives, reg, grads, reg_grads, per_task, stats

  def shard_rows(self, tree):
    """Rows of a batch slice spread over the mesh again (when they divide evenly), so a half
    batch still uses every device."""
    mesh = self.trainer.mesh
    def constrain(x):
      if x.ndim and x.shape[0] % mesh.size == 0:
        return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh))
      return x
    return jax.tree.map(constrain, tree)
