"""Tests of mtl_jax/losses.py: golden parity with the official MLoRE criterion, numpy ports of the
MTLoRA losses (docs/mtlora.md §8) and hand-computed values."""

import json
import math
import os

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from conftest import FIXTURES
from mtl_jax import losses
from mtl_jax.tasks import get_tasks

PASCAL = ('semseg', 'human_parts', 'sal', 'normals', 'edge')


def _fixture_inputs():
  """Fixture logits/labels/gates in mtl_jax layouts (NHWC, uint8 discrete labels)."""
  z = np.load(os.path.join(FIXTURES, 'mlore_pascal_tiny_seed0_losses.npz'))
  preds = {t: z[f'out/{t}'].transpose(0, 2, 3, 1) for t in PASCAL}
  batch = {}
  for t in PASCAL:
    label = z[f'target/{t}'].transpose(0, 2, 3, 1)
    batch[t] = label if t == 'normals' else label.astype(np.uint8)
  gates = [{t: z[f'route{r}/{s}/{t}'] for t in PASCAL} for r in (1, 2) for s in range(4)]
  return z, preds, batch, gates


def test_mlore_parity_with_reference_criterion():
  z, preds, batch, gates = _fixture_inputs()
  with open(os.path.join(FIXTURES, 'mlore_pascal_tiny_seed0.json')) as f:
    cfg = json.load(f)['reduced_config']
  weights = cfg['loss_weights']
  tasks = get_tasks(PASCAL, 'pascal_context', 'mlore')

  @jax.jit
  def run(preds, batch, gates):
    return losses.compute_losses(tasks, preds, batch, convention='mlore', weights=weights,
                                 edge_w=cfg['edge_w'], aux={'gates': gates},
                                 load_balancing_weight=weights['load_balancing'])

  total, per_task = run(preds, batch, gates)
  assert set(per_task) == set(PASCAL) | {'load_balancing'}
  for t in PASCAL:
    np.testing.assert_allclose(per_task[t], z[f'loss/{t}'], rtol=1e-6, err_msg=t)
  np.testing.assert_allclose(per_task['load_balancing'], z['loss/cv'], rtol=1e-6)
  np.testing.assert_allclose(total, z['loss/total'], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# numpy ports of the MTLoRA reference losses (scale-lab/MTLoRA mtl_loss_schemes.py), NHWC.

def _np_balanced_bce(output, label, pos_weight=None):
  """BalancedCrossEntropyLoss(size_average=True), no ignore region."""
  labels = (label >= 0.5).astype(np.float32)
  if pos_weight is None:
    w = np.sum(1.0 - labels) / labels.size
  else:
    w = pos_weight
  gt_zero = (output >= 0).astype(np.float32)
  loss_val = output * (labels - gt_zero) - np.log(1 + np.exp(output - 2 * output * gt_zero))
  loss_pos = np.sum(-labels * loss_val)
  loss_neg = np.sum(-(1.0 - labels) * loss_val)
  return (w * loss_pos + (1 - w) * loss_neg) / label.size


def _np_mtlora_normals(out, label):
  """NormalsLoss(normalize=True, size_average=True, norm=1)."""
  out = out / (np.linalg.norm(out, axis=-1, keepdims=True) + 1e-12)
  mask = label != 255
  return np.abs(out[mask] - label[mask]).sum() / max(mask.sum(), 1e-6)


def _np_softmax_nll(out, label):
  """SoftMaxwithLoss: log-softmax + NLL(ignore 255), mean over valid pixels."""
  logp = out - np.log(np.exp(out - out.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - out.max(-1, keepdims=True)
  lab = label[..., 0].astype(int)
  valid = lab != 255
  nll = -np.take_along_axis(logp, np.where(valid, lab, 0)[..., None], -1)[..., 0]
  return nll[valid].sum() / valid.sum()


def _mtlora_tasks():
  return get_tasks(('semseg', 'sal', 'normals', 'depth', 'edge'), 'synthetic_scenes', 'mtlora')


def _random_mtlora_batch(rng, b=2, h=6, w=7, ignore=True):
  preds = {'semseg': rng.randn(b, h, w, 7), 'sal': 3 * rng.randn(b, h, w, 1),
           'normals': rng.randn(b, h, w, 3), 'depth': rng.uniform(0, 4, (b, h, w, 1)),
           'edge': 3 * rng.randn(b, h, w, 1)}
  preds = {k: v.astype(np.float32) for k, v in preds.items()}
  normals = rng.randn(b, h, w, 3)
  normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
  batch = {'semseg': rng.randint(0, 7, (b, h, w, 1)), 'sal': rng.randint(0, 2, (b, h, w, 1)),
           'edge': rng.randint(0, 2, (b, h, w, 1)), 'normals': normals,
           'depth': rng.uniform(0.5, 5, (b, h, w, 1)) * (rng.rand(b, h, w, 1) > 0.2)}
  if ignore:
    for k in ('semseg', 'sal', 'edge'):
      batch[k][rng.rand(b, h, w, 1) < 0.2] = 255
    batch['normals'][rng.rand(b, h, w) < 0.2] = 255
  batch = {k: v.astype(np.uint8 if k in ('semseg', 'sal', 'edge') else np.float32)
           for k, v in batch.items()}
  return preds, batch


def test_mtlora_losses_match_numpy_reference():
  preds, batch = _random_mtlora_batch(np.random.RandomState(0), ignore=False)
  weights = {'semseg': 1.0, 'sal': 5.0, 'normals': 10.0, 'depth': 1.0, 'edge': 50.0}
  total, got = jax.jit(lambda p, b: losses.compute_losses(
      _mtlora_tasks(), p, b, convention='mtlora', weights=weights, edge_w=0.95))(preds, batch)
  depth_valid = batch['depth'] != 0
  want = {
      'semseg': _np_softmax_nll(preds['semseg'], batch['semseg']),
      'sal': _np_balanced_bce(preds['sal'], batch['sal'].astype(np.float32)),
      'edge': _np_balanced_bce(preds['edge'], batch['edge'].astype(np.float32), pos_weight=0.95),
      'normals': _np_mtlora_normals(preds['normals'], batch['normals']),
      'depth': np.abs(preds['depth'] - batch['depth'])[depth_valid].mean(),
  }
  assert set(got) == set(want)
  for k, v in want.items():
    np.testing.assert_allclose(got[k], v, rtol=1e-5, err_msg=k)
  np.testing.assert_allclose(total, sum(weights[k] * v for k, v in want.items()), rtol=1e-5)


def test_mtlora_saliency_and_edge_exclude_ignored_pixels():
  """With 255 labels the loss equals the reference loss on the valid pixels only."""
  preds, batch = _random_mtlora_batch(np.random.RandomState(1))
  _, got = losses.compute_losses(_mtlora_tasks(), preds, batch, convention='mtlora',
                                 weights=dict.fromkeys(preds, 1.0), edge_w=0.95)
  for task, pos_weight in (('sal', None), ('edge', 0.95)):
    valid = batch[task] != 255
    want = _np_balanced_bce(preds[task][valid], batch[task][valid].astype(np.float32),
                            pos_weight=pos_weight)
    np.testing.assert_allclose(got[task], want, rtol=1e-5, err_msg=task)


def test_normals_conventions_differ_by_factor_three():
  preds, batch = _random_mtlora_batch(np.random.RandomState(2))
  pred, label = jnp.asarray(preds['normals']), jnp.asarray(batch['normals'])
  np.testing.assert_allclose(losses.mlore_normals_loss(pred, label),
                             3 * losses.mtlora_normals_loss(pred, label), rtol=1e-5)
  np.testing.assert_allclose(losses.mtlora_normals_loss(pred, label),
                             _np_mtlora_normals(preds['normals'], batch['normals']), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Hand-computed values.

def test_cross_entropy_hand_computed():
  # Uniform logits over 4 classes: CE = log 4 on each of the 2 valid pixels; the 255 pixel is out.
  logits = jnp.zeros((1, 1, 3, 4))
  labels = jnp.array([[[[0], [3], [255]]]], jnp.uint8)
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), math.log(4), rtol=1e-6)
  # All pixels ignored -> 0 (not NaN).
  assert float(losses.cross_entropy(logits, jnp.full_like(labels, 255))) == 0.0


def test_mlore_saliency_weights_hand_computed():
  # Valid labels 0, 0, 1 -> w = 2/3: class 0 weight 1/3, class 1 weight 2/3; logits 0 -> CE log 2.
  logits = jnp.zeros((1, 1, 4, 2))
  labels = jnp.array([[[[0], [0], [1], [255]]]], jnp.uint8)
  want = (1 / 3 + 1 / 3 + 2 / 3) * math.log(2) / 3
  np.testing.assert_allclose(losses.mlore_saliency_loss(logits, labels), want, rtol=1e-6)


def test_mtlora_saliency_hand_computed():
  # Labels 1, 0, 0, 0 -> w = 3/4; logit x = 1 everywhere.
  logits = jnp.ones((1, 2, 2, 1))
  labels = jnp.array([[[[1], [0]], [[0], [0]]]], jnp.uint8)
  sp = lambda v: math.log1p(math.exp(v))
  want = (0.75 * sp(-1.0) + 0.25 * 3 * sp(1.0)) / 4
  np.testing.assert_allclose(losses.mtlora_saliency_loss(logits, labels), want, rtol=1e-6)


def test_edge_hand_computed():
  logits = jnp.array([[[[2.0], [-1.0], [5.0]]]])
  labels = jnp.array([[[[1], [0], [255]]]], jnp.uint8)
  sp = lambda v: math.log1p(math.exp(v))
  want = (0.95 * sp(-2.0) + 0.05 * sp(-1.0)) / 2
  np.testing.assert_allclose(losses.weighted_bce_with_logits(logits, labels, 0.95), want, rtol=1e-6)


def test_normals_and_depth_hand_computed():
  # Pixel 0: pred (2, 0, 0) -> unit (1, 0, 0), label (0, 1, 0): L1 = 2. Pixel 1: ignored.
  pred = jnp.array([[[[2.0, 0, 0], [1.0, 1.0, 1.0]]]])
  label = jnp.array([[[[0.0, 1.0, 0], [255.0, 255.0, 255.0]]]])
  np.testing.assert_allclose(losses.mlore_normals_loss(pred, label), 2.0, rtol=1e-6)
  np.testing.assert_allclose(losses.mtlora_normals_loss(pred, label), 2.0 / 3, rtol=1e-6)
  depth_pred = jnp.array([[[[1.0], [2.0], [9.0]]]])
  depth_label = jnp.array([[[[1.5], [4.0], [0.0]]]])
  np.testing.assert_allclose(losses.depth_loss(depth_pred, depth_label), 1.25, rtol=1e-6)


def test_load_balancing_hand_computed():
  uniform = {'a': jnp.full((2, 4), 0.25), 'b': jnp.full((3, 4), 0.25)}
  assert float(losses.load_balancing_loss([uniform] * 8)) == pytest.approx(0.0, abs=1e-12)
  # Means over the concatenated batch: m = (1, 2, 3, 2) / 4 -> mean 0.5, unbiased var 1/24.
  gates = {'a': jnp.array([[0.0, 0.5, 1.0, 0.5]]), 'b': jnp.array([[0.5, 0.5, 0.5, 0.5]])}
  m = np.array([1.0, 2.0, 3.0, 2.0]) / 4
  want = (m.std(ddof=1) / m.mean()) ** 2
  np.testing.assert_allclose(losses.load_balancing_loss([gates, uniform]), want, rtol=1e-6)


def test_normals_gradient_finite_at_zero_prediction():
  label = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0]), (1, 2, 2, 3))
  for fn in (losses.mlore_normals_loss, losses.mtlora_normals_loss):
    grad = jax.grad(fn)(jnp.zeros((1, 2, 2, 3)), label)
    assert np.all(np.isfinite(grad))


