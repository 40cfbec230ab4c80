"""Tests of mtl_jax/models: ViT parity with the official MLoRE ViT, BatchNorm, resize, model API."""

import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import FIXTURES
from mtl_jax import tasks as tasks_lib
from mtl_jax.convert import vit as vit_convert
from mtl_jax.models import build_model, layers, multitask, vit

VIT_FIXTURE = os.path.join(FIXTURES, 'mlore_pascal_tiny_seed0_vit.npz')


def _torch_bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
  """F.interpolate(bilinear, align_corners=False) on (H, W, C), written pixel by pixel."""
  in_h, in_w = x.shape[:2]
  out = np.zeros((out_h, out_w, x.shape[2]), np.float64)

  def src(dst, in_size, out_size):
    s = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
    i0 = min(int(np.floor(s)), in_size - 1)
    return i0, min(i0 + 1, in_size - 1), s - i0

  for oy in range(out_h):
    y0, y1, ly = src(oy, in_h, out_h)
    for ox in range(out_w):
      x0, x1, lx = src(ox, in_w, out_w)
      out[oy, ox] = ((1 - ly) * ((1 - lx) * x[y0, x0] + lx * x[y0, x1])
                     + ly * ((1 - lx) * x[y1, x0] + lx * x[y1, x1]))
  return out


def _torch_batchnorm_train(x, gamma, beta, mean, var, eps=1e-5, momentum=0.1):
  """torch BatchNorm2d training step on NHWC: output and the new running statistics."""
  x = x.astype(np.float64)
  n = x.size // x.shape[-1]
  bm = x.mean(axis=(0, 1, 2))
  bv = x.var(axis=(0, 1, 2))
  y = (x - bm) / np.sqrt(bv + eps) * gamma + beta
  running_var = (1 - momentum) * var + momentum * bv * n / (n - 1)
  return y, (1 - momentum) * mean + momentum * bm, running_var


def _tiny_config(crop_size=(32, 48), dtype='float32'):
  config = ml_collections.ConfigDict()
  config.input = ml_collections.ConfigDict({'crop_size': crop_size})
  config.model = ml_collections.ConfigDict({
      'name': 'vit_baseline',
      'dtype': dtype,
      'backbone': {'variant': '', 'patch_size': 8, 'embed_dim': 16, 'depth': 3, 'num_heads': 2,
                   'taps': (1, 2), 'drop_path_rate': 0.5},
      'decoder': {'channels': 8, 'upsample': 2},
  })
  return config


@nnx.jit
def _forward(model, images):
  return model(images)


def _modules(model, kind):
  return [m for _, m in nnx.iter_graph(model) if isinstance(m, kind)]


# ------------------------------------------------------------------------------------------------
# ViT (docs/mlore.md §2)

def test_vit_matches_official_mlore_vit():
  data = np.load(VIT_FIXTURE)
  state_dict = {k[len('param/'):]: data[k] for k in data.files if k.startswith('param/')}
  model = vit.ViT((96, 96), **vit.VARIANTS['tiny/16'], rngs=nnx.Rngs(0))
  model.eval()
  params = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(params, vit_convert.backbone_from_torch(state_dict))
  nnx.update(model, params)
  feats = _forward(model, jnp.asarray(data['input'].transpose(0, 2, 3, 1)))  # NCHW -> NHWC
  assert len(feats) == 4
  for i, feat in enumerate(feats):
    ref = data[f'feat/{i}']  # (B, N, D), tokens row-major
    assert feat.shape == (2, 6, 6, 48)
    err = np.abs(np.asarray(feat).reshape(ref.shape) - ref).max() / np.abs(ref).max()
    assert err <= 1e-5, (i, err)


