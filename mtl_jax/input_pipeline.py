"""TFDS data sources and grain input pipelines (docs/stack.md §2-3, docs/mlore.md §5.1,
docs/mtlora.md §8).

Every process reads its own slice of the split and yields **process-local** batches: numpy dicts
with ``'image'`` float32 (B, H, W, 3), one label per task in the mtl_jax format (mtl_jax/tasks.py),
and ``'example_valid'`` bool (B,), where B = global batch size // jax.process_count().

Config keys read:

* ``config.seed``: shuffling and augmentation seed (combined with the process index).
* ``config.batch_size``: global training batch size.
* ``config.eval_batch_size``: global evaluation batch size (None or 0: ``config.batch_size``).
* ``config.dataset.name``: TFDS name[/builder config], e.g. ``'synthetic_scenes/small'``.
* ``config.dataset.data_dir``: TFDS data directory (None: the TFDS default).
* ``config.dataset.train_split`` / ``config.dataset.eval_split``: TFDS split names.
* ``config.dataset.build_if_missing``: build a missing dataset instead of raising.
* ``config.input.augment``: the augmentation chain of mtl_jax/transforms.py, ``'mlore'``
  (random scale, crop, flip, colour jitter; eval pads) or ``'mtlora'`` (flip, scale and rotate,
  resize; eval resizes).
* ``config.input.crop_size``: (H, W) of every batch ('mlore': train crop and eval pad size;
  'mtlora': the size everything is resized to).
* ``config.input.scale_range``: (lo, hi) of the random scale factor; (1, 1) disables scaling.
* ``config.input.flip``: enables the random horizontal flip.
* 'mlore' only: ``config.input.cat_max_ratio`` (RandomCrop class-balance threshold; 1 disables the
  redraws), ``config.input.photometric`` (enables the colour jitter).
* 'mtlora' only: ``config.input.rotation_range`` ((lo, hi) degrees; (0, 0) disables rotation),
  ``config.input.scale_choices`` (non-empty: the scale is drawn from these instead of
  ``scale_range``).
* ``config.input.num_workers``: grain worker processes (0: threads of the calling process only).
"""

import importlib
import importlib.util
import math
import os

from absl import logging
import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from mtl_jax import ConfigError
from mtl_jax import transforms

# Per process: 4 threads read and transform batches; at most 4 batches wait (bounds memory).
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)


class DatasetNotBuiltError(ConfigError):
  """The TFDS dataset is not prepared in the data directory."""


def _split_name(name: str) -> tuple[str, str | None]:
  """'builder/config:version' -> ('builder', 'config' or None)."""
  base, _, config = name.split(':')[0].partition('/')
  return base, config or None


def _register_builder(base: str) -> None:
  """Imports data_builders.<base> (the repo's own TFDS builders) when it exists."""
  module = f'data_builders.{base}'
  if importlib.util.find_spec('data_builders') and importlib.util.find_spec(module):
    importlib.import_module(module)


def open_data_source(dataset_cfg, split: str):
  """The random-access TFDS data source (array_record) of `split`.

  Builds the dataset first when it is missing and ``dataset_cfg.build_if_missing`` is set; raises
  DatasetNotBuiltError naming the build command otherwise.
  """
  name = dataset_cfg.name
  base, builder_config = _split_name(name)
  _register_builder(base)
  data_dir = dataset_cfg.data_dir or tfds.core.constants.get_default_data_dir()
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except ValueError as e:  # unknown dataset or builder config (TFDS lists candidates below)
    raise ConfigError(f'cannot open TFDS dataset {name!r}: {str(e).splitlines()[0]} '
                      '(fix --config.dataset.name)') from e
  if not builder.is_prepared():
    if dataset_cfg.build_if_missing:
      logging.info('Building TFDS dataset %s in %s (config.dataset.build_if_missing=True).',
                   name, data_dir)
      builder.download_and_prepare(file_format='array_record')
    else:
      # `tfds build` with the same arguments (data_builders/build.py says why it exists).
      fix = f'python -m data_builders.build data_builders/{base}'
      if builder_config:
        fix += f' --config={builder_config}'
      fix += f' --data_dir={data_dir} --file_format=array_record'
      manual = bool(builder.MANUAL_DOWNLOAD_INSTRUCTIONS)
      if manual:
        fix += ' --manual_dir=<directory holding the downloaded archive>'
      msg = f'TFDS dataset {name!r} is not built in {data_dir}; build it with `{fix}`'
      if not manual:
        msg += ' or set --config.dataset.build_if_missing=True'
      raise DatasetNotBuiltError(msg)
  splits = list(builder.info.splits)
  try:
    builder.info.splits[split]  # also accepts slices such as 'train[:10]'
  except (KeyError, ValueError) as e:
    raise ConfigError(f'unknown split {split!r} of dataset {name!r}; available splits: '
                      f'{", ".join(splits)} (fix config.dataset.train_split/eval_split)') from e
  check_shards(builder, split)
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