# ---------------------------------------------------------------------------------------------
# Errors and sharding.

def test_missing_weight_names_config_key():
  preds, batch = _random_mtlora_batch(np.random.RandomState(0))
  with pytest.raises(ValueError, match=r'config\.loss_weights\.depth'):
    losses.compute_losses(_mtlora_tasks(), preds, batch, convention='mtlora',
                          weights={'semseg': 1.0, 'sal': 1.0, 'normals': 1.0, 'edge': 1.0},
                          edge_w=0.95)


def test_convention_errors():
  preds, batch = _random_mtlora_batch(np.random.RandomState(0))
  weights = dict.fromkeys(preds, 1.0)
  with pytest.raises(ValueError, match='config.convention'):
    losses.compute_losses(_mtlora_tasks(), preds, batch, convention='invpt', weights=weights,
                          edge_w=0.95)
  mlore_tasks = get_tasks(tuple(preds), 'synthetic_scenes', 'mlore')  # sal expects 2 channels
  with pytest.raises(ValueError, match="'sal' has 1 channels, expected 2"):
    losses.compute_losses(mlore_tasks, preds, batch, convention='mlore', weights=weights,
                          edge_w=0.95)


@pytest.mark.parametrize('axis_type', [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize('convention', ['mlore', 'mtlora'])
def test_sharded_batch_gives_same_losses(axis_type, convention):
  preds, batch = _random_mtlora_batch(np.random.RandomState(3), b=8, h=4, w=5)
  if convention == 'mlore':
    preds['sal'] = np.concatenate([-preds['sal'], preds['sal']], axis=-1)
  tasks = get_tasks(tuple(preds), 'synthetic_scenes', convention)
  weights = dict.fromkeys(preds, 1.0)
  gates = [{t: np.random.RandomState(s).rand(8, 15).astype(np.float32) for t in ('a', 'b')}
           for s in range(8)]
  fn = jax.jit(lambda p, b, g: losses.compute_losses(
      tasks, p, b, convention=convention, weights=weights, edge_w=0.95, aux={'gates': g},
      load_balancing_weight=0.1))
  sharding = NamedSharding(jax.make_mesh((8,), ('data',), axis_types=(axis_type,)), P('data'))
  total, per_task = fn(preds, batch, gates)
  total_s, per_task_s = fn(*jax.device_put((preds, batch, gates), sharding))
  np.testing.assert_allclose(total_s, total, rtol=1e-6)
  assert set(per_task_s) == set(preds) | {'load_balancing'}
  for k in per_task:
    np.testing.assert_allclose(per_task_s[k], per_task[k], rtol=1e-6, err_msg=k)
