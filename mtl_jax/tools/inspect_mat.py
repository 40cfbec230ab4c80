r"""Tree of the variables of a MATLAB .mat file: shapes, dtypes, min / max and short previews.

  python -m mtl_jax.tools.inspect_mat splits.mat
  python -m mtl_jax.tools.inspect_mat nyu_depth_v2_labeled.mat --max-depth=2 --max-preview=5
  python -m mtl_jax.tools.inspect_mat PASCAL_MT/human_parts/2008_000003.mat --max-depth=6

The port of the user fork's `scripts/inspect_mat.py` (docs/user_fork.md §7 "Other tools"), used to
look into the datasets' .mat files (docs/user_fork.md §6: NYUD-v2's splits.mat and labelled .mat;
PASCAL-Part annotations). Files up to v7.2 (v4, v5/v7 headers) are read with `scipy.io.loadmat`
(shapes as MATLAB shows them), v7.3 files (HDF5, recognised by the HDF5 signature; MATLAB's own
start with a 'MATLAB 7.3' text header) with h5py, whose shapes are MATLAB's reversed (column-major
storage; both are printed). Structs and cell arrays are followed down to `--max-depth` levels, at
most `--max-preview` items each; numeric arrays show min / max (NaNs ignored; v7.3 datasets are
read in chunks) and their first `--max-preview` values in storage order.
"""

import math
import os
import sys

import numpy as np

from mtl_jax.tools import tool_args

HDF5_SIGNATURE = b'\x89HDF\r\n\x1a\n'
_CHUNK_BYTES = 64 << 20  # min / max of v7.3 datasets: read at most this much at a time
_META = ('__header__', '__version__', '__globals__')


def _preview(flat, max_preview: int) -> str:
  """'[v0, v1, ...]' of the first `max_preview` items of a 1-d array."""
  items = [x.item() if hasattr(x, 'item') else x for x in flat[:max_preview]]
  items = [round(x, 6) if isinstance(x, float) else x for x in items]
  return f'{items}{" ..." if flat.size > max_preview else ""}'


def _is_numeric(dtype) -> bool:
  return dtype.kind in 'biuf'


def _range(array: np.ndarray) -> str:
  """' min=.. max=..' of a numeric array (NaNs ignored), '' otherwise."""
  if not array.size or not _is_numeric(array.dtype):
    return ''
  values = array.astype(np.uint8) if array.dtype == bool else array
  if values.dtype.kind == 'f':
    finite = values[~np.isnan(values)]
    if not finite.size:
      return ' min=nan max=nan (all NaN)'
    values = finite
  return f' min={values.min().item()!r} max={values.max().item()!r}'


def _strings(array: np.ndarray) -> list[str]:
  return [str(s) for s in array.ravel()]


