"""The trainer: sharded jitted train step, evaluation, Orbax checkpoints, clu reports.

`train_and_evaluate(config, workdir)` runs (or resumes) a training job; `evaluate_checkpoint`
evaluates the latest checkpoint of a workdir (or `config.init_from`). Everything that depends on
user input is checked in `Trainer.__init__` before the workdir is touched, so bad input fails
with one `ConfigError` line and no half-written output.

Evaluation (`Trainer.evaluate`) reports the metrics of ``config.eval_protocol``
(mtl_jax/metrics.py), accumulated over every batch and host. Two per-example options bring the
process-local predictions to the host, back at each example's original size
(`to_original_size`): ``config.eval_boundary`` adds SEISM's boundary odsF / oisF / AP of the edge
predictions (mtl_jax/boundary.py, specs/datasets_metrics.md §4.5) and ``config.save_predictions``
writes them as the references save them (`save_prediction`): WORKDIR/predictions/<task>/<id>.png.

Design (specs/anchors.md "What to copy"): the model is an NNX module split once into a static
graph and pure-dict state; the train state `{step, params, frozen, batch_stats, opt_state}` lives
on a `Mesh` from `config.mesh` with shardings from `config.param_sharding` rules, the batch is
split over every mesh axis, and the step is `jax.jit` with explicit in/out shardings and the state
donated. BatchNorm statistics are plain means over the global batch, i.e. SyncBN. Randomness
(drop path, router noise) is re-seeded every step from (seed, step), so a resumed run draws the
same numbers as an uninterrupted one and results do not depend on the device count.
"""

import collections
from concurrent import futures
import dataclasses
import functools
import io
import multiprocessing
import os
import re
import time
from typing import Any

from absl import logging
from clu import parameter_overview
from clu import periodic_actions
import cv2
from etils import epath
import flax
from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import scipy.io

