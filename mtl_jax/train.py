"""The trainer: mesh, sharded state, jitted steps, Orbax checkpoints, clu reports.

`train_and_evaluate(config, workdir)` runs (or resumes) a training job; `evaluate_checkpoint`
evaluates the latest checkpoint of a workdir (or `config.init_from`). Everything that depends on
user input is checked in `Trainer.__init__` before the workdir is touched, so bad input fails
with one `ConfigError` line and no half-written output.

Seams: the train step belongs to the method of ``config.method`` (mtl_jax/methods) and what an
eval pass computes to the evaluators of ``config.evaluators`` (mtl_jax/evaluators); this module
keeps the loop, the state and the checkpoint wiring shared by all of them.

Design (docs/anchors.md "What to copy"): the model is an NNX module split once into a static
graph and pure-dict state; the train state `{step, params, frozen, batch_stats, opt_state,
extra}` lives on a `Mesh` from `config.mesh` with shardings from `config.param_sharding` rules,
the batch is split over every mesh axis, and the steps are `jax.jit` with explicit in/out
shardings, the train state donated. BatchNorm statistics are plain means over the global batch,
i.e. SyncBN. Randomness (drop path, router noise) is re-seeded every step from (seed, step), so a
resumed run draws the same numbers as an uninterrupted one and results do not depend on the
device count.
"""

import copy
import dataclasses
import functools
import os
import re
import signal
import threading
import time
from typing import Any

