"""Tests of the SEISM boundary evaluation (mtl_jax/boundary.py, mtl_jax/tools/eval_boundary.py).

Known answers on hand-made maps (docs/datasets_metrics.md §4.5): 160 x 160 images have a
diagonal of 226.3 px, so maxDist is 1.70 px for PASCAL-Context (0.0075) and 2.49 px for NYUD
(0.011): a 1 px shift is matched by both, a 2 px shift by NYUD only.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import scipy.io
import tensorflow_datasets as tfds

from mtl_jax import boundary
from mtl_jax.tools import eval_boundary
import fakes

PASCAL, NYUD = 0.0075, 0.011
SIZE = 160
REPO = pathlib.Path(__file__).resolve().parents[1]


def _segment(rows=80, cols=slice(30, 131)) -> np.ndarray:
  """A 101 px horizontal GT segment, far from the NMS border ramp."""
  gt = np.zeros((SIZE, SIZE), bool)
  gt[rows, cols] = True
  return gt


def _png(mask: np.ndarray, value: int = 255) -> np.ndarray:
  return (mask * value).astype(np.uint8)


def _square_labels() -> np.ndarray:
  labels = np.zeros((SIZE, SIZE), np.uint16)
  labels[40:120, 40:120] = 7
  return labels


# ------------------------------------------------------------------------------------------------
# Steps 1-3: PNG, NMS, thinning, GT.

def test_thresholds_are_seism_hed_txt():
  t = boundary.THRESHOLDS
  assert len(t) == 101 and t[0] == 0.001 and t[-1] == 0.999
  np.testing.assert_allclose(t[1:100], np.arange(1, 100) / 100)


def test_png_truncates():
  png = boundary.to_png(np.array([-100.0, 0.0, 0.003, 0.01, 100.0]))
  assert png.dtype == np.uint8
  assert png.tolist() == [0, 127, 127, 128, 255]  # 127.5 and 127.69 -> 127: not rounded


def test_nms_keeps_the_ridge_and_suppresses_its_flanks():
  # A vertical ridge: Oxx < 0, Oxy = Oyy = 0, so O = atan(0) = 0 and NMS compares each pixel with
  # its left and right neighbours. (On an exactly horizontal ridge sign(-Oxy) = 0 gives O = 0 as
  # well, along the ridge: the flanks stay, in SEISM too, unless float noise makes Oxy != 0.)
  png = np.zeros((SIZE, SIZE), np.uint8)
  png[20:140, 79], png[20:140, 80], png[20:140, 81] = 128, 255, 128
  e = boundary.nms(png)
  assert e.dtype == np.float32
  np.testing.assert_array_equal(e[20:140, 80], 1.0)
  assert not e[:, 79].any() and not e[:, 81].any()


def test_nms_keeps_equal_neighbours_and_ramps_the_border():
  # Flat map: nothing beats 1.01 x itself, so only the 5 px border ramp x/5 changes it.
  e = boundary.nms(np.full((40, 40), 255, np.uint8))
  np.testing.assert_allclose(e[20, :6], [0, 0.2, 0.4, 0.6, 0.8, 1], atol=1e-7)
  np.testing.assert_allclose(e[:6, 20], [0, 0.2, 0.4, 0.6, 0.8, 1], atol=1e-7)
  np.testing.assert_allclose(e[20, -6:], [1, 0.8, 0.6, 0.4, 0.2, 0], atol=1e-7)
  np.testing.assert_allclose(e[1, 1], 0.04, atol=1e-7)
  np.testing.assert_array_equal(e[5:35, 5:35], 1.0)


def test_thin_keeps_one_pixel_lines_and_thins_bars():
  line = _segment()
  np.testing.assert_array_equal(boundary.thin(line), line)
  bar = np.zeros((20, 40), bool)
  bar[8:11, 5:35] = True  # 3 px thick
  thin = boundary.thin(bar)
  assert not (thin & ~bar).any()
  np.testing.assert_array_equal(thin[9, 6:34], True)  # the middle row survives
  assert thin.sum(0)[6:34].tolist() == [1] * 28  # one pixel per column
  np.testing.assert_array_equal(boundary.thin(thin), thin)  # thinned to convergence


def test_thin_matches_skimage():
  # skimage.morphology.thin is the same Lam-Lee-Suen algorithm as MATLAB's bwmorph 'thin'.
  morphology = pytest.importorskip('skimage.morphology')
  rng = np.random.default_rng(0)
  for density in (0.2, 0.5, 0.8):
    bmap = rng.random((64, 64)) < density
    np.testing.assert_array_equal(boundary.thin(bmap), morphology.thin(bmap))


def test_seg2bmap_and_gt_boundaries():
  seg = np.array([[1, 1, 2],
                  [1, 1, 2],
                  [3, 3, 3]])
  # E, S or SE neighbour differs; the last row compares E only, the last column S only.
  np.testing.assert_array_equal(boundary.seg2bmap(seg), [[0, 1, 0],
                                                         [1, 1, 1],
                                                         [0, 0, 0]])
  gt = boundary.gt_boundaries(_square_labels()[..., None])  # (H, W, 1) accepted
  assert gt.shape == (SIZE, SIZE) and gt[39, 60] and gt[119, 60] and gt[60, 39] and gt[60, 119]
  assert not gt[60, 60] and not gt[40:119, 40:119].any()


# ------------------------------------------------------------------------------------------------
# Step 4: matching.

@pytest.mark.parametrize('shift, max_dist, matched', [
    (0, PASCAL, 101), (1, PASCAL, 101), (2, PASCAL, 0), (2, NYUD, 101), (3, NYUD, 0)])
def test_match_count_of_a_shifted_segment(shift, max_dist, matched):
  gt = _segment()
  assert boundary.match_count(np.roll(gt, shift, axis=0), gt, max_dist) == matched


def test_match_count_prefers_more_pairs_then_shorter_ones():
  gt = np.zeros((SIZE, SIZE), bool)
  gt[80, [50, 51]] = True
  pred = np.zeros_like(gt)
  pred[80, 50] = pred[81, 51] = True
  # (50 -> 50) with (51 -> 51 diagonal) beats leaving one unmatched.
  assert boundary.match_count(pred, gt, PASCAL) == 2
  pred[81, 52] = True  # a third prediction pixel has no GT pixel left
  assert boundary.match_count(pred, gt, PASCAL) == 2
  assert boundary.match_count(np.zeros_like(gt), gt, PASCAL) == 0
  assert boundary.match_count(pred, np.zeros_like(gt), PASCAL) == 0


# ------------------------------------------------------------------------------------------------
# Per-image counts and SEISM's aggregation.

def test_perfect_prediction():
  labels = _square_labels()
  gt = boundary.gt_boundaries(labels)
  counts = boundary.evaluate_image(_png(gt), gt, PASCAL)
  n = int(gt.sum())
  np.testing.assert_array_equal(counts, np.tile([n, n, n, n], (101, 1)))
  result = boundary.evaluate([(_png(gt), labels)], PASCAL)
  assert result['odsF'] == result['oisF'] == 100.0
  assert result['ods_threshold'] == 0.001  # the first of the equal maxima
  # Every threshold gives R = 1: `unique(R)` keeps one point and general_ap returns 0.
  assert result['ap'] == 0.0


@pytest.mark.parametrize('shift, max_dist, f', [(1, PASCAL, 100.0), (2, PASCAL, 0.0),
                                                (2, NYUD, 100.0)])
def test_shifted_prediction(shift, max_dist, f):
  gt = _segment()
  counts = boundary.evaluate_image(_png(np.roll(gt, shift, axis=0)), gt, max_dist)
  matched = 101 if f else 0
  np.testing.assert_array_equal(counts, np.tile([matched, 101, matched, 101], (101, 1)))
  assert boundary.scores(*boundary.reduce_counts(counts[None]))['odsF'] == f


def test_empty_prediction_and_empty_gt():
  gt = _segment()
  empty = np.zeros((SIZE, SIZE), np.uint8)
  np.testing.assert_array_equal(boundary.evaluate_image(empty, gt, PASCAL),
                                np.tile([0, 101, 0, 0], (101, 1)))
  np.testing.assert_array_equal(boundary.evaluate_image(_png(gt), np.zeros_like(gt), PASCAL),
                                np.tile([0, 0, 0, 101], (101, 1)))
  # sumP = 0: R = 0, P = 1; sumR = 0: R = 1, P = 0; F = 0 either way.
  for counts in ([0, 101, 0, 0], [0, 0, 0, 101], [0, 0, 0, 0]):
    result = boundary.scores(*boundary.reduce_counts(np.tile(counts, (1, 101, 1))))
    assert result['odsF'] == result['oisF'] == result['ap'] == 0.0
  # A perfect image plus an image without GT: R = 1, P = 101 / 202.
  result = boundary.evaluate([(_png(gt), gt), (_png(gt), np.zeros_like(gt))], PASCAL)
  assert result['ods_recall'] == 100.0 and result['ods_precision'] == 50.0
  np.testing.assert_allclose(result['odsF'], 100 * 2 * 0.5 / 1.5)


def test_prediction_and_gt_sizes_must_agree():
  with pytest.raises(ValueError, match='differ in size'):
    boundary.evaluate_image(np.zeros((10, 12), np.uint8), np.zeros((12, 10), bool), PASCAL)


def test_ods_ois_ap_by_hand():
  # Image 1: t < 0.5 -> (cntR, sumR, cntP, sumP) = (10, 10, 10, 20), F 0.667; t >= 0.5 ->
  # (8, 10, 8, 8), F 0.889. Image 2: (3, 4, 3, 3), F 0.857, then (1, 4, 1, 1), F 0.4.
  counts = np.zeros((2, 101, 4), np.int64)
  low = boundary.THRESHOLDS < 0.5
  counts[0, low], counts[0, ~low] = (10, 10, 10, 20), (8, 10, 8, 8)
  counts[1, low], counts[1, ~low] = (3, 4, 3, 3), (1, 4, 1, 1)
  totals, ois = boundary.reduce_counts(counts)
  np.testing.assert_array_equal(ois, [8 + 3, 10 + 4, 8 + 3, 8 + 3])  # image 1 at 0.5, 2 at 0.001
  result = boundary.scores(totals, ois)
  # ODS: summed counts (13, 14, 13, 23) below 0.5 and (9, 14, 9, 9) from 0.5 on: no interpolation.
  r_low, p_low, r_high = 13 / 14, 13 / 23, 9 / 14
  assert result['ods_threshold'] == 0.5
  np.testing.assert_allclose(result['odsF'], 100 * 2 * r_high / (1 + r_high))
  np.testing.assert_allclose(result['oisF'], 100 * 2 * (11 / 14) / (1 + 11 / 14))
  # AP: two curve points; the line between them at the grid 0:0.01:1 inside [9/14, 13/14].
  grid = [g / 100 for g in range(101) if r_high <= g / 100 <= r_low]
  expected = sum(1 + (g - r_high) * (p_low - 1) / (r_low - r_high) for g in grid) / 100
  np.testing.assert_allclose(result['ap'], 100 * expected)
  rec, prec = boundary.pr_curve(totals)
  assert rec[0] == r_low and prec[-1] == 1.0


def test_counts_sum_across_batches():
  rng = np.random.default_rng(1)
  counts = rng.integers(0, 50, (6, 101, 4))
  totals, ois = boundary.reduce_counts(counts)
  totals_a, ois_a = boundary.reduce_counts(counts[:2])
  totals_b, ois_b = boundary.reduce_counts(counts[2:])
  np.testing.assert_array_equal(totals, totals_a + totals_b)
  np.testing.assert_array_equal(ois, ois_a + ois_b)


@pytest.mark.slow
def test_workers_give_the_same_counts():
  gt = _segment()
  items = [(_png(np.roll(gt, s, axis=0), 200), gt) for s in (0, 1, 2)]
  np.testing.assert_array_equal(boundary.evaluate_images(items, PASCAL, num_workers=2),
                                boundary.evaluate_images(items, PASCAL))


# ------------------------------------------------------------------------------------------------
# The CLI.

def _write_pascal(tmp_path: pathlib.Path, ids=('a', 'b')) -> tuple[pathlib.Path, pathlib.Path]:
  """Predictions (perfect for 'a', shifted by 2 px for 'b') and the reference GT layout."""
  pred, gt_root = tmp_path / 'pred', tmp_path / 'PASCALContext'
  (gt_root / 'pascal-context' / 'trainval').mkdir(parents=True)
  pred.mkdir()
  labels = _square_labels()
  gt = boundary.gt_boundaries(labels)
  for image_id, shift in zip(ids, (0, 2)):
    scipy.io.savemat(gt_root / 'pascal-context' / 'trainval' / f'{image_id}.mat',
                     {'LabelMap': labels})
    Image.fromarray(_png(np.roll(gt, shift, axis=(0, 1)))).save(pred / f'{image_id}.png')
  return pred, gt_root


def test_cli_function_on_the_reference_layout(tmp_path):
  pred, gt_root = _write_pascal(tmp_path)
  result = eval_boundary.evaluate(str(pred), 'pascal_context', gt=str(gt_root), ids='predictions')
  expected = boundary.evaluate(
      [(np.asarray(Image.open(pred / f'{i}.png')), _square_labels()) for i in 'ab'], PASCAL)
  assert result['num_images'] == 2 and result['max_dist'] == PASCAL
  for key, value in expected.items():
    assert result[key] == value
  assert 50 < result['odsF'] < 100
  assert len(result['curve']['recall']) == 101


def _run_cli(*args) -> subprocess.CompletedProcess:
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  return subprocess.run([sys.executable, '-m', 'mtl_jax.tools.eval_boundary', *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_cli_writes_json_and_fails_cleanly(tmp_path):
  pred, gt_root = _write_pascal(tmp_path)
  ids = tmp_path / 'ids.txt'
  ids.write_text('a\nb\n')
  out = tmp_path / 'out' / 'metrics.json'
  ok = _run_cli(f'--predictions={pred}', '--dataset=pascal_context', f'--gt={gt_root}',
                f'--ids={ids}', f'--output={out}', '--num_workers=1')
  assert ok.returncode == 0, ok.stderr
  assert 'odsF' in ok.stdout and json.loads(out.read_text())['num_images'] == 2
  # Bad input: a prediction of the wrong size -> one error line, exit 1, no output file.
  Image.fromarray(np.zeros((SIZE, SIZE + 1), np.uint8)).save(pred / 'b.png')
  bad_out = tmp_path / 'bad.json'
  bad = _run_cli(f'--predictions={pred}', '--dataset=pascal_context', f'--gt={gt_root}',
                 f'--ids={ids}', f'--output={bad_out}', '--num_workers=1')
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines() == [
      "error: id 'b': prediction (160, 161) and ground truth (160, 160) differ in size; save "
      'predictions at the original image size (centre-crop the padding)']
  assert not bad_out.exists() and not list(tmp_path.glob('.bad.json.*'))


@pytest.mark.parametrize('change, message', [
    (lambda pred, gt: (pred / 'b.png').unlink(), '1 of 2 predictions are missing'),
    (lambda pred, gt: (gt / 'pascal-context/trainval/a.mat').unlink(),
     "no ground truth for id 'a'"),
    (lambda pred, gt: Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(pred / 'a.png'),
     "PIL mode 'RGB'"),
    (lambda pred, gt: (pred / 'a.png').write_bytes(b'not a png'), 'not a readable PNG'),
])
def test_cli_function_errors(tmp_path, change, message):
  pred, gt_root = _write_pascal(tmp_path)
  change(pred, gt_root)
  with pytest.raises(eval_boundary.ConfigError, match=message):
    eval_boundary.evaluate(str(pred), 'pascal_context', gt=str(gt_root), ids=str(
        _ids_file(tmp_path)))


def _ids_file(tmp_path: pathlib.Path) -> pathlib.Path:
  path = tmp_path / 'ids.txt'
  path.write_text('a\nb\n')
  return path


def test_cli_default_ids_are_the_benchmark_lists():
  assert len(eval_boundary.read_ids('benchmark', 'pascal_context', REPO)) == 2498
  assert len(eval_boundary.read_ids('benchmark', 'nyud_v2', REPO)) == 654


def test_cli_needs_exactly_one_gt_source(tmp_path):
  with pytest.raises(eval_boundary.ConfigError, match='exactly one ground-truth source'):
    eval_boundary.evaluate(str(tmp_path), 'nyud_v2')
  with pytest.raises(eval_boundary.ConfigError, match='has no edge task'):
    eval_boundary.evaluate(str(tmp_path), 'cityscapes', gt=str(tmp_path))


@pytest.mark.slow
def test_cli_tfds_source(tmp_path):
  # A stand-in for the TFDS data source: NYUD examples carry `edge` (H, W, 1) and `id` bytes.
  gt = _segment()
  source = [{'id': b'0001', 'edge': gt[..., None].astype(np.uint8)},
            {'id': b'0002', 'edge': gt[..., None].astype(np.uint8)}]
  (tmp_path / 'pred').mkdir()
  Image.fromarray(_png(gt)).save(tmp_path / 'pred' / '0001.png')
  with pytest.raises(eval_boundary.ConfigError, match='1 of 2 predictions'):
    eval_boundary.tfds_items(tmp_path / 'pred', source)
  Image.fromarray(_png(np.roll(gt, 2, axis=0))).save(tmp_path / 'pred' / '0002.png')
  counts = boundary.evaluate_images(eval_boundary.tfds_items(tmp_path / 'pred', source), NYUD)
  # The NYUD GT is seg2bmap of the edge image: both sides of the 1 px line, thinned.
  assert counts.shape == (2, 101, 4) and (counts[:, :, 1] > 0).all()


@pytest.mark.slow
def test_cli_function_on_a_tfds_dataset(tmp_path):
  import data_builders.nyud_v2  # noqa: F401  (registers the builder)
  fakes.write_nyud(tmp_path / 'manual')
  tfds.builder('nyud_v2', data_dir=str(tmp_path / 'tfds')).download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / 'manual')))
  pred = tmp_path / 'pred'
  pred.mkdir()
  items = []
  for image_id in fakes.NYUD_VAL:
    edge = fakes.nyud_edge(*fakes.NYUD_SIZES[image_id])
    Image.fromarray(edge * 255).save(pred / f'{image_id}.png')
    items.append((edge * 255, edge))
  result = eval_boundary.evaluate(str(pred), 'nyud_v2', tfds_data_dir=str(tmp_path / 'tfds'))
  assert result['num_images'] == len(fakes.NYUD_VAL) and result['max_dist'] == NYUD
  assert result['odsF'] == boundary.evaluate(items, NYUD)['odsF'] > 0
  with pytest.raises(eval_boundary.ConfigError, match="unknown split 'test'"):
    eval_boundary.evaluate(str(pred), 'nyud_v2', tfds_data_dir=str(tmp_path / 'tfds'),
                           split='test')
