"""Accelerator readiness, on CPU (issue 11): bf16 compute against the fp32 fixtures, remat policies
that leave the gradients unchanged, the ViT's fused attention and the `perf/*` step figures
(mtl_jax/perf.py, docs/accelerators.md)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo
from configs import mtlora_pascal
from configs import promlora_pascal
from mtl_jax import ConfigError
from mtl_jax import models
from mtl_jax import perf
from mtl_jax import tasks as tasks_lib
from mtl_jax.models import vit
from test_swin import parity_rows

# -- bf16 compute ------------------------------------------------------------------------------

BF16_TOL = 0.1  # max |bf16 - fp32 reference| / max |reference| of every output and feature map


@pytest.mark.parametrize('name', ['mtlora_tiny_seed0', 'promlora_tiny_seed0',
                                  'mlore_pascal_tiny_seed0'])
def test_bfloat16_forward_is_close_to_the_fp32_reference(name):
  """config.model.dtype=bfloat16 (parameters stay fp32, logits come out fp32): every task output
  and backbone feature within BF16_TOL of the fixture (measured 2026-12-02: out 2.2e-2 MTLoRA,
  5.2e-2 ProMLoRA, 3.7e-2 MLoRE), and really computed in bf16 (error far above fp32's 1e-6).
  MLoRE's router gates are not compared: a near-tie in its top-k may flip in bf16."""
  rows, config = parity_rows(name, 'bfloat16', tol=float('inf'))
  assert config.model.dtype == 'bfloat16'
  checked = [(k, rel) for k, _, rel in rows if k.startswith(('out/', 'feat/'))]
  assert any(k.startswith('out/') for k, _ in checked)
  bad = [(k, rel) for k, rel in checked if rel > BF16_TOL]
  assert not bad, bad
  assert max(rel for _, rel in checked) > 1e-3, 'no bf16 rounding: dtype not applied?'


# -- remat -------------------------------------------------------------------------------------

def _grads(config, remat: str, train: bool = True):
  """Loss and gradients of a fixed random objective of every task output with
  `config.model.backbone.remat = remat`; `train`: dropout and drop path active, same seeds."""
  config = config.copy_and_resolve_references()
  config.model.backbone.remat = remat
  tasks = tasks_lib.config_tasks(config)
  model = models.build_model(config, tasks, rngs=nnx.Rngs(0))
  model.train() if train else model.eval()
  h, w = config.input.crop_size
  images = jax.random.normal(jax.random.key(1), (2, h, w, 3))

  streams = sorted({s.tag for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)})
  graph, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def value_and_grad(params, rest):
    def loss_fn(params):
      model = nnx.merge(graph, params, rest)
      nnx.reseed(model, **{s: 7 + i for i, s in enumerate(streams)})  # same masks per policy
      preds, _ = model(images)
      return sum(jnp.mean(jnp.square(p - jax.random.normal(jax.random.key(i), p.shape)))
                 for i, (_, p) in enumerate(sorted(preds.items())))
    return jax.value_and_grad(loss_fn)(params)

  loss, grads = value_and_grad(nnx.to_pure_dict(params), nnx.to_pure_dict(rest))
  return float(loss), grads


def _tiny_mlore():
  c = demo.get_config('smoke')
  c.model.backbone.drop_path_rate = 0.2
  return c


@pytest.mark.slow  # ~1.5 min each: three gradient compiles
@pytest.mark.parametrize('make_config,train', [
    (_tiny_mlore, True),  # ViT blocks (MLoRE decoder), drop path
    (lambda: mtlora_pascal.get_config('smoke'), True),  # Swin blocks, MTLoRA task streams, dropout
    # Swin blocks with deep prompts, eval mode: with the random masks under remat XLA:CPU takes
    # >15 min to compile this gradient (docs/stack.md §4); the masks' path is the two cases above.
    (lambda: promlora_pascal.get_config('smoke'), False),
], ids=['vit', 'mtlora', 'promlora'])
def test_remat_policies_give_the_same_gradients(make_config, train):
  config = make_config()
  loss, want = _grads(config, 'none', train)
  for remat in ('blocks', 'full'):
    got_loss, got = _grads(config, remat, train)
    assert got_loss == pytest.approx(loss, rel=1e-6), remat  # XLA may fuse differently
    flat_want = jax.tree_util.tree_leaves_with_path(want)
    flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
    assert len(flat_got) == len(flat_want)
    for path, g in flat_want:
      np.testing.assert_allclose(flat_got[path], g, rtol=1e-4, atol=1e-6 * np.abs(g).max() + 1e-9,
                                 err_msg=f'{remat} {jax.tree_util.keystr(path)}')


