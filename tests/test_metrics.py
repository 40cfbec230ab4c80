"""Tests of mtl_jax/metrics.py: hand-computed cases, merge/padding/sharding invariances and numpy
ports of the reference meters (docs/datasets_metrics.md §4, §6.1)."""

import dataclasses
import math

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from mtl_jax import metrics
from mtl_jax.evaluators import metrics as metrics_evaluator
from mtl_jax.tasks import get_tasks

ALL = ('semseg', 'human_parts', 'sal', 'normals', 'depth', 'edge')
EDGE_W = 0.95


def _widen(tree):
  """What the trainer does on the host: int leaves -> int64, float leaves -> float64."""
  return jax.tree.map(metrics_evaluator.widen, jax.device_get(tree))


def _stats(cls, preds, batch):
  return _widen(jax.jit(lambda p, b: cls.single_from_model_output(preds=p, batch=b))(preds, batch))


def _evaluate(tasks, batches, edge_w=EDGE_W, protocol='mlore'):
  """The 'metrics' evaluator's loop: jit per batch, accumulate on the host, compute, flatten."""
  cls = metrics.make_metrics(tasks, edge_w=edge_w, protocol=protocol)
  accumulator = metrics_evaluator.Accumulator(cls)
  step = jax.jit(lambda p, b: cls.single_from_model_output(preds=p, batch=b))
  for preds, batch in batches:
    accumulator.add(step(preds, batch))
  return metrics.flatten(accumulator.compute())


def _example(b):
  return {'example_valid': np.ones(b, bool)}


def _logits_for_probs(p):
  """1-channel logits whose sigmoid is p."""
  p = np.asarray(p, np.float64)
  return np.log(p / (1 - p)).astype(np.float32)[..., None]


# ---------------------------------------------------------------------------------------------
# Hand-computed cases.

def test_miou_hand_computed():
  # 2x3 image. Valid pixels (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,2); last pixel ignored.
  # Class 0: TP 1, FN 1 -> 1/2. Class 1: TP 2, FP 1 -> 2/3. Class 2: TP 1 -> 1. Class 3 absent -> 0.
  gt = np.array([[0, 0, 1], [1, 2, 255]], np.uint8)[None, ..., None]
  pred_ids = np.array([[0, 1, 1], [1, 2, 0]])
  for k, want in ((3, (0.5 + 2 / 3 + 1) / 3), (4, (0.5 + 2 / 3 + 1) / 4)):
    task = get_tasks(['semseg'], 'pascal_context')['semseg']
    tasks = {'semseg': dataclasses.replace(task, num_outputs=k, num_classes=k)}
    preds = {'semseg': np.eye(k, dtype=np.float32)[pred_ids][None]}
    out = _evaluate(tasks, [(preds, {'semseg': gt, **_example(1)})])
    assert out['semseg/miou'] == pytest.approx(100 * want)
    assert out['semseg/pixel_acc'] == pytest.approx(80.0)


def test_saliency_maxf_hand_computed():
  """One 2x2 image, probs (0.97, 0.93, 0.87, 0.32), gt (1, 1, 0, 0).

  Correct maxF: t = 0.90 keeps exactly the two positives -> F = 1.
  Quirk: sigmoid(prob) = (0.725, 0.717, 0.705, 0.579); the best threshold t = 0.70 (or 0.60, 0.65)
  keeps three pixels -> P = 2/3, R = 1, F = 1.3 * 2/3 / (0.3 * 2/3 + 1) = 0.7222.
  """
  tasks = get_tasks(['sal'], 'pascal_context', 'mtlora')
  preds = {'sal': _logits_for_probs([[[0.97, 0.93], [0.87, 0.32]]])}
  gt = np.array([[[1, 1], [0, 0]]], np.uint8)[..., None]
  out = _evaluate(tasks, [(preds, {'sal': gt, **_example(1)})])
  assert out['sal/maxf_correct'] == pytest.approx(100.0)
  assert out['sal/maxf'] == pytest.approx(100 * 1.3 * (2 / 3) / (0.3 * 2 / 3 + 1))


