"""Evaluation protocols of mtl_jax/metrics.py (`make_metrics(..., protocol=)`,
``config.eval_protocol``): the key set of each, and numpy ports of the MTLoRA meters and of the
corrected maxF written from docs/datasets_metrics.md §4.2-4.6 and docs/mtlora.md §9, on random
predictions with ignore pixels (agreement 1e-6). The MLoRE meters: tests/test_metrics.py."""

import jax
import numpy as np
import pytest

from mtl_jax import ConfigError
from mtl_jax import metrics
from mtl_jax.evaluators import metrics as metrics_evaluator
from mtl_jax.tasks import get_tasks

ALL = ('semseg', 'human_parts', 'sal', 'normals', 'depth', 'edge')
KEYS = {
    'mlore': {
        'semseg': {'miou', 'pixel_acc'}, 'human_parts': {'miou', 'pixel_acc'},
        'sal': {'maxf', 'maxf_correct'},
        'normals': {'mean', 'median', 'rmse', 'within_11.25', 'within_22.5', 'within_30'},
        'depth': {'rmse', 'log_rmse', 'abs_rel', 'sq_rel', 'rmse_predict_mean'},
        'edge': {'loss'}},
    'mtlora': {
        'semseg': {'miou', 'pixel_acc'}, 'human_parts': {'miou', 'pixel_acc'},
        'sal': {'beta_maxf', 'maxf', 'miou'},
        'normals': {'mean', 'rmse', 'mean_v2', 'rmse_v2'},
        'depth': {'rmse', 'log_rmse', 'rmse_predict_mean'},
        'edge': {'loss'}},
}


def _evaluate(tasks, batches, protocol, edge_w=0.95):
  """The 'metrics' evaluator's loop: jit per batch, accumulate on the host, compute."""
  cls = metrics.make_metrics(tasks, edge_w=edge_w, protocol=protocol)
  step = jax.jit(lambda p, b: cls.single_from_model_output(preds=p, batch=b))
  accumulator = metrics_evaluator.Accumulator(cls)
  for preds, batch in batches:
    accumulator.add(step(preds, batch))
  return accumulator.compute()


def _random_batches(tasks, rng, sizes=(3, 2), h=9, w=11):
  """Random logits and labels in the mtl_jax format, ~20 % ignore pixels (none for edge, whose
  MTLoRA meter has no ignore region); depth labels include values beyond 80 m."""
  batches = []
  for b in sizes:
    preds = {n: rng.randn(b, h, w, t.num_outputs).astype(np.float32) for n, t in tasks.items()}
    preds['sal'] *= 3  # probabilities spread over every threshold
    preds['depth'] = (3 + 2 * preds['depth']).astype(np.float32)  # some negative
    drop = lambda: rng.rand(b, h, w) < 0.2
    batch = {'example_valid': np.ones(b, bool)}
    for name in ('semseg', 'human_parts'):
      lab = rng.randint(0, tasks[name].num_classes, (b, h, w))
      batch[name] = np.where(drop(), 255, lab).astype(np.uint8)[..., None]
    batch['sal'] = np.where(drop(), 255, rng.randint(0, 2, (b, h, w))).astype(np.uint8)[..., None]
    batch['edge'] = rng.randint(0, 2, (b, h, w, 1)).astype(np.uint8)
    n = rng.randn(b, h, w, 3)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    n *= rng.uniform(0.9, 1.1, (b, h, w, 1))  # labels need not be unit (v1 uses them as is)
    batch['normals'] = np.where(drop()[..., None], 255, n).astype(np.float32)
    depth = rng.uniform(0.5, 100, (b, h, w))
    batch['depth'] = np.where(drop(), 0, depth).astype(np.float32)[..., None]
    batches.append((preds, batch))
  return batches


# ---------------------------------------------------------------------------------------------
# numpy references (float32 where the reference computes in torch float32).