def test_unknown_remat_policy_is_a_config_error():
  config = demo.get_config('smoke')
  config.model.backbone.remat = 'sometimes'
  with pytest.raises(ConfigError, match="remat 'sometimes'; known: none, blocks, full"):
    models.build_model(config, tasks_lib.config_tasks(config), rngs=nnx.Rngs(0))


# -- the ViT's attention -----------------------------------------------------------------------

def test_vit_attention_is_the_literal_softmax_attention():
  """The ViT's attention (cuDNN's fused kernel on GPU in bf16; here its CPU form and XLA's
  composition) computes softmax(q k^T / sqrt(d)) v of the qkv split (docs/mlore.md §2)."""
  x = jax.random.normal(jax.random.key(0), (2, 10, 24))
  for attention in ('auto', 'xla'):
    attn = vit.Attention(24, 3, dtype=jnp.float32, attention=attention, rngs=nnx.Rngs(0))
    qkv = attn.qkv(x).reshape(2, 10, 3, 3, 8)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (B, heads, N, hd)
    p = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(8), axis=-1)
    want = attn.proj((p @ v).transpose(0, 2, 1, 3).reshape(2, 10, 24))
    np.testing.assert_allclose(attn(x), want, rtol=1e-5, atol=1e-6)


def test_attention_implementation_per_backend_dtype_and_head_dim():
  """config.model.backbone.attention 'auto' (docs/accelerators.md §3): the CPU form on CPU,
  cuDNN on GPU only where its fused kernel applies (bf16/fp16, head_dim % 8 == 0 and <= 128),
  XLA elsewhere (TPU, fp32); a forced implementation wins over the configured one."""
  bf16, f32 = jnp.bfloat16, jnp.float32
  assert vit.resolve_attention('auto', bf16, 64, 'cpu') == 'cpu'
  assert vit.resolve_attention('auto', bf16, 64, 'gpu') == 'cudnn'
  assert vit.resolve_attention('auto', jnp.float16, 128, 'gpu') == 'cudnn'
  assert vit.resolve_attention('auto', f32, 64, 'gpu') == 'xla'
  assert vit.resolve_attention('auto', bf16, 36, 'gpu') == 'xla'
  assert vit.resolve_attention('auto', bf16, 256, 'gpu') == 'xla'
  assert vit.resolve_attention('auto', bf16, 64, 'tpu') == 'xla'
  assert vit.resolve_attention('xla', bf16, 64, 'cpu') == 'xla'
  with vit.attention_implementation('xla'):
    assert vit.resolve_attention('auto', bf16, 64, 'gpu') == 'xla'
  assert vit.resolve_attention('auto', bf16, 64, 'gpu') == 'cudnn'
  config = demo.get_config('smoke')
  config.model.backbone.attention = 'flash'
  with pytest.raises(ConfigError, match="attention 'flash'; known: auto, xla, cudnn"):
    models.build_model(config, tasks_lib.config_tasks(config), rngs=nnx.Rngs(0))