def test_saliency_mtlora_per_image_hand_computed():
  """Two images, thresholds 0.2..0.9 (step 0.05, strict >).

  Image 1: probs (0.97, 0.93, 0.87, 0.32), gt (1, 1, 0, 0): IoU/P/R = 1/2, 1/2, 1 for t <= 0.30;
  2/3, 2/3, 1 for 0.35 <= t <= 0.85; 1, 1, 1 at t = 0.90.
  Image 2: probs (0.62, 0.1, 0.1, 0.1), gt (1, 1, 0, 0): IoU/P/R = 1/2, 1, 1/2 for t <= 0.60;
  0, 0, 0 above.
  Mean IoU per t: 0.5, 0.5833 (0.35..0.60), 0.3333 (0.65..0.85), 0.5 -> miou 58.33.
  mean P / mean R: 0.75/0.75 -> F 0.75; 0.8333/0.75 -> F 0.7895; 1/3, 1/2 -> 0.4; 1/2, 1/2 -> 0.5.
  """
  tasks = get_tasks(['sal'], 'pascal_context', 'mtlora')
  preds = {'sal': _logits_for_probs([[[0.97, 0.93], [0.87, 0.32]], [[0.62, 0.1], [0.1, 0.1]]])}
  gt = np.array([[[1, 1], [0, 0]]] * 2, np.uint8)[..., None]
  out = _evaluate(tasks, [(preds, {'sal': gt, **_example(2)})], protocol='mtlora')
  assert out['sal/miou'] == pytest.approx(100 * (2 / 3 + 0.5) / 2, rel=1e-6)
  mp, mr = (2 / 3 + 1) / 2, 0.75
  assert out['sal/maxf'] == pytest.approx(100 * 2 * mp * mr / (mp + mr), rel=1e-6)


def test_saliency_two_channel_matches_one_channel():
  rng = np.random.RandomState(0)
  logit = rng.randn(2, 5, 6, 1).astype(np.float32)
  gt = rng.randint(0, 2, (2, 5, 6, 1)).astype(np.uint8)
  gt[0, 0, :3] = 255
  batch = {'sal': gt, **_example(2)}
  out1 = _evaluate(get_tasks(['sal'], 'pascal_context', 'mtlora'), [({'sal': logit}, batch)])
  two = np.concatenate([np.zeros_like(logit), logit], -1)  # softmax[..., 1] == sigmoid(logit)
  out2 = _evaluate(get_tasks(['sal'], 'pascal_context', 'mlore'), [({'sal': two}, batch)])
  assert out1 == pytest.approx(out2, rel=1e-6)


def test_normals_hand_computed():
  # Errors 0, 45, 90, 45 degrees; one ignored pixel; a zero prediction against (0,0,1) -> 90.
  s = 1 / math.sqrt(2)
  gt = np.array([[[1, 0, 0], [s, s, 0], [0, 1, 0], [0, s, s], [255, 255, 255], [0, 0, 1]]],
                np.float32)[None]
  pred = np.array([[[3, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 2], [1, 2, 3], [0, 0, 0]]],
                  np.float32)[None]
  out = _evaluate(get_tasks(['normals'], 'pascal_context'),
                  [({'normals': pred}, {'normals': gt, **_example(1)})])
  errors = np.array([0, 45, 90, 45, 90])
  assert out['normals/mean'] == pytest.approx(errors.mean(), abs=1e-4)
  assert out['normals/median'] == pytest.approx(45.0, abs=1e-9)
  assert out['normals/rmse'] == pytest.approx(np.sqrt(np.mean(errors ** 2)), abs=1e-4)
  assert out['normals/within_11.25'] == pytest.approx(20.0)
  assert out['normals/within_22.5'] == pytest.approx(20.0)
  assert out['normals/within_30'] == pytest.approx(20.0)


