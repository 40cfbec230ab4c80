"""What every builder here declares alike: array_record output and the label feature types.

Records are array_record (random access for grain; no TensorFlow needed to write or read them)
unless `--file_format` asks otherwise. Label maps are single-channel PNG images, dense targets
zlib-compressed float32 tensors (the mtl_jax label format, docs/datasets_metrics.md §1.2).
"""

import numpy as np
import tensorflow_datasets as tfds


class ArrayRecordByDefault:
  """Builder mixin (first base): `file_format` defaults to array_record."""

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or 'array_record', **kwargs)


def image(doc: str, encoding_format: str | None = None) -> tfds.features.Image:
  """An RGB uint8 image (stored as given when `encoding_format` is None)."""
  return tfds.features.Image(shape=(None, None, 3), dtype=np.uint8,
                             encoding_format=encoding_format,
                             doc=tfds.features.Documentation(desc=doc))


def label(doc: str) -> tfds.features.Image:
  """A uint8 (H, W, 1) label map stored as PNG."""
  return tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format='png',
                             doc=tfds.features.Documentation(desc=doc))


def dense(doc: str, channels: int | None, dtype=np.float32) -> tfds.features.Tensor:
  """A (H, W, channels) (or (H, W) for channels None) tensor, zlib-compressed."""
  shape = (None, None) if channels is None else (None, None, channels)
  return tfds.features.Tensor(shape=shape, dtype=dtype, encoding='zlib',
                              doc=tfds.features.Documentation(desc=doc))


def text(doc: str) -> tfds.features.Text:
  return tfds.features.Text(doc=tfds.features.Documentation(desc=doc))