from absl import logging
from clu import periodic_actions
from etils import epath
import flax
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax import ConfigError
from mtl_jax import RunStopped
from mtl_jax import checkpoint
from mtl_jax.convert import adamw
from mtl_jax import evaluators as evaluators_lib
from mtl_jax import fork_log
from mtl_jax import input_pipeline
from mtl_jax import methods
from mtl_jax.methods import conflict
from mtl_jax import models
from mtl_jax import optim
from mtl_jax import perf
from mtl_jax import reporting
from mtl_jax import sharding
from mtl_jax import tasks as tasks_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict  # trainable parameters
  frozen: dict  # parameters matched by config.frozen: never updated, no optimizer state
  batch_stats: dict
  opt_state: Any
  extra: Any = dataclasses.field(default_factory=dict)  # the method's own state (methods/)

  def as_dict(self) -> dict[str, Any]:
    """The checkpointed dict; an empty `extra` is left out (checkpoints of methods without one
    keep the layout of earlier versions)."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    if not jax.tree.leaves(out['extra']):
      del out['extra']
    return out


def validate_config(config, num_devices: int) -> dict[str, tasks_lib.Task]:
  """Checks user-facing config values; returns the tasks. Raises ConfigError naming the fix."""
  tasks = tasks_lib.config_tasks(config)
  for name in tasks:
    if name not in config.loss_weights:
      raise ConfigError(f'no loss weight for task {name!r}; set --config.loss_weights.{name}=W')
  for key in ('total_steps', 'batch_size', 'log_every_steps', 'eval_every_steps',
              'checkpoint_every_steps', 'keep_checkpoints'):
    if int(config[key]) <= 0:
      raise ConfigError(f'config.{key} must be positive, got {config[key]}')
  for key in ('steps_per_epoch', 'eval_every_epochs', 'checkpoint_every_epochs', 'keep_period'):
    if int(config[key]) < 0:
      raise ConfigError(f'config.{key} must be >= 0, got {config[key]}')
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] and config[key] % num_devices:
      raise ConfigError(f'config.{key}={config[key]} is not divisible by the {num_devices} '
                        f'devices of the mesh; use a multiple of {num_devices}')
  if config.get('resume_from') and config.init_from:
    raise ConfigError('config.resume_from continues a run, config.init_from starts one from '
                      'weights; set one of them')
  if config.init_opt_state and not config.init_from:
    raise ConfigError('config.init_opt_state needs --config.init_from=CHECKPOINT (the previous '
                      "stage's workdir)")
  if config.init_schedule not in ('restart', 'continue'):
    raise ConfigError(f"config.init_schedule={config.init_schedule!r}; use 'restart' or 'continue'")
  if int(config.conflict.every_steps) < 0:
    raise ConfigError(f'config.conflict.every_steps={config.conflict.every_steps} must be >= 0 '
                      '(0 = no conflict diagnostics)')
  if config.conflict.every_steps and len(tasks) < 2:
    raise ConfigError('config.conflict.every_steps needs at least two tasks in --config.tasks')
  if config.nonfinite not in ('stop', 'skip'):
    raise ConfigError(f"config.nonfinite={config.nonfinite!r}; use 'stop' or 'skip'")
  if int(config.nonfinite_max_skips) <= 0:
    raise ConfigError(f'config.nonfinite_max_skips={config.nonfinite_max_skips} must be positive')
  if 'prediction_grid' in evaluators_lib.names(config) and int(config.num_eval_images) <= 0:
    raise ConfigError(f'config.num_eval_images={config.num_eval_images} must be positive (or '
                      "leave 'prediction_grid' out of config.evaluators)")
  if config.eval_boundary and 'edge' not in tasks:
    raise ConfigError('config.eval_boundary needs the edge task; add edge to --config.tasks or '
                      'set --config.eval_boundary=False')
  return tasks


def resolve_batch_size(config, num_devices: int):
  """`config` with a `batch_size_per_device` (> 0) turned into the global batch_size of
  `num_devices` (a copy: learning rates and step counts that reference batch_size follow)."""
  per_device = int(config.get('batch_size_per_device', 0))
  if per_device < 0:
    raise ConfigError(f'config.batch_size_per_device={per_device} must be >= 0 (0: batch_size '
                      'is the global batch)')
  if not per_device:
    return config
  config = copy.deepcopy(config)
  config.batch_size = per_device * num_devices
  config.batch_size_per_device = 0
  logging.info('Global batch %d = %d per device x %d devices (config.batch_size_per_device)',
               config.batch_size, per_device, num_devices)
  return config


def resolve_epochs(config, train_examples: int):
  """`config` with `steps_per_epoch` (0: ⌊train_examples / batch_size⌋, at least 1) and the
  `*_every_epochs` intervals turned into steps (a copy when anything changes)."""
  steps = int(config.steps_per_epoch) or max(1, train_examples // int(config.batch_size))
  changes = {'steps_per_epoch': steps}
  for kind in ('eval', 'checkpoint'):
    if int(config[f'{kind}_every_epochs']):
      changes[f'{kind}_every_steps'] = int(config[f'{kind}_every_epochs']) * steps
  if all(int(config[k]) == v for k, v in changes.items()):
    return config
  config = copy.deepcopy(config)
  config.update(changes)
  return config


class Trainer:
  """Model, optimizer, method, evaluators, shardings and jitted steps of one configured job."""

  def __init__(self, config, workdir, devices=None):
    self.workdir = epath.Path(workdir)
    if not self.workdir.is_absolute():  # Orbax needs absolute paths (gs:// ones are)
      self.workdir = self.workdir.resolve()
    if self.workdir.exists() and not self.workdir.is_dir():
      raise ConfigError(f'--workdir {os.fspath(self.workdir)} is a file; give a directory')
    try:
      self.mesh = sharding.make_mesh(config.mesh, devices)
    except ValueError as e:
      raise ConfigError(str(e)) from e
    self.config = config = resolve_batch_size(config, self.mesh.size)
    self.tasks = validate_config(config, self.mesh.size)
    method_cls = methods.get(config.method)
    self.tx, self.schedule = optim.make_optimizer(config)
    # Data sources first: a dataset that is not built is a ConfigError.
    self.train_source = input_pipeline.open_data_source(config.dataset, config.dataset.train_split)
    self.eval_source = input_pipeline.open_data_source(config.dataset, config.dataset.eval_split)
    self.config = config = resolve_epochs(config, len(self.train_source))
    self.evaluators = evaluators_lib.build(evaluators_lib.Context(
        config, self.tasks, self.workdir, self.eval_source))
    # Tasks whose full predictions come to the host at every eval (per-example evaluators).
    self.host_tasks = tuple(t for t in self.tasks
                            if any(t in e.host_tasks for e in self.evaluators.values()))

    frozen = optim.frozen_filter(tuple(config.frozen))
    trainable = nnx.All(nnx.Param, nnx.Not(frozen))
    self._build = functools.partial(models.build_model, config, self.tasks)
    abstract = nnx.eval_shape(lambda: self._build(rngs=nnx.Rngs(config.seed)))
    self._split_filters = (trainable, nnx.Param, nnx.BatchStat, ...)
    abstract.train()
    self.train_graph = nnx.graphdef(abstract)
    abstract.eval()
    self.eval_graph = nnx.graphdef(abstract)
    self.rng_streams = sorted({s.tag for _, s in nnx.iter_graph(abstract)
                               if isinstance(s, nnx.RngStream)})
    self.method = method_cls(self)

    self.abstract_state = jax.eval_shape(self._init_state)
    self.state_sharding = sharding.tree_shardings(
        self.abstract_state, tuple(config.param_sharding), self.mesh)
    held, full = sharding.bytes_per_device(self.abstract_state, self.state_sharding)
    logging.info('Train state: %.3f GiB per device (%.3f GiB replicated; config.param_sharding)',
                 held / 2 ** 30, full / 2 ** 30)
    repl = sharding.replicated(self.mesh)
    batch = sharding.batch_sharding(self.mesh)
    self.rest = jax.jit(self._init_rest, out_shardings=repl)()
    self._step_shardings = dict(in_shardings=(self.state_sharding, repl, batch),
                                out_shardings=(self.state_sharding, repl))
    self.train_step = jax.jit(self._guarded_train_step, **self._step_shardings,
                              donate_argnums=(0,))
    self.eval_step = jax.jit(self._eval_step, in_shardings=(self.state_sharding, repl, batch),
                             out_shardings=(repl, batch))
    self.conflict_step = jax.jit(functools.partial(conflict.measure, self.method),
                                 in_shardings=(self.state_sharding, repl, batch),
                                 out_shardings=repl)

  # -- state ---------------------------------------------------------------------------------

  def _split(self, model):
    _, params, frozen, batch_stats, rest = nnx.split(model, *self._split_filters)
    return params, frozen, batch_stats, rest

  def _init_state(self) -> TrainState:
    params, frozen, batch_stats, _ = self._split(self._build(rngs=nnx.Rngs(self.config.seed)))
    params = nnx.to_pure_dict(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      frozen=nnx.to_pure_dict(frozen), batch_stats=nnx.to_pure_dict(batch_stats),
                      opt_state=self.tx.init(params), extra=self.method.init_extra(params))

  def _init_rest(self):
    """Non-parameter variables (RNG streams); values are re-seeded every step."""
    return nnx.to_pure_dict(self._split(self._build(rngs=nnx.Rngs(self.config.seed)))[3])

  def init_state(self, weights=None) -> TrainState:
    """Fresh state on the mesh, with the weights of checkpoint `weights` (default:
    `config.init_from`, if set)."""
    state = jax.jit(self._init_state, out_shardings=self.state_sharding)()
    weights = weights or self.config.init_from
    if not weights:
      return state
    try:
      return self.load_weights(state, weights)
    except ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (missing, garbage, not a checkpoint)
      reason = next((l for l in str(e).splitlines() if l.strip()), type(e).__name__)[:300]
      raise ConfigError(f'config.init_from={weights}: cannot be read ({reason}); give a '
                        'checkpoint directory (a workdir, its checkpoints dir or a step dir, or '
                        'the output of mtl_jax.tools.convert)') from e

  def restore(self, ckpt: checkpoint.Checkpointer, step: int, data_iter) -> TrainState:
    """The train state of checkpoint `step` on this mesh (`data_iter` set to its position)."""
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            self.abstract_state, self.state_sharding)
    return TrainState(**ckpt.restore(step, abstract.as_dict(), data_iter))

  def check_structure(self, ckpt: checkpoint.Checkpointer, step: int) -> None:
    """ConfigError when checkpoint `step` holds another model than this config's (its metadata
    is read; an unreadable one raises what Orbax raises)."""
    saved = ckpt.state_shapes(step)
    kinds = ('params', 'frozen', 'batch_stats')
    want = {f'{k}/{p}': tuple(v.shape) for k in kinds
            for p, v in _flatten_abstract(getattr(self.abstract_state, k)).items()}
    got = {k: v for k, v in saved.items() if k.split('/')[0] in kinds}
    if got == want:
      return
    differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    examples = ', '.join(f'{k}: {got.get(k, "absent")} saved, {want.get(k, "absent")} here'
                         for k in differ[:2])
    raise ConfigError(f'{os.fspath(ckpt.directory)}/{step} holds another model than this config '
                      f'({len(differ)} arrays differ, e.g. {examples}); resume with the config it '
                      'was trained with (WORKDIR/config.json) or use a new --workdir')

  def load_weights(self, state: TrainState, path) -> TrainState:
    """Overwrites the parameters and BN statistics present in the checkpoint at `path`."""
    params, batch_stats = checkpoint.load_weights(path)
    available = {**_flatten(params, 'params'), **_flatten(batch_stats, 'batch_stats')}
    used, kept = set(), []

    def replace(key_path, leaf):
      name = sharding.path_str(key_path)
      key = re.sub(r'^frozen/', 'params/', name)  # frozen or not is this config's choice
      if key not in available:
        kept.append(name)
        return leaf
      value = available[key]
      if value.shape != leaf.shape:
        raise ConfigError(f'config.init_from: {key} has shape {value.shape} in the checkpoint but '
                          f'{leaf.shape} in the model; check the config matches the checkpoint')
      used.add(key)
      return jax.device_put(value.astype(leaf.dtype), leaf.sharding)

    weights = jax.tree_util.tree_map_with_path(
        replace, {k: getattr(state, k) for k in ('params', 'frozen', 'batch_stats')})
    unused = sorted(set(available) - used)
    if unused:
      raise ConfigError(f'config.init_from: {len(unused)} checkpoint arrays have no place in the '
                        f'model, e.g. {unused[:3]}; check the config matches the checkpoint')
    logging.info('Loaded %d arrays from %s; %d keep their initialisation%s', len(used), path,
                 len(kept), f' (e.g. {kept[:3]})' if kept else '')
    return state.replace(**weights)

  def load_optimizer_state(self, state: TrainState, path) -> TrainState:
    """The optimizer state of training checkpoint `path` for the leaves trainable here and there
    (two-stage training, docs/methods.md §6): moments and Adam's count are copied, new leaves
    start fresh; with `config.init_schedule='continue'` the step and the schedule's count continue
    from the checkpoint, with 'restart' (the fork) they start at 0. Method state is not carried."""
    fork_moments = epath.Path(path) / adamw.FILE  # a converted .pth (mtl_jax/convert/adamw.py)
    if fork_moments.exists():
      step, saved = adamw.opt_state_arrays(fork_moments, state.opt_state)
    else:
      step, saved = checkpoint.load_optimizer_state(path)
    cont = self.config.init_schedule == 'continue'
    if cont and step >= self.config.total_steps:
      raise ConfigError(f'config.init_schedule=continue: the checkpoint is at step {step}, not '
                        f'before config.total_steps={self.config.total_steps}; raise total_steps '
                        '(it counts both stages) or use init_schedule=restart')
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
    schedule_counts = {
        sharding.path_str(p) + '/count'
        for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state, is_leaf=is_schedule)[0]
        if is_schedule(_)}
    copied = []

    def replace(key_path, leaf):
      name = sharding.path_str(key_path)
      if name in schedule_counts and not cont:
        return leaf
      if name in saved and saved[name].shape == leaf.shape:
        copied.append(name)
        return jax.device_put(saved[name].astype(leaf.dtype), leaf.sharding)
      return leaf

    opt_state = jax.tree_util.tree_map_with_path(replace, state.opt_state)
    logging.info('Optimizer state from %s: %d of %d arrays copied; schedule %s', path, len(copied),
                 len(jax.tree.leaves(opt_state)), f'continues at step {step}' if cont else
                 'restarts at step 0')
    new_step = jnp.asarray(step if cont else 0, state.step.dtype)
    return state.replace(opt_state=opt_state,
                         step=jax.device_put(new_step, state.step.sharding))

  def step_flops(self, state: TrainState, batch) -> float:
    """Per-device FLOPs of one train step with the ViT attention in its XLA form, for MFU where
    it runs as cuDNN's fused kernel, whose FLOPs XLA does not count (perf.py)."""
    return perf.flops_with_xla_attention(self._guarded_train_step, state, self.rest, batch,
                                         devices=self.mesh.size, **self._step_shardings)

  def _guarded_train_step(self, state: TrainState, rest, batch):
    """The method's step, applied only when its loss and new weights are finite (docs/faults.md
    §1): otherwise the state is kept (but for the step count) and `nonfinite` is 1."""
    new, scalars = self.method.train_step(state, rest, batch)
    finite = jnp.isfinite(scalars['loss'])
    for leaf in jax.tree.leaves((new.params, new.batch_stats)):
      finite &= jnp.all(jnp.isfinite(leaf))
    # A cond, not a per-leaf `where`: selects fed by one reduction over every new weight made
    # XLA:CPU compile the MLoRE demo step in 358 s instead of 52 s (benchmarks/RESULTS.md).
    # The frozen weights stay out of it (the cond copies what it returns).
    kept = jax.lax.cond(finite, lambda: new.replace(frozen=None),
                        lambda: state.replace(frozen=None))
    return (kept.replace(step=new.step, frozen=new.frozen),
            {**scalars, 'nonfinite': 1 - finite.astype(jnp.int32)})

  # -- model and evaluation --------------------------------------------------------------------

  def model(self, graph, state: TrainState, rest, params=None):
    """The model `graph` (train_graph / eval_graph) with `state`'s (or `params`') weights."""
    return nnx.merge(graph, state.params if params is None else params, state.frozen,
                     state.batch_stats, rest)

  def _eval_step(self, state: TrainState, rest, batch):
    preds, _ = self.model(self.eval_graph, state, rest)(batch['image'])
    device_out = {name: e.device_fn(preds, batch) for name, e in self.evaluators.items()}
    return device_out, {name: preds[name] for name in self.host_tasks}

  def evaluate(self, state: TrainState, eval_iter, step: int = 0
               ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """One pass of every evaluator over `eval_iter` (make_eval_iterator's batches of
    `self.eval_source`) -> (scalars, images), keyed without the `eval/` prefix."""
    for e in self.evaluators.values():
      e.start(step)
    for local in eval_iter:
      device_out, host = self.eval_step(state, self.rest, sharding.global_batch(local, self.mesh))
      host = {name: _local_rows(x) for name, x in host.items()}
      for name, e in self.evaluators.items():
        e.add(local, device_out[name], host)
    scalars, images = {}, {}
    for e in self.evaluators.values():
      result = e.finish()
      scalars.update(result.scalars)
      images.update(result.images)
    return scalars, images


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process' rows of a batch-sharded global array, in the order of its local batch."""
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def _flatten_abstract(tree) -> dict[str, Any]:
  return {sharding.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _flatten(tree: dict, prefix: str) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {f'{prefix}/{sharding.path_str(p)}': np.asarray(v) for p, v in flat}


def _fork_log(trainer, workdir) -> fork_log.ForkLog:
  """The fork's log_rank0.txt writer of this run (a no-op without config.fork_log)."""
  c = trainer.config
  return fork_log.ForkLog(workdir, c.fork_log, tasks=trainer.tasks,
                          steps_per_epoch=c.steps_per_epoch, total_steps=c.total_steps,
                          enabled=jax.process_index() == 0)


def _evaluate_and_write(writer, step, trainer, state, eval_iter, log=None) -> dict[str, float]:
  start = time.perf_counter()
  metrics, images = trainer.evaluate(state, eval_iter, step)
  if log:
    log.eval(metrics, time.perf_counter() - start)
  writer.write_scalars(step, {f'eval/{k}': v for k, v in metrics.items()})
  if images:
    writer.write_images(step, {f'eval/{k}': v[None] for k, v in images.items()})
  logging.info('eval @%d: %s', step, ', '.join(
      f'{k}={v:.4g}' for k, v in metrics.items() if k.split('/')[-1] in _MAIN_METRICS))
  return metrics


_MAIN_METRICS = ('miou', 'maxf', 'mean', 'rmse', 'loss', 'rmse_predict_mean', 'odsF')


def train_and_evaluate(config, workdir, devices=None) -> dict[str, float]:
  """Trains (resuming from WORKDIR/checkpoints if present); returns the last eval metrics.

  `devices` (default: all) restricts the mesh, e.g. for tests comparing device counts. Faults
  (docs/faults.md): a non-finite step is never applied nor saved (`config.nonfinite`); SIGTERM /
  SIGINT save a checkpoint at the step reached and raise `RunStopped`; an unreadable latest
  checkpoint falls back to the previous one; bad input fails before the workdir is written.
  """
  with _StopSignals() as signals:
    return _train(config, workdir, devices, signals)


def _train(config, workdir, devices, signals) -> dict[str, float]:
  trainer = Trainer(config, workdir, devices)
  config, workdir = trainer.config, trainer.workdir
  train_iter = input_pipeline.make_train_iterator(config, trainer.tasks,
                                                  source=trainer.train_source)
  eval_iter, _ = input_pipeline.make_eval_iterator(
      config, trainer.tasks, config.dataset.eval_split, source=trainer.eval_source)

  # Everything that can fail on bad input happens before the first byte of the workdir.
  ckpt_dir = workdir / 'checkpoints'
  ckpt, latest = None, checkpoint.latest_step(ckpt_dir)
  if latest is None:  # a fresh run
    if config.resume_from:
      state = _continue_from(trainer, config.resume_from, train_iter)
    else:
      state = trainer.init_state()
      if config.init_opt_state:
        state = trainer.load_optimizer_state(state, config.init_from)
  else:
    ckpt = checkpoint.Checkpointer(ckpt_dir, max_to_keep=config.keep_checkpoints,
                                   keep_period=config.keep_period)
    try:
      state, latest = _restore_latest(trainer, ckpt, train_iter)
    except BaseException:
      ckpt.close()
      raise
    if latest > config.total_steps:
      ckpt.close()
      raise ConfigError(f'{os.fspath(ckpt_dir)} is at step {latest}, beyond config.total_steps='
                        f'{config.total_steps}; raise total_steps or use a new --workdir')

  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
    checkpoint.remove_stale_tmp(ckpt_dir)
  if ckpt is None:
    ckpt = checkpoint.Checkpointer(ckpt_dir, max_to_keep=config.keep_checkpoints,
                                   keep_period=config.keep_period)
  writer = reporting.create_writer(workdir)
  try:
    return _loop(trainer, state, latest, ckpt, writer, train_iter, eval_iter, signals)
  finally:  # also on errors and interrupts: in-flight saves finish, nothing is left half-written
    ckpt.wait()
    ckpt.close()
    writer.close()


def _continue_from(trainer, source_path, train_iter) -> TrainState:
  """The state of `config.resume_from`'s checkpoint (a fresh run continuing another)."""
  try:
    source, source_step = checkpoint.locate(source_path, 'config.resume_from')
  except FileNotFoundError as e:
    raise ConfigError(str(e)) from e
  source_ckpt = checkpoint.Checkpointer(source, async_save=False)
  try:
    trainer.check_structure(source_ckpt, source_step)
    state = trainer.restore(source_ckpt, source_step, train_iter)
  finally:
    source_ckpt.close()
  logging.info('Continuing %s from its step %d (config.resume_from)', source, source_step)
  return state


def _restore_latest(trainer, ckpt, train_iter) -> tuple[TrainState, int]:
  """The newest checkpoint that restores; an unreadable one is set aside (renamed
  `unreadable-<step>`, never deleted) with one warning and the previous one tried."""
  steps = sorted(ckpt.all_steps(), reverse=True)
  for step in steps:
    try:
      trainer.check_structure(ckpt, step)  # a ConfigError (other model) is not a fallback
      state = trainer.restore(ckpt, step, train_iter)
    except ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      reason = next((l for l in str(e).splitlines() if l.strip()), type(e).__name__)[:300]
      moved = checkpoint.set_aside(ckpt.directory, step) if jax.process_index() == 0 else None
      logging.warning('Checkpoint %s/%d cannot be restored (%s: %s); %strying the previous one',
                      ckpt.directory, step, type(e).__name__, reason,
                      f'kept as {moved.name}, ' if moved else '')
      ckpt.reload()
      continue
    logging.info('Resumed from %s at step %d', ckpt.directory, step)
    return state, step
  raise ConfigError(f'no checkpoint in {os.fspath(ckpt.directory)} can be restored (tried steps '
                    f'{steps}, now named unreadable-<step>); move the directory away to start '
                    'afresh')


class _StopSignals:
  """SIGTERM / SIGINT -> a checkpoint at the end of the current step (docs/faults.md §2).

  One process: Python handlers (restored on exit; a second SIGINT interrupts at once).
  Several: JAX's preemption service (SIGTERM) makes every process stop at the same step
  (`multihost_utils.reached_preemption_sync_point`); SIGINT keeps its default there.
  """

  def __init__(self):
    self.signum, self._previous = None, {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      wanted = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
      for signum in wanted:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      signal.default_int_handler(signum, frame)  # the second Ctrl-C: KeyboardInterrupt now
    self.signum = signum
    logging.warning('%s received: saving a checkpoint after this step, then stopping',
                    signal.Signals(signum).name)

  def requested(self, step: int) -> int | None:
    if self.signum is None and jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = signal.SIGTERM
    return self.signum


class _NonFiniteSteps:
  """The host side of the step's finite check (docs/faults.md §1): the per-step flags are
  fetched at the next log / eval / checkpoint / stop, before anything is written."""

  def __init__(self, config):
    self.policy, self.max_skips = config.nonfinite, int(config.nonfinite_max_skips)
    self.pending, self.skipped, self.consecutive = [], 0, 0

  def add(self, step: int, flag) -> None:
    self.pending.append((step, flag))

  def check(self, last_saved: int | None) -> None:
    if not self.pending:
      return
    flags = jax.device_get([f for _, f in self.pending])
    steps, self.pending = [s for s, _ in self.pending], []
    kept = (f'the checkpoints up to step {last_saved} are kept' if last_saved is not None
            else 'no checkpoint was written')
    for step, flag in zip(steps, flags):
      if not flag:
        self.consecutive = 0
        continue
      if self.policy == 'stop':
        raise RunStopped(
            f'step {step}: the loss or the updated weights are not finite (NaN/Inf); the update '
            f'was not applied and the run stopped ({kept}). Lower --config.optimizer.'
            'learning_rate (or set --config.nonfinite=skip) and rerun the command to resume')
      self.skipped, self.consecutive = self.skipped + 1, self.consecutive + 1
      logging.warning('step %d: not finite, update skipped (%d in a row)', step, self.consecutive)
      if self.consecutive >= self.max_skips:
        raise RunStopped(
            f'steps {step - self.consecutive + 1}..{step}: {self.consecutive} non-finite steps in '
            f'a row (config.nonfinite_max_skips={self.max_skips}); the run stopped ({kept}). '
            'Lower --config.optimizer.learning_rate and rerun the command to resume')


def _loop(trainer, state, latest, ckpt, writer, train_iter, eval_iter, signals):
  config, workdir = trainer.config, trainer.workdir
  if latest is not None:
    reporting.truncate_metrics(workdir, latest)
  reporting.log_parameters(state.params, state.frozen, writer, write_scalars=latest is None)
  log = _fork_log(trainer, workdir)

  step, total = int(state.step), config.total_steps
  eval_metrics = {}
  if step == 0 and config.eval_at_start:
    eval_metrics = _evaluate_and_write(writer, 0, trainer, state, eval_iter, log)
    writer.flush()

  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                           every_steps=config.log_every_steps, every_secs=None)
  window, t0, window_start = [], time.perf_counter(), step
  logging.info('Training steps %d..%d, global batch %d on %d devices (mesh %s)', step + 1, total,
               config.batch_size, jax.device_count(), dict(trainer.mesh.shape))
  train_step = cost = None
  guard, saved = _NonFiniteSteps(config), latest
  conflict_every = int(config.conflict.every_steps)
  while step < total:
    batch = sharding.global_batch(next(train_iter), trainer.mesh)
    if conflict_every and (step + 1) % conflict_every == 0:  # before the update, as the fork
      writer.write_scalars(step + 1, jax.device_get(trainer.conflict_step(state, trainer.rest,
                                                                          batch)))
    if train_step is None:  # compiled once, ahead of time, for its cost analysis (perf.py)
      train_step = trainer.train_step.lower(state, trainer.rest, batch).compile()
      flops = trainer.step_flops(state, batch) if perf.attention_uncounted() else None
      cost = perf.StepCost.of(train_step, config.perf_peak_flops, flops)
      t0 = time.perf_counter()
    state, scalars = train_step(state, trainer.rest, batch)
    step += 1
    window.append(scalars)
    guard.add(step, scalars['nonfinite'])
    report(step)
    stop = signals.requested(step) if step < total else None  # the last step ends the run anyway
    is_log = step % config.log_every_steps == 0 or step == total
    is_eval = step % config.eval_every_steps == 0 or step == total
    is_save = step % config.checkpoint_every_steps == 0 or step == total or stop
    if is_log or is_eval or is_save:
      guard.check(saved)

    if is_log:
      stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *window))
      applied = stacked.pop('nonfinite') == 0  # skipped steps' scalars are not averaged
      means = {k: float(np.mean(v[applied])) for k, v in stacked.items()} if applied.any() else {}
      steps_per_sec = (step - window_start) / max(time.perf_counter() - t0, 1e-9)
      writer.write_scalars(step, {**{f'train/{k}': v for k, v in means.items()},
                                  'train/skipped_steps': guard.skipped,
                                  **cost.scalars(steps_per_sec, config.batch_size)})
      eta = (total - step) / max(steps_per_sec, 1e-9)
      logging.info('step %d/%d | loss %.4f | %.2f steps/s | %.1f img/s | ETA %s', step, total,
                   means.get('loss', np.nan), steps_per_sec, steps_per_sec * config.batch_size,
                   time.strftime('%H:%M:%S', time.gmtime(eta)))
      log.train(step, means, 1 / max(steps_per_sec, 1e-9), config.optimizer.weight_decay)
      window = []
    log.step_done(step)

    if is_eval and not stop:
      with report.timed('eval'):
        eval_metrics = _evaluate_and_write(writer, step, trainer, state, eval_iter, log)

    if is_save:
      with report.timed('checkpoint'):
        ckpt.save(step, state.as_dict(), train_iter, config.to_dict())
      saved = step
    writer.flush()
    if stop:
      ckpt.wait()
      name = signal.Signals(stop).name
      raise RunStopped(f'{name}: stopped at step {step} after saving its checkpoint in '
                       f'{os.fspath(ckpt.directory)}; rerun the same command to resume',
                       exit_code=128 + int(stop))
    if not window:  # restart the speed window after logging / eval / checkpointing
      t0, window_start = time.perf_counter(), step

  if conflict_every and jax.process_index() == 0:
    conflict.write_file(workdir, int(config.steps_per_epoch))
  return eval_metrics


