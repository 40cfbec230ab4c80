"""Device mesh and declarative sharding rules (big_vision style, docs/anchors.md §1.1).

The mesh comes from `config.mesh`, a sequence of (axis name, size) with one size -1 meaning "all
remaining devices", e.g. ``(('data', -1),)`` or ``(('data', 2), ('fsdp', 4))``. Batches are split
along their leading dimension over every mesh axis. Parameters (and optimizer state) are placed by
`config.param_sharding`, a sequence of (regex, spec) rules matched with `re.search` against the
'/'-joined path of each leaf; the first match wins and unmatched leaves are replicated. A spec is:

* ``'replicate'``;
* ``'fsdp:<axis>'``: shard the largest dimension divisible by that axis' size (replicate if none);
* a tuple of axis names / None, used as the PartitionSpec.
"""

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(mesh_spec: Sequence[tuple[str, int]], devices=None) -> Mesh:
  """Builds a Mesh over `devices` (default: all global devices) from (name, size) pairs."""
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(name for name, _ in mesh_spec)
  sizes = [int(size) for _, size in mesh_spec]
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh {tuple(mesh_spec)} has more than one -1 axis')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'config.mesh {tuple(mesh_spec)} does not divide {len(devices)} devices')
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f'config.mesh {tuple(mesh_spec)} needs {int(np.prod(sizes))} devices, '
                     f'{len(devices)} are available (fix --config.mesh)')
  # Auto axes: XLA propagates shardings through the step (GSPMD); only inputs/outputs are given.
  axis_types = (jax.sharding.AxisType.Auto,) * len(names)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(tuple(sizes), names, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(sizes), names, axis_types=axis_types)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every mesh axis."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def path_str(path) -> str:
  """'/'-joined key path of a pytree leaf (dict keys, attributes, sequence indices)."""
  parts = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return '/'.join(parts)


def _spec_for(shape: tuple[int, ...], spec: Any, mesh: Mesh) -> P:
  if spec == 'replicate':
    return P()
  if isinstance(spec, str) and spec.startswith('fsdp:'):
    axis = spec.split(':', 1)[1]
    size = mesh.shape[axis]
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[dim] % size == 0 and shape[dim] >= size:
        axes = [None] * len(shape)
        axes[dim] = axis
        return P(*axes)
    return P()
  if isinstance(spec, (tuple, list)):
    return P(*spec)
  raise ValueError(f'unknown sharding spec {spec!r}; use "replicate", "fsdp:<axis>" or a tuple')


def tree_shardings(tree, rules: Sequence[tuple[str, Any]], mesh: Mesh):
  """NamedSharding for every array leaf of `tree` (arrays or ShapeDtypeStructs) from `rules`."""
  compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

  def leaf_sharding(path, leaf):
    name = path_str(path)
    shape = tuple(getattr(leaf, 'shape', ()))
    for pattern, spec in compiled:
      if pattern.search(name):
        return NamedSharding(mesh, _spec_for(shape, spec, mesh))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def bytes_per_device(tree, shardings) -> tuple[int, int]:
  """(bytes one device holds, bytes of one full copy) of the array leaves of `tree` (arrays or
  ShapeDtypeStructs) placed by `shardings` (tree_shardings)."""
  leaves = jax.tree.leaves(tree)
  full = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
  held = sum(int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
             for x, s in zip(leaves, jax.tree.leaves(shardings)))
  return held, full


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles process-local batches into global arrays sharded along the batch axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
