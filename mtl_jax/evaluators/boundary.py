"""'boundary': SEISM boundary odsF / oisF / AP of the edge predictions (mtl_jax/boundary.py).

Added by ``config.eval_boundary``. Each valid example's edge prediction is brought back to the
example's original size (`predictions.to_original_size`), encoded as the references save it
(`boundary.to_png`) and matched against the ground truth read from the eval source at the
example's ``index`` (``label_map`` where the dataset has one, else the edge label), at the
dataset's tolerance (docs/datasets_metrics.md §4.5). Counts are summed over hosts; scores x100 as
`edge/odsF`, `edge/oisF`, `edge/ap`, ... ``config.eval_boundary_workers`` processes per host
(0 = every CPU core, 1 = inline).
"""

import collections
from concurrent import futures
import multiprocessing
import os

import jax
from jax.experimental import multihost_utils
import numpy as np

from mtl_jax import boundary
from mtl_jax import evaluators
from mtl_jax import tasks as tasks_lib
from mtl_jax.evaluators import predictions


class BoundaryEvaluation:
  """SEISM counts of one eval pass's edge predictions, summed over hosts.

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
    return boundary.scores(sum_over_hosts(totals), sum_over_hosts(ois))


def sum_over_hosts(x: np.ndarray) -> np.ndarray:
  """Exact sum over processes of a non-negative int64 array (< 2^47).

  Gathers move int32 (x64 is off), so the values travel as two 24-bit halves.
  """
  if jax.process_count() == 1:
    return x
  x = np.asarray(x, np.int64)
  halves = np.stack([x >> 24, x & (2 ** 24 - 1)]).astype(np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(halves), np.int64).sum(0)
  return (gathered[0] << 24) + gathered[1]


@evaluators.register('boundary')
class Boundary(evaluators.Evaluator):
  """Boundary scores of the edge task (see the module docstring)."""
  host_tasks = ('edge',)

  def start(self, step: int) -> None:
    config = self.ctx.config
    self.evaluation = BoundaryEvaluation(
        tasks_lib.DATASETS[tasks_lib.dataset_kind(config.dataset.name)].edge_max_dist,
        config.eval_boundary_workers)

  def add(self, batch, device_out, host_preds) -> None:
    for i in np.flatnonzero(batch['example_valid']):
      example = self.ctx.source[int(batch['index'][i])]
      edge = predictions.to_original_size(host_preds['edge'][i], tuple(batch['original_size'][i]),
                                          self.ctx.config.input.augment)
      labels = example['label_map'] if 'label_map' in example else example['edge'][..., 0]
      self.evaluation.add(boundary.to_png(edge[..., 0]), labels)

  def finish(self) -> evaluators.Result:
    return evaluators.Result(
        scalars={f'edge/{k}': v for k, v in self.evaluation.scores().items()})