from mtl_jax import ConfigError
from mtl_jax import boundary
from mtl_jax import checkpoint
from mtl_jax import input_pipeline
from mtl_jax import losses
from mtl_jax import metrics as metrics_lib
from mtl_jax import models
from mtl_jax import optim
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

  def as_dict(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def dataset_kind(config) -> str:
  """Registry name of the configured dataset ('synthetic_scenes/small' -> 'synthetic_scenes')."""
  return config.dataset.name.split('/')[0].split(':')[0]


def validate_config(config, num_devices: int) -> dict[str, tasks_lib.Task]:
  """Checks user-facing config values; returns the tasks. Raises ConfigError naming the fix."""
  tasks = tasks_lib.get_tasks(config.tasks, dataset_kind(config), config.convention)
  for name in tasks:
    if name not in config.loss_weights:
      raise ConfigError(f'no loss weight for task {name!r}; set --config.loss_weights.{name}=W')
  for key in ('total_steps', 'batch_size', 'log_every_steps', 'eval_every_steps',
              'checkpoint_every_steps'):
    if int(config[key]) <= 0:
      raise ConfigError(f'config.{key} must be positive, got {config[key]}')
  for key in ('batch_size', 'eval_batch_size'):
    if config[key] and config[key] % num_devices:
      raise ConfigError(f'config.{key}={config[key]} is not divisible by the {num_devices} '
                        f'devices of the mesh; use a multiple of {num_devices}')
  if config.eval_boundary and 'edge' not in tasks:
    raise ConfigError('config.eval_boundary needs the edge task; add edge to --config.tasks or '
                      'set --config.eval_boundary=False')
  return tasks


def eval_protocol(config) -> str:
  """``config.eval_protocol``, '' meaning ``config.convention``."""
  return config.eval_protocol or config.convention


def frozen_filter(patterns):
  """nnx filter (path, value) -> True for parameters matched by a `config.frozen` regex."""
  compiled = [re.compile(p) for p in patterns]
  return lambda path, _: any(p.search('/'.join(map(str, path))) for p in compiled)


class Trainer:
  """Model, optimizer, shardings and jitted steps of one configured job."""

  def __init__(self, config, workdir, devices=None):
    self.config, self.workdir = config, epath.Path(workdir)
    if not self.workdir.is_absolute():  # Orbax needs absolute paths (gs:// ones are)
      self.workdir = self.workdir.resolve()
    try:
      self.mesh = sharding.make_mesh(config.mesh, devices)
    except ValueError as e:
      raise ConfigError(str(e)) from e
    self.tasks = validate_config(config, self.mesh.size)
    self.tx, self.schedule = optim.make_optimizer(config)
    self.metrics_cls = metrics_lib.make_metrics(self.tasks, edge_w=config.edge_w,
                                                protocol=eval_protocol(config))
    # Tasks whose full predictions come to the host at every eval (per-example options).
    self.host_tasks = (tuple(self.tasks) if config.save_predictions
                       else ('edge',) if config.eval_boundary else ())
    # Data sources first: a dataset that is not built is a ConfigError.
    self.train_source = input_pipeline.open_data_source(config.dataset, config.dataset.train_split)
    self.eval_source = input_pipeline.open_data_source(config.dataset, config.dataset.eval_split)

    frozen = frozen_filter(tuple(config.frozen))
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

    self.abstract_state = jax.eval_shape(self._init_state)
    self.state_sharding = sharding.tree_shardings(
        self.abstract_state, tuple(config.param_sharding), self.mesh)
    repl = sharding.replicated(self.mesh)
    batch = sharding.batch_sharding(self.mesh)
    self.rest = jax.jit(self._init_rest, out_shardings=repl)()
    self.train_step = jax.jit(self._train_step, in_shardings=(self.state_sharding, repl, batch),
                              out_shardings=(self.state_sharding, repl), donate_argnums=(0,))
    self.eval_step = jax.jit(self._eval_step, in_shardings=(self.state_sharding, repl, batch),
                             out_shardings=(repl, repl, batch))

  # -- state ---------------------------------------------------------------------------------

  def _split(self, model):
    _, params, frozen, batch_stats, rest = nnx.split(model, *self._split_filters)
    return params, frozen, batch_stats, rest

  def _init_state(self) -> TrainState:
    params, frozen, batch_stats, _ = self._split(self._build(rngs=nnx.Rngs(self.config.seed)))
    params = nnx.to_pure_dict(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      frozen=nnx.to_pure_dict(frozen), batch_stats=nnx.to_pure_dict(batch_stats),
                      opt_state=self.tx.init(params))

  def _init_rest(self):
    """Non-parameter variables (RNG streams); values are re-seeded every step."""
    return nnx.to_pure_dict(self._split(self._build(rngs=nnx.Rngs(self.config.seed)))[3])

  def init_state(self, weights=None) -> TrainState:
    """Fresh state on the mesh, with the weights of checkpoint `weights` (default:
    `config.init_from`, if set)."""
    state = jax.jit(self._init_state, out_shardings=self.state_sharding)()
    weights = weights or self.config.init_from
    return self.load_weights(state, weights) if weights else state

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

  # -- steps ---------------------------------------------------------------------------------

  def _model(self, graph, state: TrainState, rest, params=None):
    return nnx.merge(graph, state.params if params is None else params, state.frozen,
                     state.batch_stats, rest)

  def _train_step(self, state: TrainState, rest, batch):
    config = self.config
    key = jax.random.fold_in(jax.random.key(config.seed), state.step)

    def loss_fn(params):
      model = self._model(self.train_graph, state, rest, params)
      if self.rng_streams:
        nnx.reseed(model, **{s: jax.random.fold_in(key, i) for i, s in enumerate(self.rng_streams)})
      preds, aux = model(batch['image'])
      total, per_task = losses.compute_losses(
          self.tasks, preds, batch, convention=config.convention,
          weights=dict(config.loss_weights), edge_w=config.edge_w, aux=aux,
          load_balancing_weight=config.load_balancing_weight)
      return total, (per_task, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

    (loss, (per_task, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    scalars = {'loss': loss, 'grad_norm': optax.global_norm(grads),
               'learning_rate': self.schedule(state.step),
               **{f'{k}_loss': v for k, v in per_task.items()}}
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), scalars

  def _eval_step(self, state: TrainState, rest, batch):
    preds, _ = self._model(self.eval_graph, state, rest)(batch['image'])
    metric = self.metrics_cls.single_from_model_output(preds=preds, batch=batch)
    n = self.config.num_eval_images
    return (metric, jax.tree.map(lambda p: p[:n], preds),
            {name: preds[name] for name in self.host_tasks})

  # -- evaluation ----------------------------------------------------------------------------

  def evaluate(self, state: TrainState, eval_iter) -> tuple[dict[str, float], dict]:
    """Metrics over the whole eval split and (first batch) inputs, labels and predictions.

    With ``config.eval_boundary`` / ``config.save_predictions`` every valid example of this
    process is also scored / written (see the module docstring); `eval_iter` must then be
    make_eval_iterator's over `self.eval_source`.
    """
    config = self.config
    boundary_eval = BoundaryEvaluation(
        tasks_lib.DATASETS[dataset_kind(config)].edge_max_dist,
        config.eval_boundary_workers) if config.eval_boundary else None
    total, sample, position = None, None, 0
    for local in eval_iter:
      metric, preds, host = self.eval_step(state, self.rest,
                                           sharding.global_batch(local, self.mesh))
      metric = jax.tree.map(_widen, jax.device_get(metric))
      total = metric if total is None else total.merge(metric)
      if sample is None:
        sample = {'batch': jax.tree.map(lambda x: x[:config.num_eval_images], local),
                  'preds': jax.device_get(preds)}
      if self.host_tasks:
        host = {name: _local_rows(x) for name, x in host.items()}
        for i in np.flatnonzero(local['example_valid']):
          self._per_example({name: x[i] for name, x in host.items()}, position + i,
                            boundary_eval)
      position += len(local['example_valid'])
    metrics = metrics_lib.flatten(total.compute())
    if boundary_eval:
      metrics.update({f'edge/{k}': v for k, v in boundary_eval.scores().items()})
    return metrics, sample

  def _per_example(self, preds: dict[str, np.ndarray], position: int,
                   boundary_eval: 'BoundaryEvaluation | None') -> None:
    """Boundary counts and saved predictions of the `position`-th example of this process.

    make_eval_iterator gives process p the examples p, p + P, p + 2P, ... of the split, so the
    example's id, original size and boundary ground truth are read back from the source.
    """
    example = self.eval_source[jax.process_index() + jax.process_count() * position]
    image_id = _text(example['id'])
    size = tuple(example['image'].shape[:2])
    original = {name: to_original_size(pred, size, self.config.input.augment)
                for name, pred in preds.items()}
    if boundary_eval:
      labels = example['label_map'] if 'label_map' in example else example['edge'][..., 0]
      boundary_eval.add(boundary.to_png(original['edge'][..., 0]), labels)
    if self.config.save_predictions:
      for name, pred in original.items():
        save_prediction(self.workdir / 'predictions' / name, image_id, self.tasks[name], pred,
                        self.config.convention)

  def prediction_grid(self, sample) -> np.ndarray:
    """Rows = examples; columns = input, then label and prediction for every task."""
    batch, preds = sample['batch'], sample['preds']
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    rows = []
    for i in range(min(len(batch['image']), self.config.num_eval_images)):
      if not batch['example_valid'][i]:
        continue
      row = [((batch['image'][i] * std + mean) * 255).clip(0, 255).astype(np.uint8)]
      for name, task in self.tasks.items():
        label = batch[name][i]
        depth_range = None
        if task.kind == 'depth':
          valid = label[label > 0]
          depth_range = (float(valid.min()), float(valid.max())) if valid.size else (0., 1.)
        row.append(tasks_lib.render(task, label, is_label=True, depth_range=depth_range))
        row.append(tasks_lib.render(task, preds[name][i], depth_range=depth_range))
      rows.append(row)
    return reporting.image_grid(rows)


def to_original_size(pred: np.ndarray, size: tuple[int, int], augment: str) -> np.ndarray:
  """A (H, W, C) prediction on the eval input, back at the example's original (h, w) `size`.

  'mlore' eval padded the image: the centred crop (top = (H - h) // 2, the references'
  `save_model_pred_for_one_task`). 'mtlora' eval resized it: the logits are resized back
  (bilinear; the reference does not save predictions).
  """
  h, w = size
  if augment == 'mtlora':
    if pred.shape[:2] == (h, w):
      return pred
    out = cv2.resize(np.asarray(pred, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return out.reshape(h, w, pred.shape[-1])  # cv2 drops a channel axis of size 1
  top, left = (pred.shape[0] - h) // 2, (pred.shape[1] - w) // 2
  return pred[top:top + h, left:left + w]


def encode_prediction(task: tasks_lib.Task, pred: np.ndarray, convention: str) -> np.ndarray:
  """The saved form of a (h, w, C) prediction: the references' `get_output` and uint8 cast.

  segmentation: argmax ids; saliency: 255 x softmax[..., 1] (2 channels) or 255 x sigmoid;
  edge: `boundary.to_png`; normals: 255 (normalize(x) + 1) / 2 as RGB; all truncated to uint8.
  depth: float32 metres, clamped at 0 for 'mlore' (MTLoRA saves the raw output).
  """
  pred = np.asarray(pred, np.float32)
  if task.kind == 'segmentation':
    return pred.argmax(-1).astype(np.uint8)
  if task.kind == 'saliency':
    with np.errstate(over='ignore'):  # exp overflow -> probability 0, as in torch
      if pred.shape[-1] == 2:
        prob = np.float32(1) / (np.float32(1) + np.exp(pred[..., 0] - pred[..., 1]))
      else:
        prob = np.float32(1) / (np.float32(1) + np.exp(-pred[..., 0]))
    return (np.float32(255) * prob).astype(np.uint8)
  if task.kind == 'edge':
    return boundary.to_png(pred[..., 0])
  if task.kind == 'normals':
    unit = pred / np.maximum(np.linalg.norm(pred, axis=-1, keepdims=True), 1e-12)
    return (255 * (unit + 1) / 2).astype(np.uint8)
  if task.kind == 'depth':
    return np.maximum(pred[..., 0], 0) if convention == 'mlore' else pred[..., 0]
  raise ValueError(f'cannot save task kind {task.kind!r}')


def save_prediction(directory, image_id: str, task: tasks_lib.Task, pred: np.ndarray,
                    convention: str) -> None:
  """Writes DIRECTORY/<id>.png (8-bit L or RGB), or DIRECTORY/<id>.mat ({'depth': (h, w)}) for
  depth, as the references' savers do (specs/datasets_metrics.md §4.5 step 1)."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  value = encode_prediction(task, pred, convention)
  buf = io.BytesIO()
  if task.kind == 'depth':
    scipy.io.savemat(buf, {'depth': value})
  else:
    Image.fromarray(value).save(buf, format='PNG')
  (directory / f'{image_id}.{"mat" if task.kind == "depth" else "png"}').write_bytes(
      buf.getvalue())


class BoundaryEvaluation:
  """SEISM counts of one eval pass's edge predictions (mtl_jax/boundary.py), summed over hosts.

  `add` queues one image (PNG at the original size, ground-truth labels) on a pool of
  `workers` spawned processes (0: every CPU core; 1: evaluated inline), keeping at most
  4 x workers images in flight; `scores` waits for them and returns odsF, oisF, ap, ... (x100).
  """

  def __init__(self, max_dist: float, workers: int = 0):
    self.max_dist = max_dist
    self.workers = workers or os.cpu_count() or 1
    self.pool = (futures.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(
        'spawn')) if self.workers > 1 else None)
    self.pending, self.counts = collections.deque(), []

  def add(self, png: np.ndarray, labels: np.ndarray) -> None:
    item = [(np.asarray(png), np.asarray(labels))]
    if self.pool is None:
      self.counts.append(boundary.evaluate_images(item, self.max_dist))
      return
    self.pending.append(self.pool.submit(boundary.evaluate_images, item, self.max_dist))
    while len(self.pending) > 4 * self.workers:
      self.counts.append(self.pending.popleft().result())

  def scores(self) -> dict[str, float]:
    while self.pending:
      self.counts.append(self.pending.popleft().result())
    if self.pool is not None:
      self.pool.shutdown()
    counts = (np.concatenate(self.counts) if self.counts
              else np.zeros((0, len(boundary.THRESHOLDS), 4), np.int64))
    totals, ois = boundary.reduce_counts(counts)
    return boundary.scores(_sum_over_hosts(totals), _sum_over_hosts(ois))


def _sum_over_hosts(x: np.ndarray) -> np.ndarray:
  """Exact sum over processes of a non-negative int64 array (< 2^47).

  Gathers move int32 (x64 is off), so the values travel as two 24-bit halves.
  """
  if jax.process_count() == 1:
    return x
  x = np.asarray(x, np.int64)
  halves = np.stack([x >> 24, x & (2 ** 24 - 1)]).astype(np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(halves), np.int64).sum(0)
  return (gathered[0] << 24) + gathered[1]


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process' rows of a batch-sharded global array, in the order of its local batch."""
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _widen(x):
  """Host-side accumulation dtype: int64 / float64 (per-batch device counts are 32-bit)."""
  x = np.asarray(x)
  if np.issubdtype(x.dtype, np.integer):
    return x.astype(np.int64)
  if np.issubdtype(x.dtype, np.floating):
    return x.astype(np.float64)
  return x


def _flatten(tree: dict, prefix: str) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {f'{prefix}/{sharding.path_str(p)}': np.asarray(v) for p, v in flat}


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _log_parameters(state: TrainState, writer, write_scalars: bool) -> None:
  params = {'trainable': state.params, 'frozen': state.frozen}
  logging.info('Parameters:\n%s', parameter_overview.get_parameter_overview(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params), include_stats=False))
  groups = {}
  for kind, tree in params.items():
    for name, sub in tree.items():
      groups[f'params/{kind}/{name}'] = _count(sub)
  total, trainable = _count(params), _count(state.params)
  for name, n in sorted(groups.items()):
    logging.info('  %-40s %14s', name, f'{n:,}')
  logging.info('Parameters: total=%s trainable=%s', f'{total:,}', f'{trainable:,}')
  if write_scalars:
    writer.write_scalars(0, {'params/total': total, 'params/trainable': trainable})


def _write_eval(writer, step, trainer, metrics, sample, workdir) -> None:
  writer.write_scalars(step, {f'eval/{k}': v for k, v in metrics.items()})
  grid = trainer.prediction_grid(sample)
  writer.write_images(step, {'eval/predictions': grid[None]})
  if jax.process_index() == 0:
    reporting.save_png(epath.Path(workdir) / 'predictions' / f'step_{step:07d}.png', grid)
  logging.info('eval @%d: %s', step, ', '.join(
      f'{k}={v:.4g}' for k, v in metrics.items() if k.split('/')[-1] in _MAIN_METRICS))


_MAIN_METRICS = ('miou', 'maxf', 'mean', 'rmse', 'loss', 'rmse_predict_mean', 'odsF')


def train_and_evaluate(config, workdir, devices=None) -> dict[str, float]:
  """Trains (resuming from WORKDIR/checkpoints if present); returns the last eval metrics.

  `devices` (default: all) restricts the mesh, e.g. for tests comparing device counts.
  """
  trainer = Trainer(config, workdir, devices)
  workdir = trainer.workdir
  train_iter = input_pipeline.make_train_iterator(config, trainer.tasks, source=trainer.train_source)
  eval_iter, _ = input_pipeline.make_eval_iterator(
      config, trainer.tasks, config.dataset.eval_split, source=trainer.eval_source)

  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  ckpt = checkpoint.Checkpointer(workdir / 'checkpoints', max_to_keep=config.keep_checkpoints)
  writer = reporting.create_writer(workdir)

  latest = ckpt.latest_step()
  if latest is not None:
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            trainer.abstract_state, trainer.state_sharding)
    state = TrainState(**ckpt.restore(latest, abstract.as_dict(), train_iter))
    reporting.truncate_metrics(workdir, latest)
    logging.info('Resumed from %s at step %d', ckpt.directory, latest)
  else:
    state = trainer.init_state()
  _log_parameters(state, writer, write_scalars=latest is None)

  step, total = int(state.step), config.total_steps
  eval_metrics = {}
  if step == 0 and config.eval_at_start:
    eval_metrics, sample = trainer.evaluate(state, eval_iter)
    _write_eval(writer, 0, trainer, eval_metrics, sample, workdir)
    writer.flush()

  report = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                           every_steps=config.log_every_steps, every_secs=None)
  window, t0, window_start = [], time.perf_counter(), step
  logging.info('Training steps %d..%d, global batch %d on %d devices (mesh %s)', step + 1, total,
               config.batch_size, jax.device_count(), dict(trainer.mesh.shape))
  while step < total:
    batch = sharding.global_batch(next(train_iter), trainer.mesh)
    state, scalars = trainer.train_step(state, trainer.rest, batch)
    step += 1
    window.append(scalars)
    report(step)

    if step % config.log_every_steps == 0 or step == total:
      means = {k: float(np.mean(v)) for k, v in jax.device_get(
          jax.tree.map(lambda *xs: jnp.stack(xs), *window)).items()}
      if not np.isfinite(means['loss']):
        raise FloatingPointError(f'training loss is {means["loss"]} at step {step}')
      writer.write_scalars(step, {f'train/{k}': v for k, v in means.items()})
      dt = time.perf_counter() - t0
      steps_per_sec = (step - window_start) / max(dt, 1e-9)
      eta = (total - step) / max(steps_per_sec, 1e-9)
      logging.info('step %d/%d | loss %.4f | %.2f steps/s | %.1f img/s | ETA %s', step, total,
                   means['loss'], steps_per_sec, steps_per_sec * config.batch_size,
                   time.strftime('%H:%M:%S', time.gmtime(eta)))
      window = []

    if step % config.eval_every_steps == 0 or step == total:
      with report.timed('eval'):
        eval_metrics, sample = trainer.evaluate(state, eval_iter)
      _write_eval(writer, step, trainer, eval_metrics, sample, workdir)

    if step % config.checkpoint_every_steps == 0 or step == total:
      with report.timed('checkpoint'):
        ckpt.save(step, state.as_dict(), train_iter, config.to_dict())
    writer.flush()
    if not window:  # restart the speed window after logging / eval / checkpointing
      t0, window_start = time.perf_counter(), step

  ckpt.wait()
  ckpt.close()
  writer.close()
  return eval_metrics


def evaluate_checkpoint(config, workdir) -> dict[str, float]:
  """Evaluates WORKDIR's latest checkpoint, else `config.init_from`.

  Writes the eval/* scalars to TensorBoard and WORKDIR/eval_metrics.jsonl (at the checkpoint's
  step, 0 for init_from), the prediction grid to WORKDIR/predictions/step_*.png and, with
  ``config.save_predictions``, WORKDIR/predictions/<task>/<id>.png.
  """
  trainer = Trainer(config, workdir)
  step = checkpoint.latest_step(trainer.workdir / 'checkpoints')
  if step is None and not config.init_from:
    raise ConfigError(f'no checkpoint in {os.fspath(trainer.workdir)} and no config.init_from; '
                      'train first or pass --config.init_from=CHECKPOINT')
  eval_iter, _ = input_pipeline.make_eval_iterator(
      config, trainer.tasks, config.dataset.eval_split, source=trainer.eval_source)
  state = trainer.init_state(trainer.workdir if step is not None else config.init_from)
  writer = reporting.create_writer(trainer.workdir, jsonl=reporting.EVAL_METRICS_FILE)
  metrics, sample = trainer.evaluate(state, eval_iter)
  _write_eval(writer, step or 0, trainer, metrics, sample, trainer.workdir)
  writer.close()
  return metrics
