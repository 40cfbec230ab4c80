"""Metric reporting: clu writers (log + TensorBoard) plus ``WORKDIR/metrics.jsonl``.

``metrics.jsonl`` has one JSON object per logged step: ``{"step": 100, "train/loss": ...,
"eval/semseg/miou": ...}``. Scalars written for the same step before a `flush` are merged into one
line. Only process 0 writes files; other processes only log.
"""

import json
import os
from typing import Any, Mapping

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu.metric_writers import interface
from etils import epath
import jax
import numpy as np
from PIL import Image

METRICS_FILE = 'metrics.jsonl'
EVAL_METRICS_FILE = 'eval_metrics.jsonl'  # written by `launch.py --mode=eval`


class JsonlWriter(interface.MetricWriter):
  """A clu MetricWriter appending one JSON line of scalars per step."""

  def __init__(self, path):
    self._path = epath.Path(path)
    self._step, self._pending = None, {}

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    if self._step is not None and step != self._step:
      self.flush()
    self._step = int(step)
    self._pending.update({k: float(v) for k, v in scalars.items()})

  def flush(self):
    if self._pending:
      with self._path.open('a') as f:
        f.write(json.dumps({'step': self._step, **self._pending}) + '\n')
    self._step, self._pending = None, {}

  def close(self):
    self.flush()

  # Only scalars go to the JSON file; the other summaries go to TensorBoard.
  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass


def create_writer(workdir, jsonl: str = METRICS_FILE) -> metric_writers.MetricWriter:
  """Logging + TensorBoard (async) + WORKDIR/`jsonl` on process 0; logging only elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(None, just_logging=True, asynchronous=True)
  default = metric_writers.create_default_writer(os.fspath(workdir), asynchronous=True)
  return metric_writers.MultiWriter([default, JsonlWriter(epath.Path(workdir) / jsonl)])


def read_metrics(workdir) -> list[dict[str, Any]]:
  """All complete lines of WORKDIR/metrics.jsonl (a killed run may leave a partial last line)."""
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  lines = []
  for line in path.read_text().splitlines():
    try:
      lines.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return lines


def truncate_metrics(workdir, last_step: int) -> None:
  """Keeps the lines up to `last_step`: a resumed run logs the later steps again."""
  if jax.process_index() > 0:
    return
  path = epath.Path(workdir) / METRICS_FILE
  if path.exists():
    kept = [l for l in read_metrics(workdir) if l['step'] <= last_step]
    path.write_text(''.join(json.dumps(l) + '\n' for l in kept))


def image_grid(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
  """Tiles equally sized (H, W, 3) uint8 images row by row with a white border."""
  h, w = rows[0][0].shape[:2]
  cols = max(len(r) for r in rows)
  grid = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
  for i, row in enumerate(rows):
    for j, img in enumerate(row):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      grid[y:y + h, x:x + w] = img
  return grid


def save_png(path, image: np.ndarray) -> None:
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f:
    Image.fromarray(image).save(f, format='PNG')


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def log_parameters(trainable: dict, frozen: dict, writer, write_scalars: bool) -> None:
  """Logs the parameter overview and per-module counts; writes params/total and
  params/trainable at step 0 when `write_scalars` (a fresh run)."""
  params = {'trainable': trainable, 'frozen': frozen}
  logging.info('Parameters:\n%s', parameter_overview.get_parameter_overview(
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params), include_stats=False))
  groups = {}
  for kind, tree in params.items():
    for name, sub in tree.items():
      groups[f'params/{kind}/{name}'] = _count(sub)
  total, num_trainable = _count(params), _count(trainable)
  for name, n in sorted(groups.items()):
    logging.info('  %-40s %14s', name, f'{n:,}')
  logging.info('Parameters: total=%s trainable=%s', f'{total:,}', f'{num_trainable:,}')
  if write_scalars:
    writer.write_scalars(0, {'params/total': total, 'params/trainable': num_trainable})