def _sigmoid(x):
  return (1 / (1 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def _ref_mtlora_normals(preds, gts):
  """MTLoRA NormalsMeter: v1 (eval_normals_v1.py) and v2 (eval_normals_v2.py) on get_output's
  encoding 255 (normalize(pred) + 1) / 2; returns the four printed fields."""
  s1 = n1 = s2 = n2 = 0.0
  for pred, gt in zip(preds, gts):
    unit = pred / np.maximum(np.linalg.norm(pred, axis=-1, keepdims=True), 1e-12)
    encoded = (255 * (unit + 1) / 2).astype(np.float32)
    p = (2 * encoded / 255 - 1).astype(np.float32)
    # v1: zero both where a label channel is 255; acos of the clamped dot product, channel 0 mask.
    invalid = gt == 255
    p1, g1 = np.where(invalid, 0, p), np.where(invalid, 0, gt)
    deg = np.float32(180 / np.pi) * np.arccos(np.clip(np.sum(p1 * g1, -1), -1, 1))
    s1 += float(np.sum(deg[~invalid[..., 0]], dtype=np.float64))
    n1 += int(np.sum(~invalid[..., 0]))
    # v2: normalize_tensor (zero norm stays 0) of both, 2 atan2(|p - g|, |p + g|), all-channel mask.
    unit_or_zero = lambda x: np.where(
        np.linalg.norm(x, axis=-1, keepdims=True) == 0, 0,
        x / np.where(np.linalg.norm(x, axis=-1, keepdims=True) == 0, 1,
                     np.linalg.norm(x, axis=-1, keepdims=True)))
    p2, g2 = unit_or_zero(p), unit_or_zero(gt)
    deg2 = np.rad2deg(2 * np.arctan2(np.linalg.norm(p2 - g2, axis=-1),
                                     np.linalg.norm(p2 + g2, axis=-1)))
    valid = np.all(gt != 255, axis=-1)
    s2 += float(np.sum(deg2[valid]))
    n2 += int(np.sum(valid))
  return {'mean': s1 / n1, 'rmse': s1 / n1, 'mean_v2': s2 / n2, 'rmse_v2': s2 / n2}


def _ref_mtlora_depth(preds, gts):
  """MTLoRA DepthMeter (eval_depth.py) after AddIgnoreRegions (depth 0 -> 255)."""
  sq = log_sq = n = 0.0
  for pred, gt in zip(preds, gts):
    gt = np.where(gt[..., 0] == 0, 255, gt[..., 0]).astype(np.float64)
    mask = gt != 255
    pred = np.maximum(pred[..., 0].astype(np.float64), 1e-9)
    n += mask.sum()
    log_sq += np.sum(((np.log(gt) - np.log(pred)) ** 2)[mask])
    sq += np.sum(((gt - pred) ** 2)[mask])
  return {'rmse': np.sqrt(sq / n), 'log_rmse': np.sqrt(log_sq / n)}


def _ref_mtlora_edge(preds, gts, w):
  """MTLoRA EdgeMeter: BalancedCrossEntropyLoss(size_average=True, pos_weight=w) of the
  probability used as a logit; meter = sum(numel * loss) / sum(numel)."""
  total = count = 0.0
  for pred, gt in zip(preds, gts):
    x = _sigmoid(pred).astype(np.float64)
    y = (gt >= 0.5).astype(np.float64)
    x_ge0 = (x >= 0).astype(np.float64)
    loss_val = x * (y - x_ge0) - np.log(1 + np.exp(x - 2 * x * x_ge0))
    loss = (w * np.sum(-y * loss_val) + (1 - w) * np.sum(-(1 - y) * loss_val)) / y.size
    total += y.size * loss
    count += y.size
  return total / count


def _ref_maxf_correct(probs, gts):
  """The pooled F-beta (beta^2 = 0.3) of SaliencyMeter without its second sigmoid."""
  thresholds = np.arange(0.05, 1, 0.05).astype(np.float32)
  tp, pp, ap = np.zeros(19), np.zeros(19), 0.0
  for prob, gt in zip(probs, gts):
    valid = gt[..., 0] != 255
    g = gt[..., 0][valid].astype(np.float64)
    ap += g.sum()
    for i, t in enumerate(thresholds):
      above = (prob[valid] >= t).astype(np.float64)
      tp[i] += np.sum(above * g)
      pp[i] += np.sum(above)
  with np.errstate(divide='ignore', invalid='ignore'):
    p, r = tp / pp, tp / ap
    f = 1.3 * p * r / (0.3 * p + r)
  return 100 * np.nan_to_num(f).max()


# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('protocol', ['mlore', 'mtlora'])
def test_protocol_picks_the_reported_keys(protocol):
  tasks = get_tasks(ALL, 'synthetic_scenes', protocol)
  out = _evaluate(tasks, _random_batches(tasks, np.random.RandomState(0), sizes=(2,)), protocol)
  assert {name: set(values) for name, values in out.items()} == KEYS[protocol]
  for name, task in tasks.items():  # the registry's main metric is reported under its name
    assert task.main_metric in out[name], (name, task.main_metric)


def test_mtlora_protocol_matches_reference_meters():
  tasks = get_tasks(ALL, 'synthetic_scenes', 'mtlora')
  batches = _random_batches(tasks, np.random.RandomState(1))
  out = _evaluate(tasks, batches, 'mtlora', edge_w=0.95)
  cat = lambda name, i: [x for batch in batches for x in batch[i][name]]
  for key, want in _ref_mtlora_normals(cat('normals', 0), cat('normals', 1)).items():
    assert out['normals'][key] == pytest.approx(want, rel=1e-6), key
  for key, want in _ref_mtlora_depth(cat('depth', 0), cat('depth', 1)).items():
    assert out['depth'][key] == pytest.approx(want, rel=1e-6), key
  assert out['edge']['loss'] == pytest.approx(
      _ref_mtlora_edge(cat('edge', 0), cat('edge', 1), 0.95), rel=1e-6)
  # Beyond 80 m counts for MTLoRA, not for MLoRE's DepthMeter.
  mlore = _evaluate(tasks, batches, 'mlore')
  assert mlore['depth']['rmse'] != pytest.approx(out['depth']['rmse'], rel=1e-3)


def test_mlore_corrected_maxf_matches_reference():
  tasks = get_tasks(['sal'], 'synthetic_scenes', 'mlore')  # 2-channel softmax saliency
  batches = _random_batches(get_tasks(ALL, 'synthetic_scenes', 'mlore'),
                            np.random.RandomState(2))
  batches = [({'sal': p['sal']}, {'sal': b['sal'], 'example_valid': b['example_valid']})
             for p, b in batches]
  out = _evaluate(tasks, batches, 'mlore')
  softmax1 = lambda x: (np.exp(x[..., 1]) / np.exp(x).sum(-1)).astype(np.float32)
  probs = [softmax1(x) for p, _ in batches for x in p['sal']]
  gts = [x for _, b in batches for x in b['sal']]
  assert out['sal']['maxf_correct'] == pytest.approx(_ref_maxf_correct(probs, gts), rel=1e-6)
  assert out['sal']['maxf'] != pytest.approx(out['sal']['maxf_correct'], rel=1e-3)


def test_unknown_protocol_names_the_fix():
  with pytest.raises(ConfigError, match='--config.eval_protocol'):
    metrics.make_metrics(get_tasks(['edge'], 'nyud_v2'), edge_w=0.9, protocol='invpt')