def check_shards(builder, split: str) -> None:
  """Every array_record shard of `split` opens and holds the records dataset_info lists
  (cheap: each file's footer); a missing, truncated or foreign file is a ConfigError naming it
  (docs/faults.md §4)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  info = builder.info.splits[split.split('[')[0]]
  rebuild = (f'rebuild the dataset (python -m data_builders.build ... --data_dir='
             f'{builder.data_dir}) or restore the file')
  for path, want in zip(info.filepaths, info.shard_lengths):
    try:
      reader = array_record_module.ArrayRecordReader(os.fspath(path))
      try:
        got = reader.num_records()
      finally:
        reader.close()
    except Exception as e:  # pylint: disable=broad-except  (riegeli / OS errors)
      reason = next((l for l in str(e).splitlines() if l.strip()), type(e).__name__)[:200]
      raise ConfigError(f'{os.fspath(path)}: unreadable shard of {builder.info.full_name} '
                        f'({reason}); {rebuild}') from None
    if got != want:
      raise ConfigError(f'{os.fspath(path)}: {got} records, dataset_info lists {want}; {rebuild}')


def _local_batch_size(global_batch: int, process_count: int, key: str) -> int:
  if global_batch <= 0 or global_batch % process_count:
    raise ConfigError(f'{key}={global_batch} must be a positive multiple of the number of '
                      f'processes ({process_count})')
  return global_batch // process_count


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  return process_index, process_count


def _maybe_workers(ds: grain.IterDataset, num_workers: int) -> grain.IterDataset:
  if num_workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


AUGMENTATIONS = ('mlore', 'mtlora')


def _augment(config) -> str:
  augment = config.input.augment
  if augment not in AUGMENTATIONS:
    raise ConfigError(f'unknown config.input.augment {augment!r}; known: '
                      f'{", ".join(AUGMENTATIONS)} (set --config.input.augment)')
  return augment


def _train_transform(config, tasks) -> grain.transforms.RandomMap:
  """The training chain of ``config.input.augment`` (mtl_jax/transforms.py)."""
  inp = config.input
  if _augment(config) == 'mtlora':
    return transforms.MTLoRATrainTransform(
        tasks, inp.crop_size, rotation_range=inp.rotation_range, scale_range=inp.scale_range,
        scale_choices=inp.scale_choices, flip=inp.flip)
  return transforms.TrainTransform(
      tasks, inp.crop_size, scale_range=inp.scale_range, cat_max_ratio=inp.cat_max_ratio,
      flip=inp.flip, photometric=inp.photometric)


def eval_transform(config, tasks) -> grain.transforms.Map:
  """The evaluation chain of ``config.input.augment``: pad ('mlore') or resize ('mtlora').

  With `tasks` = {} it maps {'image': (h, w, 3) uint8} to the model input alone
  (mtl_jax/tools/predict.py).
  """
  crop_size = tuple(config.input.crop_size)
  if _augment(config) == 'mtlora':
    return transforms.MTLoRAEvalTransform(tasks, crop_size)
  return transforms.EvalTransform(tasks, crop_size)


def make_train_iterator(config, tasks, *, source=None, process_index=None, process_count=None):
  """Infinite, checkpointable iterator of process-local training batches (docs/stack.md §3).

  Pipeline: this process' slice of `source` (default: the ``config.dataset.train_split`` TFDS
  source) -> shuffle, reshuffled every epoch -> repeat forever -> the training chain of
  ``config.input.augment`` -> batch (drop remainder). The iterator has get_state()/set_state()
  and works with grain.checkpoint.CheckpointSave/CheckpointRestore.
  `process_index`/`process_count` override jax's (to simulate several processes in tests).
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch_size(config.batch_size, process_count, 'config.batch_size')
  transform = _train_transform(config, tasks)
  if source is None:
    source = open_data_source(config.dataset, config.dataset.train_split)
  shard = grain.MapDataset.source(source)[process_index::process_count]
  if len(shard) == 0:
    raise ConfigError(f'process {process_index} of {process_count} has no training examples '
                      f'({len(source)} in the split)')
  # Augmentations of different processes must not be correlated: seed each process differently.
  seed = int(np.random.SeedSequence([config.seed, process_index]).generate_state(1)[0])
  ds = (shard.seed(seed).shuffle().repeat()
        .random_map(transform)
        .batch(local_batch, drop_remainder=True)
        .to_iter_dataset(_READ_OPTIONS))
  return iter(_maybe_workers(ds, config.input.num_workers))


