"""Helpers of the builders that read a manually downloaded dataset (pascal_context, nyud_v2).

Finding the dataset root in `--manual_dir` (the folder itself, a known sub-folder or a known
archive, extracted by TFDS), checking that every id has all its files before anything is written,
wrapping decode failures into one error naming the file, and warning when a split's size differs
from the published one (docs/datasets_metrics.md §1, §2, §6).
"""

import contextlib
import io
from typing import Callable, Iterable, Mapping, Sequence

from absl import logging
import cv2
from etils import epath
import numpy as np
from PIL import Image
from skimage import morphology


class ManualDataError(ValueError):
  """A file of the manually downloaded dataset is missing or cannot be decoded."""


def find_root(dl_manager, is_root: Callable[[epath.Path], bool], folders: Sequence[str],
              archives: Sequence[str], instructions: str) -> epath.Path:
  """The dataset root: `manual_dir` itself, `manual_dir/<folder>`, or inside an extracted archive.

  An archive `manual_dir/<archive>` is extracted by TFDS (once, into the download directory) and
  searched the same way (its top folder, or the extraction folder itself).
  """
  manual_dir = epath.Path(dl_manager.manual_dir)
  candidates = [manual_dir] + [manual_dir / f for f in folders]
  for path in candidates:
    if path.is_dir() and is_root(path):
      return path
  for name in archives:
    archive = manual_dir / name
    if archive.exists():
      extracted = epath.Path(dl_manager.extract(archive))
      for path in [extracted] + [extracted / f for f in folders] + sorted(extracted.iterdir()):
        if path.is_dir() and is_root(path):
          return path
      raise ManualDataError(f'{archive} was extracted to {extracted}, but it holds no dataset '
                            f'root ({", ".join(folders)} or a folder with the layout below).\n'
                            f'{instructions}')
  raise ManualDataError(f'no dataset found in --manual_dir={manual_dir}: looked for the folders '
                        f'{", ".join(str(c) for c in candidates)} and the archives '
                        f'{", ".join(archives)}.\n{instructions}')


def read_ids(path: epath.Path) -> list[str]:
  """Ids of a split file (one per line, blank lines skipped)."""
  if not path.exists():
    raise ManualDataError(f'split file {path} is missing')
  return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def check_files(ids: Iterable[str], files: Callable[[str], Iterable[epath.Path]],
                what: str) -> None:
  """Raises one ManualDataError listing every missing file of `ids` (`files(id)`: required)."""
  missing = [path for i in ids for path in files(i) if not path.exists()]
  if missing:
    shown = '\n  '.join(str(p) for p in missing[:20])
    more = f'\n  ... and {len(missing) - 20} more' if len(missing) > 20 else ''
    raise ManualDataError(f'{len(missing)} file(s) of {what} are missing, e.g.\n  {shown}{more}\n'
                          'The download is incomplete or not in the layout of this builder '
                          'config (see its README.md).')


def log_split_sizes(dataset: str, sizes: Mapping[str, int], published: Mapping[str, int]) -> None:
  """Logs split sizes; warns for each split whose size differs from the published one."""
  logging.info('%s split sizes: %s', dataset, ', '.join(f'{k} {v}' for k, v in sizes.items()))
  for split, size in sizes.items():
    if split in published and size != published[split]:
      logging.warning('%s: split %r has %d examples, the published split has %d; metrics will not '
                      'be comparable with published numbers.', dataset, split, size,
                      published[split])


@contextlib.contextmanager
def decoding(path: epath.Path):
  """Re-raises any failure inside the block as a ManualDataError naming `path`."""
  try:
    yield
  except ManualDataError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ManualDataError(f'cannot decode {path}: {type(e).__name__}: {e} (corrupt or truncated '
                          'file? re-extract it from the archive)') from e


def load_png(path: epath.Path, channels: int) -> np.ndarray:
  """`np.array(PIL.Image.open(path))` as the references load labels (palette PNGs give indices).

  Raises ManualDataError when the image does not have `channels` channels.
  """
  with decoding(path):
    with Image.open(io.BytesIO(path.read_bytes())) as image:
      array = np.array(image)
  if (array.ndim == 2) != (channels == 1) or (channels > 1 and array.shape[-1] != channels):
    raise ManualDataError(f'{path}: expected a {channels}-channel image, got shape {array.shape}')
  return array


def image_bytes(path: epath.Path) -> tuple[bytes, tuple[int, int]]:
  """(encoded RGB image, (H, W)) for a tfds Image feature, as `PIL.Image.open(path).convert('RGB')`.

  RGB JPEG/PNG files are stored as they are (no re-encoding); other modes (grey, CMYK, palette)
  are converted by PIL and stored as PNG.
  """
  with decoding(path):
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.mode == 'RGB' and image.format in ('JPEG', 'PNG'):
        return data, (image.height, image.width)
      return png(np.array(image.convert('RGB'))), (image.height, image.width)


def fit(array: np.ndarray, shape: tuple[int, int], interpolation: int, path) -> np.ndarray:
  """Resizes a label map to the image size as the reference loaders do (with a warning).

  The references resize every label whose size differs from the image's (nearest; normals
  cubic); the released archives never need it.
  """
  if array.shape[:2] == tuple(shape):
    return array
  logging.warning('%s has size %s, its image %s: resized as the reference loaders do.', path,
                  array.shape[:2], tuple(shape))
  return cv2.resize(array, tuple(shape[::-1]), interpolation=interpolation)


def png(array: np.ndarray) -> bytes:
  """PNG bytes of a uint8 (H, W), (H, W, 1) or (H, W, 3) array (Image features need no TF)."""
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buffer, format='PNG')
  return buffer.getvalue()


def thin(mask: np.ndarray) -> np.ndarray:
  """`skimage.morphology.thin` (1-px wide boundaries, as the references) as uint8 {0, 1}."""
  return morphology.thin(mask).astype(np.uint8)
