"""Boundary detection ODS-F / OIS-F / AP as SEISM computes them (docs/datasets_metrics.md §4.5).

The published boundary numbers of MLoRE / InvPT / ATRC come from the MATLAB SEISM package
(`prismformore/Boundary-Detection-Evaluation-Tools`). This module is a numpy / scipy port of its
pipeline, step by step:

1. The saved prediction is the PNG ``uint8(255 * sigmoid(logit))`` (truncation, `to_png`) at the
   original image size; SEISM reads it as ``E = im2single(png)`` (float32 ``v / 255``).
2. `nms`: orientation from ``gradient2(convTri(E, 4))``, then Piotr Dollar's ``edgesNmsMex(E, O,
   r=1, s=5, m=1.01)`` (the float32 arithmetic of the C code is reproduced; the orientation
   filter is evaluated in float64 and rounded to float32, where MATLAB accumulates in float32).
3. For each of the 101 thresholds of SEISM's ``HED.txt`` (`THRESHOLDS`): ``E > t``, strict, with
   E (single) compared to t (double) in double precision, then ``bwmorph(·, 'thin', Inf)``
   (`thin`).
4. BSDS ``correspondPixels(E, G, maxDist)`` against the ground truth ``G = thin(seg2bmap(L))``
   (`gt_boundaries`; L = the PASCAL-Context LabelMap, or the NYUD edge PNG) with tolerance
   ``maxDist x image diagonal`` (0.0075 PASCAL-Context, 0.011 NYUD: `tasks.DATASETS`). Per
   image and threshold: cntR = matched GT pixels, sumR = GT pixels, cntP = matched prediction
   pixels, sumP = prediction pixels (`evaluate_image`).
5. SEISM's ``gather_measure`` / ``general_ods`` / ``general_ois`` / ``general_ap`` (`scores`).

Matching (`match_count`). BSDS correspondPixels builds an assignment problem (real pairs closer
than maxDist cost ``rint(100 d)``; every pixel may instead go to an outlier node at cost
``ow = ceil(100 * 100 * maxDist)``, maxDist in pixels) and solves it with Goldberg's CSA, so its
matching minimises ``sum(cost) - ow * pairs``. This module solves that problem exactly with
scipy's LAPJVsp (`_matched`). BSDS connects the outlier nodes through a sparse graph drawn from
a time-seeded random generator: when that graph cannot realise the optimum, CSA settles for a
matching with a pair or two fewer, so the C++ counts vary from run to run and never exceed the
optimum (benchmarks/boundary.py shows the spread next to pyEdgeEval's build of that code).

A threshold whose binary map equals the previous one (E > t is nested in t, so equal pixel
counts mean equal maps) reuses its counts.

pyEdgeEval 0.2.8 (the maintained Python port of the BSDS tools) is not used: besides that matching
(10x slower, benchmarks/RESULTS.md) it differs from SEISM in its NMS (``fast_nms`` smooths E with
``convTri(E, 1)`` first and divides by ``Oxx`` without the ``1e-5``), binarises with ``>=``, its
``binary_thin`` stops as soon as the first sub-iteration deletes nothing (bwmorph and `thin` go on
while either does) and its metrics are BSDS's interpolated ODS / AP.
"""

import dataclasses
import functools
import math
import multiprocessing
from collections.abc import Iterable

import cv2
import numpy as np
from scipy import ndimage
from scipy import sparse
from scipy.sparse import csgraph

# SEISM's `parameters/HED.txt`: the 101 thresholds of every boundary result.
THRESHOLDS = np.concatenate([[0.001], np.arange(1, 100) / 100, [0.999]])
# BSDS correspondPixels constants: outlier cost (x maxDist) and the integer cost multiplier.
_OUTLIER_COST = 100.0
_MULTIPLIER = 100


# ------------------------------------------------------------------------------------------------
# Steps 1-3: prediction PNG, non-maximum suppression, thresholding and thinning.