def test_gpu_attention_dispatches_to_cudnn_and_falls_back(monkeypatch):
  """On a GPU backend (simulated), bf16 attention calls jax.nn.dot_product_attention with
  implementation='cudnn'; where cuDNN refuses while tracing, 'auto' falls back to 'xla' and an
  explicit 'cudnn' raises."""
  calls, refuse = [], []

  def fake(q, k, v, implementation=None):
    calls.append(implementation)
    if implementation in refuse:
      raise RuntimeError('cuDNN is not detected')
    return q

  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(jax.nn, 'dot_product_attention', fake)
  q = jnp.zeros((1, 4, 2, 16), jnp.bfloat16)
  vit.dot_product_attention(q, q, q)
  vit.dot_product_attention(q.astype(jnp.float32), q, q)
  assert calls == ['cudnn', 'xla']
  refuse.append('cudnn')
  calls.clear()
  vit.dot_product_attention(q, q, q)
  assert calls == ['cudnn', 'xla']
  with pytest.raises(RuntimeError, match='cuDNN'):
    vit.dot_product_attention(q, q, q, 'cudnn')


@pytest.mark.parametrize('head_dim', [64, 24])
def test_cpu_attention_equals_jax_dot_product_attention_with_gradients(head_dim):
  """vit.dot_product_attention's CPU form (scale on q, max held constant, normalisation after
  the value product) is jax.nn.dot_product_attention: outputs and gradients, large logits
  (the max shift matters) and a scale that is not a power of two (head_dim 24)."""
  ks = jax.random.split(jax.random.key(3), 4)
  q, k, v, cotangent = (jax.random.normal(key, (2, 40, 3, head_dim)) * 4 for key in ks)

  def loss(attention, q, k, v):
    return jnp.sum(attention(q, k, v) * cotangent)

  got, grads = jax.value_and_grad(loss, argnums=(1, 2, 3))(vit.dot_product_attention, q, k, v)
  want, grads_want = jax.value_and_grad(loss, argnums=(1, 2, 3))(jax.nn.dot_product_attention,
                                                                 q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(grads, grads_want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.abs(w).max()))
  # bfloat16 in and out, float32 inside: as close to the float32 result as jax's own bf16 path.
  q, k, v = q / 4, k / 4, v / 4
  exact = jax.nn.dot_product_attention(q, k, v)
  bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
  out = vit.dot_product_attention(*bf16)
  assert out.dtype == jnp.bfloat16
  err = float(jnp.abs(out.astype(jnp.float32) - exact).max())
  err_jax = float(jnp.abs(jax.nn.dot_product_attention(*bf16).astype(jnp.float32) - exact).max())
  assert err <= 2 * err_jax + 1e-3, (err, err_jax)


# -- perf figures ------------------------------------------------------------------------------

def test_flops_with_xla_attention_retraces_with_the_xla_form(monkeypatch):
  """perf.flops_with_xla_attention (the trainer's FLOP count on GPU, where XLA counts nothing
  inside cuDNN's attention call) traces the step again with every attention in its XLA form,
  even after the default form's trace is in jit's cache, and counts what a model built with
  attention='xla' counts."""
  def loss_of(model):
    graph, params = nnx.split(model)
    return lambda params, x: sum(jnp.sum(f) for f in nnx.merge(graph, params)(x).maps), params

  sizes = dict(img_size=(32, 32), patch_size=16, embed_dim=32, depth=2, num_heads=2, taps=(1,))
  x = jnp.ones((2, 32, 32, 3))
  f, params = loss_of(vit.ViT(**sizes, rngs=nnx.Rngs(0)))
  default = perf._flops(jax.jit(f).lower(params, x).cost_analysis())  # the CPU form, cached
  calls = []
  real = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, 'dot_product_attention',
                      lambda *a, **k: calls.append(k['implementation']) or real(*a, **k))
  counted = perf.flops_with_xla_attention(f, params, x)
  assert calls == ['xla', 'xla']  # one per block, traced afresh
  f_xla, params_xla = loss_of(vit.ViT(**sizes, attention='xla', rngs=nnx.Rngs(0)))
  assert counted == perf._flops(jax.jit(f_xla).lower(params_xla, x).cost_analysis())
  assert counted != default and counted > 0