def test_depth_hand_computed():
  # gt 0 (invalid) and 100 (>= 80, invalid) are out; a negative prediction is clamped to 1e-9.
  gt = np.array([1.0, 2.0, 4.0, 0.0, 100.0, 2.0], np.float32).reshape(1, 1, 6, 1)
  pred = np.array([1.5, 2.0, 3.0, 5.0, 5.0, -1.0], np.float32).reshape(1, 1, 6, 1)
  out = _evaluate(get_tasks(['depth'], 'nyud_v2'),
                  [({'depth': pred}, {'depth': gt, **_example(1)})])
  g, p = np.array([1.0, 2.0, 4.0, 2.0]), np.array([1.5, 2.0, 3.0, 1e-9])
  assert out['depth/rmse'] == pytest.approx(np.sqrt(np.mean((g - p) ** 2)), rel=1e-6)
  assert out['depth/log_rmse'] == pytest.approx(np.sqrt(np.mean(np.log(g / p) ** 2)), rel=1e-6)
  assert out['depth/abs_rel'] == pytest.approx(np.mean(np.abs(g - p) / g), rel=1e-6)
  assert out['depth/sq_rel'] == pytest.approx(np.mean((g - p) ** 2 / g), rel=1e-6)
  assert out['depth/rmse_predict_mean'] == pytest.approx(np.sqrt(19 / 16), rel=1e-6)  # std(g)


def test_edge_proxy_hand_computed():
  # x = sigmoid(logit) is used as a logit: logit 0 -> x = 0.5.
  pred = np.zeros((1, 1, 3, 1), np.float32)
  gt = np.array([1, 0, 255], np.uint8).reshape(1, 1, 3, 1)
  out = _evaluate(get_tasks(['edge'], 'pascal_context'),
                  [({'edge': pred}, {'edge': gt, **_example(1)})], edge_w=0.9)
  sp = lambda v: math.log1p(math.exp(v))
  assert out['edge/loss'] == pytest.approx((0.9 * sp(-0.5) + 0.1 * sp(0.5)) / 2, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Invariances: merging, padding examples, jit on a sharded mesh.

def _random_batch(rng, tasks, b, h=6, w=7, ignore=0.2):
  preds = {n: rng.randn(b, h, w, t.num_outputs).astype(np.float32) for n, t in tasks.items()}
  if 'depth' in preds:
    preds['depth'] = (2 + preds['depth']).astype(np.float32)
  batch = _example(b)
  for name, task in tasks.items():
    drop = rng.rand(b, h, w) < ignore
    if task.kind == 'segmentation':
      lab = rng.randint(0, task.num_classes, (b, h, w))
    elif task.kind in ('saliency', 'edge'):
      lab = rng.randint(0, 2, (b, h, w))
    if task.kind in ('segmentation', 'saliency', 'edge'):
      batch[name] = np.where(drop, 255, lab).astype(np.uint8)[..., None]
    elif task.kind == 'normals':
      n = rng.randn(b, h, w, 3)
      n /= np.linalg.norm(n, axis=-1, keepdims=True)
      batch[name] = np.where(drop[..., None], 255, n).astype(np.float32)
    elif task.kind == 'depth':
      batch[name] = np.where(drop, 0, rng.uniform(0.5, 6, (b, h, w))).astype(np.float32)[..., None]
  return preds, batch


def _tasks(convention='mlore'):
  return get_tasks(ALL, 'synthetic_scenes', convention)


def _assert_stats_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if np.issubdtype(x.dtype, np.integer):
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('convention', ['mlore', 'mtlora'])
def test_merge_equals_concatenated_batch(convention):
  tasks = _tasks(convention)
  cls = metrics.make_metrics(tasks, edge_w=EDGE_W)
  rng = np.random.RandomState(1)
  (p1, b1), (p2, b2) = _random_batch(rng, tasks, 2), _random_batch(rng, tasks, 3)
  merged = _stats(cls, p1, b1).merge(_stats(cls, p2, b2))
  cat = lambda x, y: np.concatenate([x, y])
  whole = _stats(cls, jax.tree.map(cat, p1, p2), jax.tree.map(cat, b1, b2))
  for name in tasks:  # (the collection's _reduction_counter counts merges, 2 vs 1)
    _assert_stats_equal(getattr(merged, name), getattr(whole, name))
  assert metrics.flatten(merged.compute()) == pytest.approx(metrics.flatten(whole.compute()),
                                                            rel=1e-5)


def test_padding_examples_contribute_nothing():
  tasks = _tasks()
  cls = metrics.make_metrics(tasks, edge_w=EDGE_W)
  rng = np.random.RandomState(2)
  preds, batch = _random_batch(rng, tasks, 2)
  pad_preds, pad_batch = _random_batch(rng, tasks, 2, ignore=0.0)
  cat = lambda x, y: np.concatenate([x, y])
  padded_batch = jax.tree.map(cat, batch, pad_batch)
  padded_batch['example_valid'] = np.array([True, True, False, False])
  padded = _stats(cls, jax.tree.map(cat, preds, pad_preds), padded_batch)
  _assert_stats_equal(padded, _stats(cls, preds, batch))


@pytest.mark.parametrize('axis_type', [AxisType.Explicit, AxisType.Auto])
def test_sharded_batch_gives_same_stats(axis_type):
  tasks = _tasks()
  cls = metrics.make_metrics(tasks, edge_w=EDGE_W)
  preds, batch = _random_batch(np.random.RandomState(3), tasks, 8, h=4, w=5)
  batch['example_valid'][-1] = False
  sharding = NamedSharding(jax.make_mesh((8,), ('data',), axis_types=(axis_type,)), P('data'))
  step = jax.jit(lambda p, b: cls.single_from_model_output(preds=p, batch=b))
  sharded = step(*jax.device_put((preds, batch), sharding))
  assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded))
  _assert_stats_equal(_widen(sharded), _stats(cls, preds, batch))