class _IndexedEval(grain.transforms.Map):
  """Split position i -> the eval chain's output for source[i], plus its identity: 'index' (i,
  int32) and 'original_size' ((h, w) of the stored image, int32), which per-example evaluators
  read (mtl_jax/evaluators)."""

  def __init__(self, source, transform: grain.transforms.Map):
    self.source = source
    self.transform = transform

  def map(self, index):
    element = self.source[int(index)]
    out = self.transform.map(element)
    out['index'] = np.asarray(index, np.int32)
    out['original_size'] = np.asarray(element['image'].shape[:2], np.int32)
    return out


class EvalBatches:
  """Re-iterable evaluation batches: each `iter()` starts a fresh pass over the split."""

  def __init__(self, dataset: grain.IterDataset, num_batches: int):
    self._dataset = dataset
    self.num_batches = num_batches

  def __iter__(self):
    return iter(self._dataset)

  def __len__(self) -> int:
    return self.num_batches


def make_eval_iterator(config, tasks, split: str, *, source=None, process_index=None,
                       process_count=None) -> tuple[EvalBatches, int]:
  """(re-iterable process-local batches, number of batches) of `split`, in a fixed order.

  Examples go through the evaluation chain of ``config.input.augment`` (padded or resized to
  ``config.input.crop_size``) and carry their split position ``index`` and ``original_size``
  (h, w). Process p gets examples p, p + P, p + 2P, ... followed by `transforms.dummy_example`
  padding (``example_valid`` False, every label ignore, index -1, size (0, 0)), so that every
  example is seen exactly once and every process yields the same number of batches.
  """
  process_index, process_count = _process(process_index, process_count)
  global_batch = config.get('eval_batch_size') or config.batch_size
  local_batch = _local_batch_size(global_batch, process_count, 'config.eval_batch_size')
  transform = eval_transform(config, tasks)
  if source is None:
    source = open_data_source(config.dataset, split)
  num_batches = math.ceil(len(source) / global_batch)
  crop_size = tuple(config.input.crop_size)
  positions = grain.MapDataset.range(len(source))[process_index::process_count]
  shard = positions.map(_IndexedEval(source, transform))
  padding = num_batches * local_batch - len(shard)
  if padding:
    dummy = dict(transforms.dummy_example(tasks, crop_size), index=np.asarray(-1, np.int32),
                 original_size=np.zeros(2, np.int32))
    dummies = grain.MapDataset.source([dummy] * padding)
    shard = grain.MapDataset.concatenate([shard, dummies])
  ds = shard.batch(local_batch).to_iter_dataset(_READ_OPTIONS)
  return EvalBatches(_maybe_workers(ds, config.input.num_workers), num_batches), num_batches