def evaluate_checkpoint(config, workdir, weights=None) -> dict[str, float]:
  """Evaluates `weights` (a checkpoint: workdir, checkpoints dir or step dir) if given, else
  WORKDIR's latest checkpoint, else `config.init_from`.

  Writes the eval/* scalars to TensorBoard and WORKDIR/eval_metrics.jsonl (at the checkpoint's
  step, 0 for init_from and `weights`), with ``config.fork_log`` the fork's eval block to
  WORKDIR/log_rank0.txt, the prediction grid to WORKDIR/predictions/step_*.png
  and, with ``config.save_predictions``, WORKDIR/predictions/<task>/<id>.png.
  """
  trainer = Trainer(config, workdir)
  config = trainer.config
  step = None if weights else checkpoint.latest_step(trainer.workdir / 'checkpoints')
  if step is None and not (weights or config.init_from):
    raise ConfigError(f'no checkpoint in {os.fspath(trainer.workdir)} and no config.init_from; '
                      'train first or pass --config.init_from=CHECKPOINT')
  eval_iter, _ = input_pipeline.make_eval_iterator(
      config, trainer.tasks, config.dataset.eval_split, source=trainer.eval_source)
  state = trainer.init_state(trainer.workdir if step is not None else weights or config.init_from)
  writer = reporting.create_writer(trainer.workdir, jsonl=reporting.EVAL_METRICS_FILE)
  log = _fork_log(trainer, trainer.workdir)
  metrics = _evaluate_and_write(writer, step or 0, trainer, state, eval_iter, log)
  writer.close()
  return metrics