def test_missing_example_valid_is_an_error():
  tasks = get_tasks(['edge'], 'pascal_context')
  preds, batch = _random_batch(np.random.RandomState(0), tasks, 1)
  del batch['example_valid']
  with pytest.raises(KeyError, match='example_valid'):
    metrics.make_metrics(tasks, edge_w=EDGE_W).single_from_model_output(preds=preds, batch=batch)


# ---------------------------------------------------------------------------------------------
# numpy ports of the reference meters (float32 like torch), on random inputs with ignore pixels.

def _sigmoid(x):
  return (1 / (1 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def _softmax1(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return (e[..., 1] / e.sum(-1)).astype(np.float32)


def _ref_semseg(preds, gts, n_classes):
  """SemsegMeter (MLoRE evaluation/eval_semseg.py)."""
  tp, fp, fn = [0] * n_classes, [0] * n_classes, [0] * n_classes
  for pred, gt in zip(preds, gts):
    pred, gt = pred.argmax(-1), gt[..., 0]
    valid = gt != 255
    for c in range(n_classes):
      tp[c] += np.sum((gt == c) & (pred == c) & valid)
      fp[c] += np.sum((gt != c) & (pred == c) & valid)
      fn[c] += np.sum((gt == c) & (pred != c) & valid)
  jac = [tp[c] / max(tp[c] + fp[c] + fn[c], 1e-8) for c in range(n_classes)]
  return 100 * np.mean(jac)


def _ref_sal_beta(probs, gts):
  """SaliencyMeter (InvPT/MLoRE eval_sal.py = MTLoRA eval_sal_beta.py), pred = 255 * prob."""
  thresholds = np.arange(0.05, 1, 0.05).astype(np.float32)
  tp, pp, ap = np.zeros(19, np.float32), np.zeros(19, np.float32), np.zeros(19, np.float32)
  for prob, gt in zip(probs, gts):
    p = _sigmoid((prob * 255).astype(np.float32) / np.float32(255))  # the double sigmoid
    gt = gt[..., 0]
    valid = gt != 255
    for i, t in enumerate(thresholds):
      f_pred = (p >= t).astype(np.int64)[valid]
      f_gt = gt.astype(np.int64)[valid]
      tp[i] += np.sum(f_pred * f_gt)
      pp[i] += np.sum(f_pred)
      ap[i] += np.sum(f_gt)
  with np.errstate(divide='ignore', invalid='ignore'):
    precision, recall = tp / pp, tp / ap
    f = (1 + 0.3) * precision * recall / (0.3 * precision + recall)
  f[f != f] = 0
  return 100 * f.max()


def _ref_jaccard(gt, pred, void):
  """evaluation/jaccard.py (ASTMT), with void pixels."""
  if np.isclose(np.sum(gt & ~void), 0) and np.isclose(np.sum(pred & ~void), 0):
    return 1
  return np.sum((gt & pred) & ~void) / np.sum((gt | pred) & ~void, dtype=float)


def _ref_precision_recall(gt, pred, void):
  tp = ((pred & gt) & ~void).sum()
  fn = ((~pred & gt) & ~void).sum()
  fp = ((pred & ~gt) & ~void).sum()
  return tp / (tp + fp + 1e-12), tp / (tp + fn + 1e-12)


def _ref_sal_no_beta(probs, gts):
  """SaliencyMeterWithNoBeta (MTLoRA eval_sal_no_beta.py), void = label 255."""
  thresholds = np.linspace(0.2, 0.9, 15)
  jac, prec, rec = [], [], []
  for prob, gt in zip(probs, gts):
    pred = (prob * 255).astype(np.float32) / np.float32(255)
    void = gt[..., 0] == 255
    g = gt[..., 0].astype(bool) & ~void
    jac.append([_ref_jaccard(g, pred > np.float32(t), void) for t in thresholds])
    pr = [_ref_precision_recall(g, pred > np.float32(t), void) for t in thresholds]
    prec.append([x[0] for x in pr])
    rec.append([x[1] for x in pr])
  m_prec, m_rec = np.mean(prec, 0), np.mean(rec, 0)
  f = 2 * m_prec * m_rec / (m_prec + m_rec + 1e-12)
  return 100 * np.max(np.mean(jac, 0)), 100 * np.max(f)


def _normalize_tensor(x):
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return np.where(norm == 0, 0, x / np.where(norm == 0, 1, norm)).astype(np.float32)


def _ref_normals(preds, gts):
  """NormalsMeter (InvPT/MLoRE eval_normals.py) after get_output's encoding, plus the ASTMT
  median / rmse / within statistics over the same angles."""
  degs = []
  for pred, gt in zip(preds, gts):
    unit = pred / np.maximum(np.linalg.norm(pred, axis=-1, keepdims=True), 1e-12)  # F.normalize
    encoded = ((unit + 1) * 255 / 2).astype(np.float32)
    p = _normalize_tensor(2 * encoded / 255 - 1)
    valid = np.all(gt != 255, axis=-1)
    g = _normalize_tensor(gt)
    deg = np.rad2deg(2 * np.arctan2(np.linalg.norm(p - g, axis=-1), np.linalg.norm(p + g, axis=-1)))
    degs.append(deg[valid])
  deg = np.concatenate(degs).astype(np.float64)
  return {'mean': deg.mean(), 'median': np.median(deg), 'rmse': np.sqrt(np.mean(deg ** 2)),
          'within_11.25': 100 * np.mean(deg < 11.25), 'within_22.5': 100 * np.mean(deg < 22.5),
          'within_30': 100 * np.mean(deg < 30)}


def _ref_depth(preds, gts):
  """DepthMeter(max_depth=80, min_depth=0) after get_output's clamp(min=0)."""
  n, rmse, log_rmse, abs_rel, sq_rel = 0.0, 0.0, 0.0, 0.0, 0.0
  for pred, gt in zip(preds, gts):
    pred, gt = np.maximum(pred[..., 0], 0), gt[..., 0].copy()
    mask = (gt < 80) & (gt > 0)
    n += mask.sum()
    gt[gt <= 0] = 1e-9
    pred[pred <= 0] = 1e-9
    g, p = gt[mask], pred[mask]
    log_rmse += np.sum((np.log(g) - np.log(p)) ** 2)
    rmse += np.sum((g - p) ** 2)
    abs_rel += np.sum(np.abs(g - p) / g)
    sq_rel += np.sum((g - p) ** 2 / g)
  return {'rmse': np.sqrt(rmse / n), 'log_rmse': np.sqrt(log_rmse / n), 'abs_rel': abs_rel / n,
          'sq_rel': sq_rel / n}


def _ref_edge(preds, gts, w):
  """EdgeMeter (MLoRE eval_edge.py): BalancedBinaryCrossEntropyLoss on sigmoid(logit)."""
  total, count = 0.0, 0
  for pred, gt in zip(preds, gts):
    valid = gt != 255
    x, y = _sigmoid(pred)[valid].astype(np.float64), gt[valid].astype(np.float64)
    pos_weight = w / (1 - w)
    loss = np.mean((1 - y) * x + (1 + (pos_weight - 1) * y) * np.log1p(np.exp(-x))) * (1 - w)
    total += y.size * loss
    count += y.size
  return total / count


@pytest.mark.parametrize('convention', ['mlore', 'mtlora'])
def test_against_reference_meters(convention):
  tasks = _tasks(convention)
  rng = np.random.RandomState(4)
  batches = [_random_batch(rng, tasks, b, h=9, w=11) for b in (3, 2)]
  # Scale the saliency logits so that the probabilities spread over all thresholds.
  for preds, _ in batches:
    preds['sal'] *= 3
  out = _evaluate(tasks, batches, protocol=convention)
  cat = lambda name, src: [x for p, b in batches for x in (p, b)[src][name]]
  preds, gts = (lambda n: cat(n, 0)), (lambda n: cat(n, 1))
  for name in ('semseg', 'human_parts'):
    assert out[f'{name}/miou'] == pytest.approx(
        _ref_semseg(preds(name), gts(name), tasks[name].num_classes), rel=1e-6)
  to_prob = _softmax1 if convention == 'mlore' else (lambda x: _sigmoid(x[..., 0]))
  probs = [to_prob(p) for p in preds('sal')]
  beta_key = 'maxf' if convention == 'mlore' else 'beta_maxf'
  assert out[f'sal/{beta_key}'] == pytest.approx(_ref_sal_beta(probs, gts('sal')), rel=1e-6)
  if convention == 'mtlora':  # its normals and depth meters: tests/test_eval_protocols.py
    miou, maxf = _ref_sal_no_beta(probs, gts('sal'))
    assert out['sal/miou'] == pytest.approx(miou, rel=1e-6)
    assert out['sal/maxf'] == pytest.approx(maxf, rel=1e-6)
  else:
    want = _ref_normals(preds('normals'), gts('normals'))
    for key, value in want.items():
      tol = 0.005 + 1e-4 if key == 'median' else 1e-6 * value
      assert out[f'normals/{key}'] == pytest.approx(value, abs=tol), key
    for key, value in _ref_depth(preds('depth'), gts('depth')).items():
      assert out[f'depth/{key}'] == pytest.approx(value, rel=1e-6), key
  assert out['edge/loss'] == pytest.approx(_ref_edge(preds('edge'), gts('edge'), EDGE_W), rel=1e-6)