def test_trainer_step_flops_on_a_mesh_match_the_compiled_count(tfds_dir, tmp_path):
  """Trainer.step_flops (what the trainer reports on GPU) on a 2-device mesh: the un-partitioned
  step's FLOPs / 2 agree with XLA's per-device count of the compiled step within 20 % (they
  differ in the attention form and in what partitioning and fusion add)."""
  from mtl_jax import input_pipeline, sharding, train  # pylint: disable=g-import-not-at-top
  config = demo.get_config('smoke,model=vit_baseline')
  config.dataset.update(name='synthetic_scenes/tiny', data_dir=tfds_dir, build_if_missing=False)
  config.batch_size = 4
  trainer = train.Trainer(config, tmp_path, jax.devices()[:2])
  batch = sharding.global_batch(next(input_pipeline.make_train_iterator(
      config, trainer.tasks, source=trainer.train_source)), trainer.mesh)
  state = trainer.init_state()
  compiled = perf._flops(trainer.train_step.lower(state, trainer.rest, batch).compile()
                         .cost_analysis())
  counted = trainer.step_flops(state, batch)
  assert compiled > 0 and 0.8 < counted / compiled < 1.2, (counted, compiled)


def test_peak_flops_table_and_override():
  cpu = jax.devices()[0]
  assert perf.peak_flops(cpu) is None  # no CPU entry: no MFU unless overridden
  assert perf.peak_flops(cpu, 2e11) == 2e11

  class FakeDevice:
    device_kind = 'NVIDIA H100 80GB HBM3'

  assert perf.peak_flops(FakeDevice()) == 989e12


def test_step_cost_scalars():
  cost = perf.StepCost(flops=5e11, peak=1e12)
  out = cost.scalars(steps_per_sec=0.5, global_batch=8)
  assert out['perf/mfu'] == pytest.approx(0.25)
  assert out['perf/img_per_sec'] == 4.0
  assert out['perf/flops_per_device_step'] == 5e11
  assert out['perf/peak_memory_bytes'] > 10 * 2 ** 20  # this process holds jax: > 10 MiB
  assert 'perf/mfu' not in perf.StepCost(flops=5e11, peak=None).scalars(0.5, 8)


def test_step_cost_of_a_compiled_matmul():
  a = jnp.ones((64, 32))
  compiled = jax.jit(lambda x: x @ x.T).lower(a).compile()
  cost = perf.StepCost.of(compiled, peak_override=1e9)
  assert cost.flops == pytest.approx(2 * 64 * 64 * 32, rel=0.01)
  assert cost.peak == 1e9


# -- the GPU suite -----------------------------------------------------------------------------

@pytest.mark.slow  # ~1.5 min: compiles the MLoRE and MTLoRA smoke steps
def test_gpu_suite_cpu_mode():
  """benchmarks/gpu_suite.py --smoke: both models' steps run in their subprocesses, without
  the input pipeline, and report img/s, XLA FLOPs and peak memory."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, os.path.join(root, 'benchmarks', 'gpu_suite.py'),
                        '--smoke', '--steps=1', '--attention=xla'], capture_output=True,
                       text=True, check=True)
  rows = json.loads(out.stdout.strip().splitlines()[-1])['rows']
  assert sorted(r['model'] for r in rows) == ['mlore_vitl_512', 'mtlora_r64_swint_448']
  assert {r['model']: r['attention'] for r in rows} == {
      'mlore_vitl_512': 'xla', 'mtlora_r64_swint_448': 'window (Swin)'}  # --attention reached
  for r in rows:
    assert r['loss_finite'] and r['perf/img_per_sec'] > 0, r
    assert r['perf/flops_per_device_step'] > 1e6 and r['perf/peak_memory_bytes'] > 2 ** 20, r
  assert 'img/s' in out.stdout


def test_cpu_layers_benchmark_runs_and_checks_agreement():
  """benchmarks/cpu_layers.py --small: every layer's old and new lowering agree (it exits
  non-zero otherwise) and a row with both times is printed per layer (no speed claim here)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, os.path.join(root, 'benchmarks', 'cpu_layers.py'),
                        '--small', '--repeats=1'], capture_output=True, text=True, check=True)
  rows = [line for line in out.stdout.splitlines() if line.endswith('x')]
  assert len(rows) == 7, out.stdout
