"""Reads PyTorch `.pth` files without torch and without running pickled code (docs/stack.md §8).

`torch.save` writes a zip archive `<name>/data.pkl` + `<name>/data/<key>` (one raw little-endian
buffer per storage). `data.pkl` is a pickle whose tensors are calls to
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` on storages given by
persistent ids `('storage', torch.<Type>Storage, key, location, numel)`.

`load` unpickles with an allow-list: those rebuild functions (reimplemented here with
`np.frombuffer` + bounds-checked strides, so tensors come back as numpy arrays: fp32, fp16, bf16
via ml_dtypes, fp64, int64/32/16/8, uint8, bool), the storage types and `collections.OrderedDict`.
Every other global (a pickled yacs `CfgNode`, an argparse `Namespace`, `os.system` in a malicious
`__reduce__`) resolves to an inert `Opaque` class: calling, constructing or `__setstate__`-ing it
only records its arguments, so no code of the pickled class ever runs.
"""

import collections
import pickle
import zipfile

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_, 'UntypedStorage': np.uint8,
}


class Opaque:
  """An object of a class that is not allow-listed: keeps what the pickle said, runs nothing."""
  qualname = '?'

  def __new__(cls, *args, **kwargs):
    obj = super().__new__(cls)
    obj.args, obj.kwargs, obj.state, obj.items, obj.list = args, kwargs, None, {}, []
    return obj

  def __init__(self, *args, **kwargs):
    del args, kwargs  # recorded by __new__

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items[key] = value

  def append(self, value):
    self.list.append(value)

  def extend(self, values):
    self.list.extend(values)

  def __repr__(self):
    return f'<opaque {self.qualname}>'


class _StorageType:
  """Stands for `torch.<Type>Storage` in persistent ids."""

  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """`_rebuild_tensor_v2`: a copy of the strided view of `storage` (bounds checked)."""
  del unused  # requires_grad, backward_hooks, metadata
  if not isinstance(storage, np.ndarray):
    raise pickle.UnpicklingError(f'tensor without a storage ({type(storage).__name__})')
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or min(size + stride + (storage_offset,), default=0) < 0:
    raise pickle.UnpicklingError(f'bad tensor geometry size={size} stride={stride} '
                                 f'offset={storage_offset}')
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise pickle.UnpicklingError(f'tensor size={size} stride={stride} offset={storage_offset} '
                                 f'reads past its storage of {storage.size} elements')
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], size, [s * storage.itemsize for s in stride], writeable=False)
  return np.array(view)


def _rebuild_parameter(data, *unused):
  """`_rebuild_parameter(_with_state)`: an nn.Parameter is its data."""
  del unused
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  """Tensor subclasses / tensors with Python attributes: the plain tensor (attributes dropped)."""
  del new_type, state
  if func not in (_rebuild_tensor, _rebuild_parameter):
    return Opaque(func, args)
  return func(*args)


_ALLOWED = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
    ('torch', 'Size'): tuple,
}


class _Unpickler(pickle.Unpickler):
  """`find_class` is the only way a pickle reaches Python objects: it never imports anything."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
    super().__init__(file)
    self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
    self._storages = {}
    self._opaque_classes = {}

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[module, name]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    qualname = f'{module}.{name}'
    if qualname not in self._opaque_classes:
      self._opaque_classes[qualname] = type(name, (Opaque,), {'qualname': qualname})
    return self._opaque_classes[qualname]

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType)):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r} (only torch storages)')
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      dtype = storage_type.dtype.newbyteorder('<' if self._byteorder == 'little' else '>')
      raw = self._archive.read(f'{self._prefix}data/{key}')
      if len(raw) < numel * dtype.itemsize:
        raise pickle.UnpicklingError(f'storage {key}: {len(raw)} bytes for {numel} '
                                     f'{storage_type.name} elements')
      self._storages[key] = np.frombuffer(raw, dtype, count=numel).astype(
          storage_type.dtype, copy=False)
    return self._storages[key]


def load(path):
  """Unpickles the `torch.save` zip file at `path`; tensors come back as numpy arrays.

  Raises ValueError for files that are not torch zip archives (e.g. the legacy pre-1.6 format).
  """
  if not zipfile.is_zipfile(path):
    with open(path, 'rb') as f:
      head = f.read(4)
    if head.startswith(b'PK'):  # a zip whose end (central directory) is missing
      raise ValueError(f'{path} is a damaged zip archive (truncated download or copy?); fetch '
                       'or save it again')
    if head[:1] == b'\x80':  # a pickle: torch.save before torch 1.6
      raise ValueError(f'{path} is a legacy (pre-1.6) torch file; re-save it with '
                       'torch.save(torch.load(path), new_path) and convert that')
    raise ValueError(f'{path} is not a PyTorch checkpoint (torch.save zip archive)')
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith('data.pkl') and n.count('/') == 1]
    if len(pickles) != 1:
      raise ValueError(f'{path} is a zip file but not a torch.save archive (no <name>/data.pkl)')
    prefix = pickles[0][:-len('data.pkl')]
    names = set(archive.namelist())
    byteorder = (archive.read(prefix + 'byteorder').decode().strip()
                 if prefix + 'byteorder' in names else 'little')
    with archive.open(pickles[0]) as f:
      try:
        return _Unpickler(f, archive, prefix, byteorder).load()
      except (TypeError, AttributeError, IndexError, EOFError, RecursionError) as e:
        # A pickle that is not a plain checkpoint (e.g. calls chained on inert objects): it ran
        # nothing, and is reported as unreadable.
        raise ValueError(f'{path}: its data.pkl is not a plain checkpoint of tensors and '
                         f'containers ({type(e).__name__}: {e})') from None