def to_png(logits: np.ndarray) -> np.ndarray:
  """The saved prediction ``uint8(255 * sigmoid(logits))``, truncated, computed in float32."""
  x = np.asarray(logits, np.float32)
  with np.errstate(over='ignore'):  # exp(-x) = inf gives 0, as in torch
    return (np.float32(255) / (np.float32(1) + np.exp(-x))).astype(np.uint8)


def _conv_tri(image: np.ndarray, r: int) -> np.ndarray:
  """Piotr's ``convTri(I, r)``, integer r >= 1: separable triangle filter, symmetric padding."""
  f = np.concatenate([np.arange(1, r + 1), [r + 1], np.arange(r, 0, -1)]) / (r + 1) ** 2
  out = ndimage.correlate1d(image.astype(np.float64), f, axis=0, mode='reflect')
  return ndimage.correlate1d(out, f, axis=1, mode='reflect')


def _gradient2(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Piotr's ``gradient2``: (d/dx, d/dy), central differences, one-sided at the border."""
  gy, gx = np.gradient(image)
  return gx, gy


def orientation(e: np.ndarray) -> np.ndarray:
  """``O = mod(atan(Oyy .* sign(-Oxy) ./ (Oxx + 1e-5)), pi)`` in float32 (SEISM io function).

  O is NaN only where 0 / 0; it is set to 0 there (MATLAB would read out of bounds).
  """
  ox, oy = _gradient2(_conv_tri(e, 4).astype(np.float32))
  oxx, _ = _gradient2(ox)
  oxy, oyy = _gradient2(oy)
  with np.errstate(divide='ignore', invalid='ignore'):
    o = np.mod(np.arctan(oyy * np.sign(-oxy) / (oxx + np.float32(1e-5))), np.float32(np.pi))
  return np.where(np.isnan(o), np.float32(0), o)


def _interp(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """edgesNmsMex's bilinear `interp` (float32, coordinates clamped to [0, size - 1.001])."""
  h, w = image.shape
  # The C code compares the float coordinate with the double bound in double.
  x = np.where(x < 0, np.float32(0), np.where(x.astype(np.float64) > w - 1.001,
                                              np.float32(w - 1.001), x))
  y = np.where(y < 0, np.float32(0), np.where(y.astype(np.float64) > h - 1.001,
                                              np.float32(h - 1.001), y))
  x0, y0 = x.astype(np.int64), y.astype(np.int64)
  dx0, dy0 = x - x0.astype(np.float32), y - y0.astype(np.float32)
  dx1, dy1 = np.float32(1) - dx0, np.float32(1) - dy0
  return (image[y0, x0] * dx1 * dy1 + image[y0, x0 + 1] * dx0 * dy1
          + image[y0 + 1, x0] * dx1 * dy0 + image[y0 + 1, x0 + 1] * dx0 * dy0)


def edges_nms(e: np.ndarray, o: np.ndarray, r: int = 1, s: int = 5,
              m: float = 1.01) -> np.ndarray:
  """Piotr Dollar's ``edgesNmsMex(E, O, r, s, m)`` in float32.

  A pixel is zeroed if m * E is below E interpolated at distance 1..r along either direction of
  its orientation; then E is scaled by x / s (y / s) in the s columns (rows) next to each border.
  """
  e = np.asarray(e, np.float32)
  out = e.copy()
  ys, xs = np.nonzero(e)
  v = e[ys, xs] * np.float32(m)
  cos, sin = np.cos(o[ys, xs]), np.sin(o[ys, xs])
  xf, yf = xs.astype(np.float32), ys.astype(np.float32)
  suppress = np.zeros(len(v), bool)
  for d in range(-r, r + 1):
    if d:
      suppress |= v < _interp(e, xf + np.float32(d) * cos, yf + np.float32(d) * sin)
  out[ys[suppress], xs[suppress]] = 0
  h, w = e.shape
  s = min(s, w // 2, h // 2)
  ramp = np.arange(s, dtype=np.float32) / np.float32(s)
  out[:, :s] *= ramp
  out[:, w - s:] *= ramp[::-1]
  out[:s] *= ramp[:, None]
  out[h - s:] *= ramp[::-1, None]
  return out


def nms(png: np.ndarray) -> np.ndarray:
  """SEISM's ``read_one_cont_png`` before thresholding: float32 edge map after NMS."""
  e = np.asarray(png, np.float32) / np.float32(255)  # im2single
  return edges_nms(e, orientation(e))


def _thin_luts() -> tuple[np.ndarray, np.ndarray]:
  """Deletion tables of bwmorph 'thin' (Lam, Lee & Suen 1992) for both sub-iterations.

  Index bit i - 1 is neighbour x_i: x1 = E, x2 = NE, x3 = N, x4 = NW, x5 = W, x6 = SW, x7 = S,
  x8 = SE.
  """
  code = np.arange(256)
  x = {i: (code >> (i - 1)) & 1 for i in range(1, 9)}
  xx = lambda i: x[(i - 1) % 8 + 1]
  g1 = sum((1 - xx(2 * i - 1)) & (xx(2 * i) | xx(2 * i + 1)) for i in range(1, 5)) == 1
  n1 = sum(xx(2 * k - 1) | xx(2 * k) for k in range(1, 5))
  n2 = sum(xx(2 * k) | xx(2 * k + 1) for k in range(1, 5))
  g2 = (np.minimum(n1, n2) >= 2) & (np.minimum(n1, n2) <= 3)
  g3 = ((x[2] | x[3] | (1 - x[8])) & x[1]) == 0
  g3p = ((x[6] | x[7] | (1 - x[4])) & x[5]) == 0
  return g1 & g2 & g3, g1 & g2 & g3p


_THIN_DELETE = _thin_luts()


def thin(bmap: np.ndarray) -> np.ndarray:
  """``bwmorph(bmap, 'thin', Inf)``: both sub-iterations until an iteration deletes nothing.

  Works on the list of foreground pixels (the maps are sparse): each sub-iteration decides all
  deletions from the map before it, like the table lookup of MATLAB.
  """
  h, w = bmap.shape
  padded = np.zeros((h + 2, w + 2), bool)
  padded[1:-1, 1:-1] = bmap
  flat = padded.ravel()
  stride = w + 2
  neighbours = (1, 1 - stride, -stride, -1 - stride, -1, stride - 1, stride, stride + 1)
  idx = np.flatnonzero(flat)
  changed = True
  while changed:
    changed = False
    for delete in _THIN_DELETE:
      code = np.zeros(len(idx), np.uint8)
      for bit, offset in enumerate(neighbours):
        code |= flat[idx + offset].view(np.uint8) << bit
      gone = delete[code]
      if gone.any():
        flat[idx[gone]] = False
        idx = idx[~gone]
        changed = True
  return padded[1:-1, 1:-1].copy()


def seg2bmap(seg: np.ndarray) -> np.ndarray:
  """BSDS ``seg2bmap``: pixels whose label differs from the E, S or SE neighbour.

  The last row compares E only, the last column S only, the last pixel is 0.
  """
  seg = np.asarray(seg)
  b = np.zeros(seg.shape, bool)
  b[:-1, :-1] = ((seg[:-1, :-1] != seg[:-1, 1:]) | (seg[:-1, :-1] != seg[1:, :-1])
                 | (seg[:-1, :-1] != seg[1:, 1:]))
  b[-1, :-1] = seg[-1, :-1] != seg[-1, 1:]
  b[:-1, -1] = seg[:-1, -1] != seg[1:, -1]
  return b


def gt_boundaries(labels: np.ndarray) -> np.ndarray:
  """SEISM ground truth ``thin(seg2bmap(labels))`` of a label map or binary edge image (H, W).

  PASCAL-Context: the LabelMap (`relabel` does not change seg2bmap); NYUD: the edge PNG.
  """
  labels = np.asarray(labels)
  if labels.ndim == 3 and labels.shape[-1] == 1:
    labels = labels[..., 0]
  return thin(seg2bmap(labels))


# ------------------------------------------------------------------------------------------------
# Step 4: correspondPixels.

@dataclasses.dataclass(frozen=True)
class _Tolerance:
  """correspondPixels constants for one image size and max_dist (fraction of the diagonal)."""
  offsets: np.ndarray  # (K, 2) (dy, dx) with dy^2 + dx^2 <= maxDist^2 (pixels)
  costs: np.ndarray  # (K,) rint(100 * distance)
  outlier: int  # ow, the cost of leaving a pixel unmatched
  radius: int

  @classmethod
  @functools.cache
  def get(cls, shape: tuple[int, int], max_dist: float) -> '_Tolerance':
    rows, cols = shape
    idiag = math.sqrt(rows * rows + cols * cols)
    max_px = max_dist * idiag
    outlier = math.ceil(_OUTLIER_COST * max_dist * idiag * _MULTIPLIER)
    r = math.ceil(max_px)
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    d2 = (dy * dy + dx * dx).astype(np.float64).ravel()
    keep = d2 <= max_px * max_px
    offsets = np.stack([dy.ravel()[keep], dx.ravel()[keep]], axis=1)
    costs = np.rint(np.sqrt(d2[keep]) * _MULTIPLIER).astype(np.int64)
    return cls(offsets=offsets, costs=costs, outlier=outlier, radius=r)


def _pairs(candidates: np.ndarray, gt: np.ndarray, tol: _Tolerance):
  """All (candidate index, GT pixel index, cost) within tolerance; candidates (N, 2) (y, x)."""
  h, w = gt.shape
  gt_index = np.full(gt.shape, -1, np.int64)
  gt_index[gt] = np.arange(int(gt.sum()))
  cand, gidx, cost = [], [], []
  ys, xs = candidates[:, 0], candidates[:, 1]
  for (dy, dx), c in zip(tol.offsets, tol.costs):
    y, x = ys + dy, xs + dx
    inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
    i = np.flatnonzero(inside)
    g = gt_index[y[i], x[i]]
    hit = g >= 0
    cand.append(i[hit])
    gidx.append(g[hit])
    cost.append(np.full(int(hit.sum()), c, np.int64))
  return np.concatenate(cand), np.concatenate(gidx), np.concatenate(cost)


def _matched(pred: np.ndarray, gt: np.ndarray, costs: np.ndarray, outlier: int) -> int:
  """Matched pairs of the optimum of ``sum(cost) - outlier * pairs`` over matchings.

  `pred`, `gt`, `costs`: the candidate pairs (pixel ids and cost). One assignment problem
  (scipy's LAPJVsp): a row per pixel of the smaller side (LAPJVsp is several times faster that
  way round), a column per pixel of the other side and one "unmatched" column per row. A real
  pair costs ``c + 1``, a row's own unmatched column ``outlier + 1`` (the +1 keeps weights
  non-zero; a full assignment has one edge per row, so the shift does not move the optimum);
  columns may stay unassigned.
  """
  if not len(pred):
    return 0
  _, rows = np.unique(pred, return_inverse=True)
  _, cols = np.unique(gt, return_inverse=True)
  n1, n2 = int(rows.max()) + 1, int(cols.max()) + 1
  if n1 > n2:
    rows, cols, n1, n2 = cols, rows, n2, n1
  own = np.arange(n1)
  weight = np.concatenate([costs + 1, np.full(n1, outlier + 1)]).astype(np.float64)
  graph = sparse.csr_matrix(
      (weight, (np.concatenate([rows, own]), np.concatenate([cols, n2 + own]))),
      shape=(n1, n2 + n1))
  _, col_of_row = csgraph.min_weight_full_bipartite_matching(graph)
  return int(np.sum(col_of_row < n2))


def match_count(pred: np.ndarray, gt: np.ndarray, max_dist: float) -> int:
  """Number of matched pixel pairs of BSDS ``correspondPixels(pred, gt, max_dist)``.

  `pred`, `gt`: boolean (H, W) maps; `max_dist` is a fraction of the image diagonal.
  """
  pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
  tol = _Tolerance.get(gt.shape, float(max_dist))
  return _matched(*_pairs(np.argwhere(pred), gt, tol), tol.outlier)


def evaluate_image(png: np.ndarray, gt: np.ndarray, max_dist: float) -> np.ndarray:
  """Counts (101, 4) int64 [cntR, sumR, cntP, sumP] of one image at the `THRESHOLDS` (steps 2-4).

  `png`: the uint8 (H, W) prediction; `gt`: boolean GT boundaries (`gt_boundaries`) of the same
  size. With one GT map, cntR = cntP = the matched pairs.
  """
  png, gt = np.asarray(png), np.asarray(gt, bool)
  if png.shape != gt.shape:
    raise ValueError(f'prediction {png.shape} and ground truth {gt.shape} differ in size; the '
                     'prediction must be at the original image size (centre-cropped)')
  e = nms(png).astype(np.float64)  # compared with the double thresholds in double
  tol = _Tolerance.get(gt.shape, float(max_dist))
  # Candidates: pixels above the lowest threshold that are within tolerance of a GT pixel.
  disk = np.zeros((2 * tol.radius + 1,) * 2, np.uint8)
  disk[tol.offsets[:, 0] + tol.radius, tol.offsets[:, 1] + tol.radius] = 1
  near = cv2.dilate(gt.astype(np.uint8), disk, borderType=cv2.BORDER_CONSTANT, borderValue=0) > 0
  candidates = np.argwhere(near & (e > THRESHOLDS[0]))
  cand, gidx, cost = _pairs(candidates, gt, tol)
  cand_pixel = candidates[:, 0] * gt.shape[1] + candidates[:, 1]
  sum_r = int(gt.sum())
  counts = np.zeros((len(THRESHOLDS), 4), np.int64)
  previous = None
  for k, t in enumerate(THRESHOLDS):
    above = e > t
    n = int(above.sum())
    if n == previous:  # nested maps with equal sizes are equal
      counts[k] = counts[k - 1]
      continue
    previous = n
    pred = thin(above)
    active = pred.ravel()[cand_pixel][cand]
    matched = _matched(cand[active], gidx[active], cost[active], tol.outlier)
    counts[k] = (matched, sum_r, matched, int(pred.sum()))
  return counts


# ------------------------------------------------------------------------------------------------
# Step 5: SEISM aggregation.

def _recall_precision(cnt_r, sum_r, cnt_p, sum_p):
  """gather_measure's R and P of summed counts (arrays over thresholds)."""
  cnt_r, sum_r, cnt_p, sum_p = (np.asarray(v, np.float64) for v in (cnt_r, sum_r, cnt_p, sum_p))
  rec, prec = np.zeros_like(sum_r), np.zeros_like(sum_r)
  no_gt = (sum_r == 0) & (cnt_p == 0)
  rec[no_gt], prec[no_gt] = 1.0, 0.0
  no_pred = (sum_p == 0) & (cnt_r == 0)
  rec[no_pred], prec[no_pred] = 0.0, 1.0
  both = (sum_p != 0) & (cnt_r != 0)
  rec[both], prec[both] = cnt_r[both] / sum_r[both], cnt_p[both] / sum_p[both]
  return rec, prec


def _f_measure(rec, prec):
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(rec + prec == 0, 0.0, 2 * prec * rec / (rec + prec))


def _image_f(counts: np.ndarray) -> np.ndarray:
  """eval_cont's per-image F, as SEISM stores it (``'%f'``, 6 decimals); counts (..., 4)."""
  cnt_r, sum_r, cnt_p, sum_p = (counts[..., i].astype(np.float64) for i in range(4))
  with np.errstate(divide='ignore', invalid='ignore'):
    rec = np.where(sum_r == 0, 1.0, np.where(sum_p == 0, 0.0, cnt_r / sum_r))
    prec = np.where(sum_r == 0, 0.0, np.where(sum_p == 0, 1.0, cnt_p / sum_p))
  f = _f_measure(rec, prec)
  return np.vectorize(lambda v: float(f'{v:f}'), otypes=[np.float64])(f)


def reduce_counts(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(per-threshold sums (T, 4), OIS sums (4,)) of per-image counts (N, T, 4).

  The OIS sums add each image's counts at its best threshold (highest stored F, the first one
  on ties, `general_ois`). Both are sums over images, so they can be added across hosts.
  """
  counts = np.asarray(counts, np.int64).reshape(-1, len(THRESHOLDS), 4)
  best = np.argmax(_image_f(counts), axis=1) if len(counts) else np.zeros(0, np.int64)
  return counts.sum(0), counts[np.arange(len(counts)), best].sum(0)


def pr_curve(totals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(recall, precision) per threshold, fractions, of `reduce_counts`' summed counts."""
  return _recall_precision(*np.asarray(totals).T)


def _colon_0_1_step_001() -> np.ndarray:
  """MATLAB's ``0:.01:1`` (the second half is computed from the end point)."""
  k = np.arange(101)
  return np.where(k <= 50, k * 0.01, 1.0 - (100 - k) * 0.01)


def scores(totals: np.ndarray, ois: np.ndarray) -> dict[str, float]:
  """ODS-F, OIS-F, AP (x100) and the ODS point from `reduce_counts` sums (SEISM step 5).

  ODS: max over thresholds of F of the summed counts (no interpolation). OIS: F of the summed
  per-image-best counts. AP (`general_ap`): ``[~, k] = unique(R)`` (first occurrence, the
  MATLAB >= R2013a default), reversed, ``interp1(R, P, 0:.01:1)``, sum of the non-NaN values
  / 100. SEISM writes each as ``'%0.3f'`` of the fraction; the values here are not rounded.
  """
  rec, prec = _recall_precision(*np.asarray(totals).T)
  f = _f_measure(rec, prec)
  best = int(np.argmax(f))
  o_rec, o_prec = _recall_precision(*np.asarray(ois)[:, None])
  _, first = np.unique(rec, return_index=True)
  ap = 0.0
  if len(first) > 1:  # np.interp wants increasing x: same piecewise-linear curve
    r, p = rec[first], prec[first]
    grid = _colon_0_1_step_001()
    inside = (grid >= r[0]) & (grid <= r[-1])
    ap = float(np.sum(np.interp(grid[inside], r, p)) / 100)
  return {'odsF': 100 * float(f[best]), 'oisF': 100 * float(_f_measure(o_rec, o_prec)[0]),
          'ap': 100 * ap, 'ods_threshold': float(THRESHOLDS[best]),
          'ods_precision': 100 * float(prec[best]), 'ods_recall': 100 * float(rec[best])}


# ------------------------------------------------------------------------------------------------
# Many images.

def _evaluate_item(item: tuple[np.ndarray, np.ndarray, float]) -> np.ndarray:
  png, labels, max_dist = item
  return evaluate_image(png, gt_boundaries(labels), max_dist)


def evaluate_images(items: Iterable[tuple[np.ndarray, np.ndarray]], max_dist: float,
                    num_workers: int = 1) -> np.ndarray:
  """Per-image counts (N, 101, 4) of (prediction PNG, GT labels) pairs, in order.

  GT labels are what `gt_boundaries` takes (PASCAL LabelMap or NYUD edge image). With
  ``num_workers > 1`` images are evaluated in a pool of spawned processes (safe next to JAX).
  """
  items = ((png, labels, max_dist) for png, labels in items)
  if num_workers <= 1:
    results = [_evaluate_item(item) for item in items]
  else:
    with multiprocessing.get_context('spawn').Pool(num_workers) as pool:
      results = list(pool.imap(_evaluate_item, items, chunksize=1))
  return np.stack(results) if results else np.zeros((0, len(THRESHOLDS), 4), np.int64)


def evaluate(items: Iterable[tuple[np.ndarray, np.ndarray]], max_dist: float,
             num_workers: int = 1) -> dict[str, float]:
  """`scores` of (prediction PNG, GT labels) pairs: odsF, oisF, ap (x100) and the ODS point."""
  return scores(*reduce_counts(evaluate_images(items, max_dist, num_workers)))
