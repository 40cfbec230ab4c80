"""Orbax checkpoints: train state + grain iterator state + config, and weights-only loading.

A training checkpoint is a composite Orbax step directory ``WORKDIR/checkpoints/<step>/`` with the
items ``state`` (a dict ``{step, params, frozen, batch_stats, opt_state}`` of arrays, saved
sharded), ``data`` (the grain iterator position) and ``config`` (JSON). Saves are asynchronous and
atomic (an interrupted save leaves a temporary directory that Orbax ignores, docs/stack.md §6).

A weights checkpoint (written by converters, read by ``config.init_from``) uses the same layout
with only ``state = {params, batch_stats}``; `load_weights` also accepts training checkpoints, a
workdir or a checkpoints directory (latest step).
"""

from typing import Any

from absl import logging
from etils import epath
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from mtl_jax import ConfigError
from mtl_jax import sharding

STATE, DATA, CONFIG = 'state', 'data', 'config'


class Checkpointer:
  """Keeps the last `max_to_keep` training checkpoints of one workdir, and every one whose step
  is a multiple of `keep_period` (> 0)."""

  def __init__(self, directory, *, max_to_keep: int = 2, keep_period: int = 0,
               async_save: bool = True):
    self.directory = epath.Path(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_period or None,
            enable_async_checkpointing=async_save, create=True),
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA: grain.checkpoint.CheckpointHandler(),
                       CONFIG: ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def reload(self) -> None:
    """Re-reads the step list (after a step directory was set aside)."""
    self._manager.reload()

  def state_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """{leaf path: shape} of checkpoint `step`'s train state, from its metadata only."""
    return state_shapes(self.directory / str(step) / STATE)

  def save(self, step: int, state: dict[str, Any], data_iter, config: dict[str, Any]) -> None:
    """Starts an asynchronous save of `state`, the iterator position and the config."""
    self._manager.save(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        DATA: grain.checkpoint.CheckpointSave(data_iter),
        CONFIG: ocp.args.JsonSave(config)}), force=True)

  def restore(self, step: int, abstract_state, data_iter):
    """Restores `step` onto the shardings of `abstract_state`; sets `data_iter`'s position."""
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract_state),
        DATA: grain.checkpoint.CheckpointRestore(data_iter)}))
    return restored[STATE]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def state_shapes(item_dir) -> dict[str, tuple[int, ...]]:
  """{leaf path: shape} of the train state saved in `item_dir` (read from its metadata)."""
  metadata = ocp.PyTreeCheckpointer().metadata(epath.Path(item_dir)).item_metadata.tree
  flat = jax.tree_util.tree_flatten_with_path(
      metadata, is_leaf=lambda x: hasattr(x, 'shape') and not isinstance(x, dict))[0]
  return {sharding.path_str(p): tuple(v.shape) for p, v in flat}


def set_aside(directory, step: int) -> epath.Path:
  """Renames checkpoint `step` of `directory` to `unreadable-<step>` (kept for inspection,
  ignored by Orbax, never deleted); returns the new path."""
  source = epath.Path(directory) / str(step)
  target = epath.Path(directory) / f'unreadable-{step}'
  n = 1
  while target.exists():
    target, n = epath.Path(directory) / f'unreadable-{step}.{n}', n + 1
  source.rename(target)
  return target


def remove_stale_tmp(directory) -> None:
  """Removes the `*.orbax-checkpoint-tmp*` directories an interrupted save left behind."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return
  for path in sorted(directory.glob('*.orbax-checkpoint-tmp*')):
    logging.info('Removing %s, an unfinished save of an interrupted run', path)
    path.rmtree() if path.is_dir() else path.unlink()


def latest_step(directory) -> int | None:
  """The newest finished checkpoint step in `directory` (None if there is none or no directory)."""
  directory = epath.Path(directory)
  steps = ocp.utils.checkpoint_steps(directory) if directory.is_dir() else []
  return max(steps) if steps else None


def save_weights(directory, params: dict, batch_stats: dict,
                 metadata: dict[str, Any] | None = None) -> epath.Path:
  """Writes a weights-only checkpoint (step 0) for `config.init_from`; returns its step dir."""
  manager = ocp.CheckpointManager(
      epath.Path(directory), options=ocp.CheckpointManagerOptions(create=True),
      item_handlers={STATE: ocp.StandardCheckpointHandler(),
                     CONFIG: ocp.JsonCheckpointHandler()})
  manager.save(0, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardSave({'params': params, 'batch_stats': batch_stats}),
      CONFIG: ocp.args.JsonSave(metadata or {})}))
  manager.wait_until_finished()
  manager.close()
  return epath.Path(directory) / '0'


def locate(path, key: str = 'config.init_from') -> tuple[epath.Path, int]:
  """(checkpoints directory, step) of a workdir or checkpoints directory (its latest finished
  step) or of one step directory; FileNotFoundError naming `key` when there is none."""
  path = epath.Path(path)
  if (path / STATE).is_dir() and path.name.isdigit():
    return path.parent, int(path.name)
  if (path / 'checkpoints').is_dir():
    path = path / 'checkpoints'
  step = latest_step(path)
  if step is None:
    raise FileNotFoundError(f'no finished checkpoint in {str(path)!r} ({key}); give a workdir, a '
                            'checkpoints directory or one of its step directories')
  return path, step


def _state_item_dir(path) -> epath.Path:
  path = epath.Path(path)
  if (path / STATE).is_dir():
    return path / STATE
  directory, step = locate(path)
  return directory / str(step) / STATE


def load_weights(path) -> tuple[dict, dict]:
  """Reads (params, batch_stats) as host numpy trees from any checkpoint `path`.

  For training checkpoints the frozen parameters are merged back into `params`.
  """
  item_dir = _state_item_dir(path)
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(item_dir).item_metadata.tree
  wanted = {k: metadata[k] for k in ('params', 'frozen', 'batch_stats') if k in metadata}
  if 'params' not in wanted:
    raise ValueError(f'{str(item_dir)!r} holds no "params" (keys: {sorted(metadata)})')
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  restored = checkpointer.restore(
      item_dir, args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args,
                                            partial_restore=True))
  params = _merge(restored['params'], restored.get('frozen', {}))
  logging.info('Loaded weights from %s', item_dir)
  return params, restored.get('batch_stats', {})


def load_optimizer_state(path) -> tuple[int, dict[str, np.ndarray]]:
  """(step, {leaf path: array} of the optimizer state) of the training checkpoint at `path`."""
  item_dir = _state_item_dir(path)
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(item_dir).item_metadata.tree
  if 'opt_state' not in metadata:
    raise ConfigError(f'{str(item_dir)!r} is a weights-only checkpoint (no optimizer state); give '
                      'a training workdir or set --config.init_opt_state=False')
  wanted = {k: metadata[k] for k in ('step', 'opt_state')}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  restored = checkpointer.restore(
      item_dir, args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args,
                                            partial_restore=True))
  flat = jax.tree_util.tree_flatten_with_path(restored['opt_state'])[0]
  return int(restored['step']), {sharding.path_str(p): np.asarray(v) for p, v in flat}


def _merge(a: dict, b: dict) -> dict:
  """Deep union of two nested dicts with disjoint leaves."""
  out = dict(a)
  for k, v in b.items():
    out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out
