r"""Times the 101-threshold boundary evaluation of one 512 x 512 image (no assertions).

  taskset -c 0 python benchmarks/boundary.py

Draws a PASCAL-like scene (24 wobbly Voronoi regions: the label map) and a dense prediction PNG
(a soft band around the boundaries, displaced and noisy, so that ~54k pixels survive NMS at the
lowest threshold), then times `boundary.evaluate_image` (NMS, 101 x threshold + thin + match).
With pyEdgeEval importable (e.g. run by an interpreter that has it) it also times pyEdgeEval's
`evaluate_boundaries_threshold` on the same NMS map (its own NMS differs, see
mtl_jax/boundary.py) and compares the counts: sumP (thinning) and cntR (matching), plus the spread
of repeated BSDS `correspond_pixels` calls on one threshold. Numeric libraries are held to one
thread; pin the process to one core with taskset. Record results in benchmarks/RESULTS.md.
"""

import argparse
import os

for _var in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'):
  os.environ.setdefault(_var, '1')

import sys  # pylint: disable=g-import-not-at-top,g-bad-import-order
import time  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from scipy import ndimage  # pylint: disable=g-import-not-at-top

from mtl_jax import boundary  # pylint: disable=g-import-not-at-top

cv2.setNumThreads(1)


def scene(seed: int, size: int, regions: int = 24) -> tuple[np.ndarray, np.ndarray]:
  """(prediction PNG uint8, label map uint16) of a synthetic image."""
  rng = np.random.default_rng(seed)
  seeds = rng.uniform(0, size, (regions, 2))
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  warp = ndimage.gaussian_filter(rng.normal(size=(2, size, size)), (0, 12, 12)) * 120
  d2 = ((yy[None] + warp[0] - seeds[:, 0, None, None]) ** 2
        + (xx[None] + warp[1] - seeds[:, 1, None, None]) ** 2)
  labels = np.argmin(d2, 0).astype(np.uint16) + 1
  edges = np.zeros((size, size), bool)
  edges[:-1] |= labels[:-1] != labels[1:]
  edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
  dist = ndimage.distance_transform_edt(~edges)
  offset = ndimage.gaussian_filter(rng.normal(size=(size, size)), 4).clip(0) * 20
  noise = ndimage.gaussian_filter(rng.normal(size=(size, size)), 2)
  logits = 4 * np.exp(-(dist + offset) ** 2 / 8) - 3 + 2.1 * noise
  return boundary.to_png(logits), labels


def _time(fn, repeats: int):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return out, min(times), float(np.median(times))


def _ods(counts: np.ndarray) -> float:
  return boundary.scores(*boundary.reduce_counts(counts[None]))['odsF']


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--size', type=int, default=512)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--regions', type=int, default=24, help='more regions: more GT pixels')
  parser.add_argument('--max_dist', type=float, default=0.0075)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  png, labels = scene(args.seed, args.size, args.regions)
  gt = boundary.gt_boundaries(labels)
  e = boundary.nms(png)
  print(f'{args.size}x{args.size}, maxDist {args.max_dist}, cores {sorted(os.sched_getaffinity(0))}'
        f': GT {int(gt.sum())} px; after NMS {int((e > 0.001).sum())} px > 0.001, '
        f'{int((e > 0.5).sum())} px > 0.5')
  _, nms_min, _ = _time(lambda: boundary.nms(png), args.repeats)
  counts, best, median = _time(lambda: boundary.evaluate_image(png, gt, args.max_dist),
                               args.repeats)
  print(f'mtl_jax.boundary.evaluate_image: {median:.2f} s per image (median of {args.repeats}, '
        f'min {best:.2f}; NMS {1000 * nms_min:.0f} ms), odsF {_ods(counts):.2f}')
  try:
    from pyEdgeEval._lib import correspond_pixels  # pylint: disable=g-import-not-at-top
    from pyEdgeEval.common.binary_label.evaluate_boundaries import (  # pylint: disable=g-import-not-at-top
        evaluate_boundaries_threshold)
  except ImportError:
    print('pyEdgeEval is not importable: skipped the comparison')
    return
  # pyEdgeEval binarises with >=: thresholds + 1e-9 give SEISM's > on these float32 values.
  t0 = time.perf_counter()
  theirs = evaluate_boundaries_threshold(boundary.THRESHOLDS + 1e-9, e.astype(np.float64), gt,
                                         max_dist=args.max_dist, apply_thinning=True,
                                         apply_nms=False)
  seconds = time.perf_counter() - t0
  theirs = np.stack(theirs, 1).astype(np.int64)
  print(f'pyEdgeEval evaluate_boundaries_threshold (same NMS map, 1 run): {seconds:.2f} s per '
        f'image, odsF {_ods(theirs):.2f} (SEISM aggregation of its counts)')
  d_sum_p, d_cnt = counts[:, 3] - theirs[:, 3], counts[:, 0] - theirs[:, 0]
  print(f'  sumP ours - theirs (thinning): {np.count_nonzero(d_sum_p)} of 101 thresholds differ, '
        f'max |diff| {np.abs(d_sum_p).max()} px')
  print(f'  cntR ours - theirs (matching): min {d_cnt.min()}, median {np.median(d_cnt):g}, max '
        f'{d_cnt.max()} px, of {int(counts[0, 1])} GT px')
  k = int(np.searchsorted(boundary.THRESHOLDS, 0.3))
  pred = boundary.thin(e.astype(np.float64) > boundary.THRESHOLDS[k])
  runs = [int((correspond_pixels(pred, gt, max_dist=args.max_dist)[1] > 0).sum())
          for _ in range(10)]
  print(f'  BSDS correspond_pixels at t = {boundary.THRESHOLDS[k]:g}, 10 runs: matched '
        f'{min(runs)}..{max(runs)}; mtl_jax (exact optimum): '
        f'{boundary.match_count(pred, gt, args.max_dist)}')


if __name__ == '__main__':
  main()