class _Printer:
  """Collects the report's lines; `level` is the tree depth (2 spaces each)."""

  def __init__(self, max_depth: int, max_preview: int):
    self.max_depth, self.max_preview, self.lines = max_depth, max_preview, []

  def line(self, level: int, text: str) -> None:
    self.lines.append('  ' * level + text)

  def deeper(self, level: int, count: int, what: str) -> bool:
    """Whether the `count` children at `level + 1` are shown (else a '...' line)."""
    if level + 1 > self.max_depth:
      self.line(level + 1, f'... {count} {what} below --max-depth={self.max_depth}')
      return False
    return True

  def more(self, level: int, total: int) -> None:
    if total > self.max_preview:
      self.line(level, f'... {total - self.max_preview} more (--max-preview={self.max_preview})')

  # ---- scipy.io.loadmat values (v4 .. v7.2) ----

  def scipy_value(self, name: str, value, level: int) -> None:
    from scipy import sparse  # pylint: disable=g-import-not-at-top
    from scipy.io import matlab  # pylint: disable=g-import-not-at-top
    if isinstance(value, matlab.mat_struct):
      fields = list(value._fieldnames)  # pylint: disable=protected-access
      self.line(level, f'{name}: struct, fields: {", ".join(fields) or "(none)"}')
      if fields and self.deeper(level, len(fields), 'fields'):
        for field in fields:
          self.scipy_value(field, getattr(value, field), level + 1)
    elif sparse.issparse(value):
      self.line(level, f'{name}: sparse {value.dtype} {value.shape} nnz={value.nnz}'
                f'{_range(value.data)}')
    elif isinstance(value, np.ndarray) and value.dtype == object:
      self._scipy_container(name, value, level)
    elif isinstance(value, np.ndarray) and value.dtype.names:  # struct_as_record arrays
      fields = ', '.join(value.dtype.names)
      self.line(level, f'{name}: struct array {value.shape}, fields: {fields}')
    elif isinstance(value, np.ndarray) and value.dtype.kind == 'U':
      texts = _strings(value)
      self.line(level, f'{name}: char {value.shape} ' + (
          repr(texts[0][:200]) if len(texts) == 1 else _preview(np.array(texts), self.max_preview)))
    elif isinstance(value, np.ndarray):
      self.line(level, f'{name}: {value.dtype} {value.shape}{_range(value)}')
      if value.size:
        self.line(level + 1, 'preview: ' + _preview(value.ravel(), self.max_preview))
    else:
      self.line(level, f'{name}: {type(value).__name__} {str(value)[:200]!r}')

  def _scipy_container(self, name: str, value: np.ndarray, level: int) -> None:
    items = value.ravel()
    if items.size and all(type(x).__name__ == 'mat_struct' for x in items) and items.size > 1:
      what = 'struct array'
    else:
      what = 'cell'
    if items.size == 1 and what == 'cell' and type(items[0]).__name__ == 'mat_struct':
      return self.scipy_value(name, items[0], level)  # a 1x1 struct
    self.line(level, f'{name}: {what} {value.shape}')
    if items.size and self.deeper(level, items.size, 'items'):
      for i, item in enumerate(items[:self.max_preview]):
        self.scipy_value(f'{{{i}}}', item, level + 1)
      self.more(level + 1, items.size)

  # ---- h5py objects (v7.3) ----

  def hdf5_object(self, f, name: str, obj, level: int) -> None:
    import h5py  # pylint: disable=g-import-not-at-top
    attrs = obj.attrs
    matlab_class = attrs.get('MATLAB_class', b'')
    matlab_class = matlab_class.decode() if isinstance(matlab_class, bytes) else str(matlab_class)
    if isinstance(obj, h5py.Group):
      keys = list(obj.keys())
      if 'MATLAB_sparse' in attrs:
        self.line(level, f'{name}: sparse {matlab_class} ({attrs["MATLAB_sparse"]} rows), '
                  f'nnz={obj["data"].shape[0] if "data" in obj else 0}')
        return
      what = 'struct' if matlab_class == 'struct' else 'group'
      self.line(level, f'{name}: {what}, {"fields" if what == "struct" else "keys"}: '
                f'{", ".join(keys) or "(none)"}')
      if keys and self.deeper(level, len(keys), 'members'):
        for key in keys:
          self.hdf5_object(f, key, obj[key], level + 1)
      return
    if not isinstance(obj, h5py.Dataset):
      self.line(level, f'{name}: {type(obj).__name__}')
      return
    shape = obj.shape
    matlab_shape = ' x '.join(map(str, shape[::-1])) or 'scalar'
    label = f'{name}: {matlab_class + " " if matlab_class else ""}dataset {obj.dtype} {shape} ' \
            f'(MATLAB {matlab_shape})'
    if attrs.get('MATLAB_empty', 0):
      self.line(level, f'{name}: {matlab_class} empty (MATLAB dims {np.asarray(obj).tolist()})')
    elif h5py.check_dtype(ref=obj.dtype) is not None:  # cell array: object references
      refs = np.asarray(obj).ravel()
      self.line(level, label.replace('dataset object', 'references', 1))
      if refs.size and self.deeper(level, refs.size, 'items'):
        for i, ref in enumerate(refs[:self.max_preview]):
          if ref:
            self.hdf5_object(f, f'{{{i}}}', f[ref], level + 1)
          else:
            self.line(level + 1, f'{{{i}}}: null reference')
        self.more(level + 1, refs.size)
    elif matlab_class == 'char' and obj.dtype.kind in 'ui':
      rows = [''.join(map(chr, r)) for r in np.atleast_2d(np.asarray(obj)).T]
      text = repr(rows[0][:200]) if len(rows) == 1 else _preview(np.array(rows), self.max_preview)
      self.line(level, f'{name}: char (MATLAB {matlab_shape}) {text}')
    else:
      self.line(level, label + (self._hdf5_range(obj) if _is_numeric(obj.dtype) else ''))
      if obj.size:
        self.line(level + 1, 'preview: ' + _preview(self._hdf5_head(obj), self.max_preview))

  def _hdf5_head(self, ds) -> np.ndarray:
    """The first max_preview values in storage order, reading whole rows of axis 0."""
    if not ds.shape:
      return np.asarray(ds[()]).ravel()
    per_row = math.prod(ds.shape[1:]) or 1
    return np.asarray(ds[:max(1, math.ceil(self.max_preview / per_row))]).ravel()

  @staticmethod
  def _hdf5_range(ds) -> str:
    """min / max of a numeric dataset, read in chunks along axis 0."""
    if not ds.size:
      return ''
    if not ds.shape:
      return _range(np.asarray(ds[()]).reshape(1))
    row_bytes = max(1, math.prod(ds.shape[1:]) * ds.dtype.itemsize)
    step = max(1, _CHUNK_BYTES // row_bytes)
    lo, hi = [], []
    for start in range(0, ds.shape[0], step):
      block = np.asarray(ds[start:start + step])
      block = block.astype(np.uint8) if block.dtype == bool else block
      if block.dtype.kind == 'f':
        block = block[~np.isnan(block)]
      if block.size:
        lo.append(block.min())
        hi.append(block.max())
    if not lo:
      return ' min=nan max=nan (all NaN)'
    return f' min={min(lo).item()!r} max={max(hi).item()!r}'


def mat_kind(path: str) -> str:
  """'v7.3' (HDF5), 'v5' (v5 .. v7.2 header) or 'v4'; ToolError for anything else."""
  if not os.path.isfile(path):
    raise tool_args.ToolError(f'{path} does not exist or is not a file; pass the path of a .mat '
                              'file')
  import h5py  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    header = f.read(128)
  if header.startswith(HDF5_SIGNATURE) or h5py.is_hdf5(path):
    return 'v7.3'
  if header.startswith(b'MATLAB 7.3'):
    raise tool_args.ToolError(f'{path} has a MATLAB 7.3 header but no HDF5 data (truncated '
                              'download?); copy the file again')
  from scipy.io import matlab  # pylint: disable=g-import-not-at-top
  try:
    with open(path, 'rb') as f:
      major, _ = matlab.matfile_version(f)
  except Exception:  # pylint: disable=broad-except  (scipy raises ValueError / TypeError / ...)
    raise tool_args.ToolError(f'{path} is not a MAT-file (neither a MATLAB v4-v7.2 header nor '
                              'an HDF5 signature); pass a file saved by MATLAB / scipy.io.savemat'
                              ) from None
  return 'v4' if major == 0 else 'v5'


def inspect(path: str, max_depth: int = 5, max_preview: int = 10) -> str:
  """The report of `path` (ToolError when it is not a readable MAT-file)."""
  kind = mat_kind(path)
  printer = _Printer(max_depth, max_preview)
  if kind == 'v7.3':
    import h5py  # pylint: disable=g-import-not-at-top
    with open(path, 'rb') as f:
      header = f.read(116).split(b'\0')[0].decode('latin-1').strip()
    matlab_header = header.startswith('MATLAB 7.3')
    printer.line(0, f'{path}: MATLAB v7.3 (HDF5, read with h5py)' +
                 (f'; header {header!r}' if matlab_header else '; no MATLAB header (a plain '
                                                               'HDF5 file?)'))
    try:
      with h5py.File(path, 'r') as f:
        keys = [k for k in f.keys() if k not in ('#refs#', '#subsystem#')]
        printer.line(0, f'variables: {", ".join(keys) or "(none)"}')
        for key in keys:
          printer.hdf5_object(f, key, f[key], 0)
    except OSError as e:
      raise tool_args.ToolError(f'cannot read {path} with h5py ({e}); the file is probably '
                                'truncated, copy it again') from None
    return '\n'.join(printer.lines)
  import scipy.io  # pylint: disable=g-import-not-at-top
  try:
    data = scipy.io.loadmat(path, squeeze_me=False, struct_as_record=False)
  except Exception as e:  # pylint: disable=broad-except
    raise tool_args.ToolError(f'scipy.io.loadmat cannot read {path} ({type(e).__name__}: {e}); '
                              'the file is probably truncated or corrupt') from None
  header = data.get('__header__', b'')
  header = header.decode('latin-1') if isinstance(header, bytes) else str(header)
  version = {'v4': 'v4', 'v5': 'v5 .. v7.2'}[kind]
  printer.line(0, f'{path}: MATLAB {version} (read with scipy.io.loadmat)' +
               (f'; header {header.strip()!r}' if header else ''))
  keys = [k for k in data if k not in _META]
  printer.line(0, f'variables: {", ".join(keys) or "(none)"}')
  for key in keys:
    printer.scipy_value(key, data[key], 0)
  return '\n'.join(printer.lines)


def main(argv=None) -> int:
  parser = tool_args.Parser(prog='python -m mtl_jax.tools.inspect_mat',
                            description=__doc__)
  parser.add_argument('file', help='the .mat file')
  parser.add_argument('--max-depth', '--max_depth', type=int, default=5, dest='max_depth',
                      help='levels of structs / cells to follow (default 5)')
  parser.add_argument('--max-preview', '--max_preview', type=int, default=10, dest='max_preview',
                      help='values and items shown per array / cell (default 10)')
  args, code = tool_args.parse(parser, argv)
  if args is None:
    return code
  try:
    if args.max_depth < 0 or args.max_preview < 1:
      raise tool_args.ToolError('--max-depth must be >= 0 and --max-preview >= 1')
    report = inspect(args.file, args.max_depth, args.max_preview)
  except tool_args.ToolError as e:
    return tool_args.report(e)
  print(report)
  return 0


def cli():
  """Entry point of the console script (pyproject.toml) and of `python -m`."""
  sys.exit(main())


if __name__ == '__main__':
  cli()