def test_vit_params_from_torch_errors_name_the_key():
  data = np.load(VIT_FIXTURE)
  state_dict = {k[len('param/'):]: data[k] for k in data.files if k.startswith('param/')}
  broken = dict(state_dict)
  del broken['backbone.blocks.3.mlp.fc1.bias']
  with pytest.raises(KeyError, match=r'backbone\.blocks\.3\.mlp\.fc1\.bias'):
    vit_convert.backbone_from_torch(broken)
  broken = dict(state_dict)
  broken['backbone.blocks.5.attn.qkv.weight'] = np.zeros((48, 48), np.float32)
  with pytest.raises(ValueError, match=r'backbone\.blocks\.5\.attn\.qkv\.weight'):
    vit_convert.backbone_from_torch(broken)
  with pytest.raises(KeyError, match='module.backbone.patch_embed'):
    vit_convert.backbone_from_torch(state_dict, prefix='module.backbone.')


@pytest.mark.parametrize('variant,img_size,expected', [
    ('S/16', (512, 512), 21_983_232),
    ('B/16', (512, 512), 86_433_792),
    ('L/16', (512, 512), 304_148_480),
    ('L/16', (448, 576), 304_132_096),
])
def test_vit_param_counts(variant, img_size, expected):
  model = nnx.eval_shape(lambda: vit.ViT(img_size, **vit.VARIANTS[variant], rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  assert sum(x.size for x in jax.tree.leaves(params)) == expected
  assert params['pos_embed'].shape == (1, img_size[0] * img_size[1] // 256 + 1,
                                       vit.VARIANTS[variant]['embed_dim'])


def test_vit_drop_path():
  model = vit.ViT((32, 48), patch_size=8, embed_dim=16, depth=8, num_heads=2, taps=(2, 4, 6),
                  drop_path_rate=0.15, rngs=nnx.Rngs(0))
  rates = [block.drop_path.rate for block in model.blocks]
  np.testing.assert_allclose(rates, np.linspace(0, 0.15, 8), rtol=0, atol=1e-12)
  images = jnp.broadcast_to(jax.random.normal(jax.random.key(1), (1, 32, 48, 3)), (8, 32, 48, 3))

  model.eval()
  a, b = _forward(model, images)[-1], _forward(model, images)[-1]
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(a, jnp.broadcast_to(a[:1], a.shape), atol=1e-6)

  model.train()
  c = _forward(model, images)[-1]
  # Identical samples get different drop masks: per-sample stochastic depth.
  per_sample = [float(jnp.abs(c[i] - c[0]).max()) for i in range(1, 8)]
  assert max(per_sample) > 1e-3

  # One Bernoulli draw per sample, broadcast over tokens/channels, kept samples scaled by 1/keep.
  out = np.asarray(model.blocks[-1].drop_path(jnp.ones((512, 4, 3))))
  per_sample_values = out.reshape(512, -1)
  assert np.all(per_sample_values == per_sample_values[:, :1])
  np.testing.assert_allclose(np.unique(out), [0.0, 1 / 0.85], rtol=1e-6)
  assert 0.08 < np.mean(per_sample_values[:, 0] == 0) < 0.22


def test_vit_size_and_taps_validation():
  with pytest.raises(ValueError, match='not divisible by patch_size'):
    vit.ViT((40, 48), patch_size=16, embed_dim=16, depth=2, num_heads=2, taps=(1,),
            rngs=nnx.Rngs(0))
  for taps in [(2,), (1, 0)]:
    with pytest.raises(ValueError, match='taps'):
      vit.ViT((32, 32), patch_size=16, embed_dim=16, depth=2, num_heads=2, taps=taps,
              rngs=nnx.Rngs(0))
  # A repeated tap returns the same block output twice (tiny smoke configs keep 4 maps).
  feats = nnx.eval_shape(lambda: vit.ViT((32, 32), patch_size=16, embed_dim=16, depth=2,
                                         num_heads=2, taps=(1, 1, 1), rngs=nnx.Rngs(0))(
                                             jnp.zeros((1, 32, 32, 3))))
  assert [f.shape for f in feats] == [(1, 2, 2, 16)] * 4


# ------------------------------------------------------------------------------------------------
# BatchNorm (torch semantics) and SyncBN under a data-sharded jit

def test_batchnorm_matches_torch_semantics():
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, (4, 3, 5, 6)).astype(np.float32)
  bn = layers.BatchNorm(6)
  gamma = rng.normal(1, 0.2, 6).astype(np.float32)
  beta = rng.normal(0, 0.2, 6).astype(np.float32)
  bn.scale[...], bn.bias[...] = gamma, beta
  y, mean, var = _torch_batchnorm_train(x, gamma, beta, np.zeros(6), np.ones(6))
  np.testing.assert_allclose(bn(jnp.asarray(x)), y, atol=1e-5)
  np.testing.assert_allclose(bn.mean[...], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bn.var[...], var, rtol=1e-5)
  # Hand check of the unbiased running variance for a single channel: values 0 and 2,
  # biased var 1, unbiased 2 -> running var 0.9 * 1 + 0.1 * 2 = 1.1, running mean 0.1 * 1.
  bn1 = layers.BatchNorm(1)
  np.testing.assert_allclose(bn1(jnp.array([0.0, 2.0]).reshape(2, 1, 1, 1)).ravel(),
                             [-1 / np.sqrt(1 + 1e-5), 1 / np.sqrt(1 + 1e-5)], rtol=1e-6)
  np.testing.assert_allclose([bn1.mean[...][0], bn1.var[...][0]], [0.1, 1.1], rtol=1e-6)

  bn.use_running_average = True  # what model.eval() sets
  x2 = rng.normal(0, 1, (2, 3, 3, 6)).astype(np.float32)
  expected = (x2 - mean) / np.sqrt(var + 1e-5) * gamma + beta
  np.testing.assert_allclose(bn(jnp.asarray(x2)), expected, atol=1e-5)
  np.testing.assert_allclose(bn.var[...], var, rtol=1e-5)  # unchanged in eval


def test_batchnorm_is_sync_under_sharded_jit():
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  rng = np.random.default_rng(1)
  # Each device's 2 samples have a different offset, so per-device statistics would differ.
  x = (rng.normal(0, 1, (16, 3, 4, 5)) + np.repeat(np.arange(8), 2)[:, None, None, None]
       ).astype(np.float32)

  @nnx.jit
  def step(bn, x):
    return bn(x)

  bn_single, bn_sharded = layers.BatchNorm(5), layers.BatchNorm(5)
  y_single = step(bn_single, jnp.asarray(x))
  x_sharded = jax.device_put(x, NamedSharding(mesh, P('data')))
  y_sharded = step(bn_sharded, x_sharded)
  assert y_sharded.sharding.spec[0] == 'data'
  np.testing.assert_allclose(y_sharded, y_single, atol=1e-5)
  np.testing.assert_allclose(bn_sharded.mean[...], bn_single.mean[...], atol=1e-6)
  np.testing.assert_allclose(bn_sharded.var[...], bn_single.var[...], rtol=1e-5)
  y, mean, var = _torch_batchnorm_train(x, np.ones(5), np.zeros(5), np.zeros(5), np.ones(5))
  np.testing.assert_allclose(y_sharded, y, atol=1e-5)
  np.testing.assert_allclose(bn_sharded.mean[...], mean, atol=1e-6)
  np.testing.assert_allclose(bn_sharded.var[...], var, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Bilinear resize (torch align_corners=False)

def test_resize_bilinear_hand_values():
  x = jnp.array([0.0, 1.0]).reshape(1, 1, 2, 1)
  # Source positions (i + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (-> index 1).
  np.testing.assert_allclose(layers.resize_bilinear(x, (1, 4)).ravel(), [0, 0.25, 0.75, 1.0])
  x = jnp.arange(4.0).reshape(1, 1, 4, 1)
  # Downsampling by 2 samples at 0.5 and 2.5: averages of neighbours, no antialiasing.
  np.testing.assert_allclose(layers.resize_bilinear(x, (1, 2)).ravel(), [0.5, 2.5])


@pytest.mark.parametrize('in_hw,out_hw', [
    ((5, 7), (12, 17)),   # upsample, non-integer factors
    ((3, 4), (12, 16)),   # x4 (the decoder's scale_factor=4)
    ((12, 17), (5, 7)),   # downsample
    ((6, 9), (6, 4)),     # mixed
])
def test_resize_bilinear_matches_torch_formula(in_hw, out_hw):
  x = np.random.default_rng(0).normal(size=(2, *in_hw, 3)).astype(np.float32)
  out = layers.resize_bilinear(jnp.asarray(x), out_hw)
  assert out.shape == (2, *out_hw, 3)
  for b in range(2):
    np.testing.assert_allclose(out[b], _torch_bilinear(x[b], *out_hw), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# MultiTaskModel / build_model

def test_multitask_model_shapes_grad_and_modes():
  tasks = tasks_lib.get_tasks(['semseg', 'depth', 'normals', 'edge'], 'nyud_v2')
  model = build_model(_tiny_config(), tasks, rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(0), (2, 32, 48, 3))

  model.eval()
  assert all(bn.use_running_average for bn in _modules(model, layers.BatchNorm))
  assert all(d.deterministic for d in _modules(model, nnx.Dropout))
  stats = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  preds, aux = _forward(model, images)
  assert aux == {}
  assert set(preds) == set(tasks)
  for name, task in tasks.items():
    assert preds[name].shape == (2, 32, 48, task.num_outputs)
    assert preds[name].dtype == jnp.float32
  np.testing.assert_array_equal(preds['semseg'], _forward(model, images)[0]['semseg'])
  jax.tree.map(np.testing.assert_array_equal, stats, nnx.state(model, nnx.BatchStat))

  @nnx.jit
  def train_step(model, images):
    def loss_fn(model):
      preds, _ = model(images)
      return sum(jnp.mean(jnp.square(p)) for p in preds.values()), preds
    (_, preds), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return preds, grads

  model.train()
  assert not any(bn.use_running_average for bn in _modules(model, layers.BatchNorm))
  assert not any(d.deterministic for d in _modules(model, nnx.Dropout))
  train_preds, grads = train_step(model, images)
  assert not np.allclose(train_preds['semseg'], train_step(model, images)[0]['semseg'])  # drop path
  new_stats = nnx.state(model, nnx.BatchStat)
  assert not np.allclose(new_stats['heads']['semseg']['bn']['mean'][...],
                         stats['heads']['semseg']['bn']['mean'])
  leaves = jax.tree.leaves(grads)
  assert len(leaves) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert all(np.isfinite(g).all() for g in leaves)
  assert np.abs(grads['backbone']['patch_embed']['kernel'][...]).max() > 0
  assert np.abs(grads['heads']['edge']['linear_pred']['kernel'][...]).max() > 0


def test_build_model_variant_bfloat16_and_errors():
  tasks = tasks_lib.get_tasks(['semseg', 'sal'], 'pascal_context')
  config = _tiny_config(crop_size=(32, 64), dtype='bfloat16')
  model = build_model(config, tasks, rngs=nnx.Rngs(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  model.eval()
  feats = _forward(model.backbone, jnp.zeros((1, 32, 64, 3)))
  assert [f.shape for f in feats] == [(1, 4, 8, 16)] * 3 and feats[0].dtype == jnp.bfloat16
  preds, _ = _forward(model, jnp.zeros((1, 32, 64, 3)))
  assert preds['sal'].shape == (1, 32, 64, 2) and preds['sal'].dtype == jnp.float32

  config.model.backbone.variant = 'tiny/16'
  model = nnx.eval_shape(lambda: build_model(config, tasks, rngs=nnx.Rngs(0)))
  assert model.backbone.grid == (2, 4) and len(model.backbone.blocks) == 8
  assert model.backbone.taps == (2, 4, 6)
  assert model.decoder.fuse.kernel.shape == (1, 1, 4 * 48, 8)

  config.model.backbone.variant = 'H/14'
  with pytest.raises(ValueError, match='S/16'):
    build_model(config, tasks, rngs=nnx.Rngs(0))
  config.model.name = 'resnet'
  with pytest.raises(ValueError, match='vit_baseline'):
    build_model(config, tasks, rngs=nnx.Rngs(0))


def test_fuse_decoder_and_conv_head():
  rngs = nnx.Rngs(0)
  decoder = multitask.FuseDecoder([4, 4, 6], 5, ['a', 'b'], upsample=4, rngs=rngs)
  feats = [jnp.ones((2, 3, 5, 4)), jnp.ones((2, 3, 5, 4)), jnp.ones((2, 3, 5, 6))]
  out, aux = decoder(feats)
  assert aux == {} and list(out) == ['a', 'b'] and out['a'] is out['b']
  assert out['a'].shape == (2, 3, 5, 5) and decoder.head_upsample == 4  # the heads upsample
  head = multitask.ConvHead(5, 3, rngs=rngs)
  assert head(out['a'], upsample=4).shape == (2, 12, 20, 3)
  assert head.conv.kernel.shape == (3, 3, 5, 5) and head.linear_pred.kernel.shape == (1, 1, 5, 3)


@pytest.mark.parametrize('kernel_size,factor,size', [(3, 4, (5, 7)), (3, 2, (1, 4)), (5, 3, (4, 3)),
                                                     (1, 4, (3, 3)), (3, 1, (4, 4))])
def test_conv_of_upsampled_is_the_conv_of_the_resized_map(kernel_size, factor, size):
  """layers.conv_of_upsampled (the heads' x4 upsampling + 3x3 conv at the low resolution) equals
  resize_bilinear then a 'same' conv: borders (clamped resampling, zero padding) included."""
  x = jax.random.normal(jax.random.key(0), (2, *size, 6))
  kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, 6, 4))
  pad = kernel_size // 2
  want = jax.lax.conv_general_dilated(
      layers.resize_bilinear(x, (factor * size[0], factor * size[1])), kernel, (1, 1),
      [(pad, pad)] * 2, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)
  got = layers.conv_of_upsampled(x, kernel, factor)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_conv_head_upsample_equals_head_of_the_resized_map_with_gradients():
  """ConvHead(x, upsample=4) is ConvHead(resize_bilinear(x)): outputs and every gradient (the
  MLoRE / ViT-baseline heads, models/multitask.py)."""
  head = multitask.ConvHead(8, 3, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (2, 6, 5, 8))

  def loss(head, x, lazy):
    out = head(x, upsample=4) if lazy else head(layers.resize_bilinear(x, (24, 20)))
    return jnp.sum(jnp.sin(out)), out

  (_, got), grads_got = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(head, x, True)
  (_, want), grads_want = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(head, x, False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  leaves_got, leaves_want = jax.tree.leaves(grads_got), jax.tree.leaves(grads_want)
  assert len(leaves_got) == len(leaves_want) == 7
  scale = max(float(jnp.abs(w).max()) for w in leaves_want)
  for g, w in zip(leaves_got, leaves_want):  # (the conv bias before BatchNorm: ~0 gradient)
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale)


def test_unrolled_threefry_gives_the_same_random_bits():
  """mtl_jax.xla_cpu.unroll_threefry (applied by mtl_jax.models) changes the speed of CPU random
  draws, not their bits: this process's bits and dropout mask equal those of a fresh process
  with jax's default (rolled) lowering (float-transformed draws may differ in the last ulp:
  docs/stack.md §11)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from mtl_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  assert xla_cpu._DONE  # pylint: disable=protected-access
  lowered = jax.jit(lambda k: jax.random.bits(k, (8,))).lower(jax.random.key(0)).as_text()
  assert 'threefry' in lowered and 'while' not in lowered  # the unrolled lowering is in use
  code = ('import jax, numpy as np; k = jax.random.key(7); '
          'b = jax.jit(lambda k: jax.random.bits(k, (1000,)))(k); '
          'm = jax.jit(lambda k: jax.random.bernoulli(k, 0.95, (999,)))(jax.random.fold_in(k, 1)); '
          'print(np.asarray(b).tobytes().hex() + np.packbits(np.asarray(m)).tobytes().hex())')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  default = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                           check=True, env=env).stdout.strip()
  k = jax.random.key(7)
  bits = jax.jit(lambda k: jax.random.bits(k, (1000,)))(k)
  mask = jax.jit(lambda k: jax.random.bernoulli(k, 0.95, (999,)))(jax.random.fold_in(k, 1))
  assert (np.asarray(bits).tobytes().hex() + np.packbits(np.asarray(mask)).tobytes().hex()
          == default)


_FAULTS = """
import resource, sys
import jax, jax.numpy as jnp, ml_collections
from mtl_jax import xla_cpu
if sys.argv[1] == 'late':
  jnp.ones(1).block_until_ready()  # jax's backends start first
xla_cpu.set_host_memory(ml_collections.ConfigDict(dict(host_huge_pages=sys.argv[2] == 'on')))
# g: a 156 MiB buffer (used twice, so not fused away), freed at the end of each call.
f = jax.jit(lambda x, w: (lambda g: (g @ w).sum() + g.sum())(jnp.tanh(x) * x + 2))
x, w = jnp.ones((40000, 1024)), jnp.ones((1024, 4))
for _ in range(2):
  f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x, w).block_until_ready()
print(xla_cpu.host_huge_pages(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _thp_available() -> bool:
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return '[never]' not in f.read()
  except OSError:
    return False


@pytest.mark.skipif(not _thp_available(), reason='no transparent huge pages on this kernel')
def test_host_huge_pages_cut_the_page_faults_of_a_step():
  """config.host_huge_pages restarts the process with glibc's hugetlb tunable (mtl_jax/xla_cpu.py):
  a step's large buffer, unmapped after each call, comes back in 2 MiB pages, not 4 KiB ones;
  set after jax's backends started, it changes nothing and says so (docs/stack.md §13)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  def run(when, mode):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    env.pop('XLA_FLAGS', None)
    env.pop('GLIBC_TUNABLES', None)
    p = subprocess.run([sys.executable, '-c', _FAULTS, when, mode], capture_output=True,
                       text=True, check=True, env=env)
    huge, faults = p.stdout.split()
    return huge == 'True', int(faults), p.stderr

  huge, faults_default, _ = run('first', 'off')
  assert not huge and faults_default > 39000, faults_default  # 156 MiB = 40,000 pages of 4 KiB
  huge, faults, _ = run('first', 'on')
  assert huge and faults < faults_default / 8, (faults, faults_default)
  huge, faults, stderr = run('late', 'on')
  assert not huge and faults > 39000 and 'jax backends already started' in stderr


@pytest.mark.parametrize('shape', [(7, 5), (2, 3, 7, 5), (2, 9, 5)])
def test_matmul_and_linear_equal_the_plain_dot(shape):
  """layers.matmul / layers.linear merge the leading axes: the same products and sums as x @ w,
  values and gradients (docs/stack.md §12)."""
  x = jax.random.normal(jax.random.key(0), shape)
  w = jax.random.normal(jax.random.key(1), (5, 6))
  np.testing.assert_allclose(layers.matmul(x, w), x @ w, rtol=1e-6, atol=1e-6)
  g = jax.grad(lambda w: jnp.sum(jnp.sin(layers.matmul(x, w))))(w)
  np.testing.assert_allclose(g, jax.grad(lambda w: jnp.sum(jnp.sin(x @ w)))(w), rtol=1e-5,
                             atol=1e-5)
  lin = layers.linear(5, 6, kernel_init=nnx.initializers.lecun_normal(), rngs=nnx.Rngs(0))
  ref = nnx.Linear(5, 6, kernel_init=nnx.initializers.lecun_normal(), rngs=nnx.Rngs(0))
  np.testing.assert_allclose(lin(x), ref(x), rtol=1e-6, atol=1e-6)
  # A contraction that is not (..., K) x (K, N) goes to lax.dot_general unchanged.
  y = layers.dot_general(w, x.reshape(-1, 5), (((0,), (1,)), ((), ())))
  np.testing.assert_allclose(y, w.T @ x.reshape(-1, 5).T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('kernel,stride,pad,size', [
    (1, 1, 0, (9, 11)),   # 1x1 conv -> matmul
    (4, 4, 0, (16, 20)),  # patch embedding -> patches @ kernel
    (4, 4, 0, (18, 23)),  # patch embedding with a remainder the conv skips
    (3, 1, 1, (9, 11)),   # 3x3 'same' -> im2col on CPU
    (3, 2, 0, (9, 11)),   # strided, overlapping -> the conv itself
])
def test_conv_general_equals_the_conv(kernel, stride, pad, size):
  """layers.conv_general (1x1 convs and patch embeddings as matmuls) and conv_as_matmul compute
  lax.conv_general_dilated's function, values and gradients."""
  x = jax.random.normal(jax.random.key(0), (2, *size, 3))
  k = jax.random.normal(jax.random.key(1), (kernel, kernel, 3, 8))
  args = ((stride, stride), [(pad, pad)] * 2)
  dn = ('NHWC', 'HWIO', 'NHWC')
  ref = lambda x, k: jax.lax.conv_general_dilated(x, k, *args, dimension_numbers=dn)
  fns = [layers.conv_general] + ([layers.conv_as_matmul] if stride == 1 else [])
  for fn in fns:
    got = lambda x, k, fn=fn: fn(x, k, *args, dimension_numbers=dn)
    np.testing.assert_allclose(got(x, k), ref(x, k), rtol=1e-5, atol=1e-5)
    loss = lambda f: jax.grad(lambda x, k: jnp.sum(jnp.sin(f(x, k))), argnums=(0, 1))(x, k)
    for a, b in zip(loss(got), loss(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  conv = layers.conv(3, 8, kernel, stride=stride, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(conv(x), ref(x, conv.kernel[...]) + conv.bias[...], rtol=1e-5,
                             atol=1e-5)


def test_drop_path_keeps_nnx_dropout_masks():
  """layers.DropPath draws the very keys and masks of nnx.Dropout(broadcast over all but the
  batch axis) and computes select(mask, x / keep, 0); eval mode and rate 0 are the identity."""
  x = jax.random.normal(jax.random.key(1), (16, 5, 6, 7))
  ref = nnx.Dropout(0.3, broadcast_dims=(1, 2, 3), rngs=nnx.Rngs(dropout=3))
  drop = layers.DropPath(0.3, rngs=nnx.Rngs(dropout=3))
  step = nnx.jit(lambda m, x: m(x))
  for _ in range(3):
    np.testing.assert_array_equal(step(drop, x), ref(x))
  drop.eval()
  np.testing.assert_array_equal(drop(x), x)
  np.testing.assert_array_equal(layers.DropPath(0.0, rngs=nnx.Rngs(0))(x), x)


def test_dropout_keeps_nnx_masks_and_hashes_once_per_call():
  """layers.Dropout (the LoRA dropout) draws nnx.Dropout's masks, full-size and broadcast; in a
  compiled gradient whose mask feeds a dot and an elementwise product, the mask's threefry hash
  sits in one XLA computation, where nnx.Dropout's is duplicated into its consumers."""
  x = jax.random.normal(jax.random.key(1), (16, 5, 7))
  for dims in ((), (1,)):
    ref = nnx.Dropout(0.3, broadcast_dims=dims, rngs=nnx.Rngs(dropout=3))
    drop = layers.Dropout(0.3, broadcast_dims=dims, rngs=nnx.Rngs(dropout=3))
    for _ in range(2):
      np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(drop, x), ref(x))

  def hashing_computations(cls) -> int:
    drop = cls(0.1, rngs=nnx.Rngs(dropout=0))

    def loss(a, x, key):
      xd = drop(x, deterministic=False, rngs=key)
      return jnp.sum(jnp.tanh(xd @ a)) + jnp.sum(xd * x)

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
        jnp.ones((32, 8)), jnp.ones((64, 32)), jax.random.key(0)).compile().as_text()
    bodies = re.split(r'\n(?=\S)', hlo)  # one HLO computation per top-level block
    return sum('xor(' in b for b in bodies if not b.startswith('ENTRY'))

  assert hashing_computations(layers.Dropout) == 1
  assert hashing_computations(nnx.Dropout) > 1


def test_gelu_is_torch_exact_gelu():
  """layers.gelu is x/2 (1 + erf(x/sqrt 2)), torch's nn.GELU(); equal to jax's erfc form to
  float32 rounding (docs/stack.md §12)."""
  x = jnp.linspace(-9.0, 9.0, 20001)
  np.testing.assert_allclose(layers.gelu(x), jax.nn.gelu(x, approximate=False), rtol=0,
                             atol=2e-6)
  np.testing.assert_allclose(jax.grad(lambda x: layers.gelu(x).sum())(x),
                             jax.grad(lambda x: jax.nn.gelu(x, approximate=False).sum())(x),
                             rtol=0, atol=2e-6)
  assert layers.gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16


def _swap_tasks(tree: dict, a: str, b: str) -> dict:
  """`tree` (a pure state dict) with the backbone/decoder leaves under key `a` and key `b`
  exchanged (TS-LoRA `<task>` keys, per-task prompts and downsamplers)."""
  if not isinstance(tree, dict):
    return tree
  out = {k: _swap_tasks(v, a, b) for k, v in tree.items()}
  if a in out and b in out:
    out[a], out[b] = out[b], out[a]
  return out


@pytest.mark.slow
@pytest.mark.parametrize('recipe,arg,symmetric', [
    ('mtlora_pascal', 'smoke', True), ('promlora_pascal', 'smoke', True),
    ('swin_pascal', 'smoke', True), ('demo', 'smoke,model=vit_baseline', True),
    ('promlora_pascal', 'smoke,dynamic', False), ('demo', 'smoke', False)])
def test_task_symmetric_models_swap_maps_when_two_tasks_own_leaves_swap(recipe, arg, symmetric):
  """The `task_symmetric` declaration (models/multitask.py; the meta-learning scan relies on it,
  docs/methods.md §2) holds: exchanging two tasks' own backbone/decoder leaves exchanges their
  decoder maps, every weight randomised so that the tasks' maps differ. It does not hold for
  the models that do not declare it (MLoRE's stacked routers, dynamic prompt pools' gates)."""
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{recipe}').get_config(arg)
  tasks = tasks_lib.config_tasks(config)
  model = build_model(config, tasks, rngs=nnx.Rngs(0))
  model.eval()
  assert multitask.tasks_symmetric(model) is symmetric
  state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  state = treedef.unflatten([x + 0.2 * jax.random.normal(k, x.shape, x.dtype)
                             for x, k in zip(leaves, keys)])
  nnx.update(model, state)
  images = jax.random.normal(jax.random.key(2), (2, *config.input.crop_size, 3))
  decode = nnx.jit(lambda m, x: m.decoder(m.backbone(x))[0])
  # Each task's map (or per-scale maps, HRNetDecoder) as one vector.
  forward = lambda m, x: {t: np.concatenate([np.ravel(y) for y in jax.tree.leaves(v)])
                          for t, v in jax.device_get(decode(m, x)).items()}
  before = forward(model, images)
  a, b = list(tasks)[:2]
  swapped = {k: v if k == 'heads' else _swap_tasks(v, a, b) for k, v in state.items()}
  if all(x is y for x, y in zip(jax.tree.leaves(swapped), jax.tree.leaves(state))):
    assert symmetric  # no task-owned leaves (the ViT baseline): one map for every task
    jax.tree.map(lambda m: np.testing.assert_array_equal(m, before[a]), before)
    return
  assert np.max(np.abs(before[a] - before[b])) > 1e-3  # the tasks' maps differ
  nnx.update(model, swapped)
  after = forward(model, images)
  assert symmetric == np.allclose(after[a], before[b], rtol=1e-5, atol=1e-5)
  if symmetric:
    np.testing.assert_allclose(after[b], before[a], rtol=1e-5, atol=1e-5)
    for t in list(tasks)[2:]:
      np.testing.assert_allclose(after[t], before[t], rtol=1e-5, atol=1e-5)
