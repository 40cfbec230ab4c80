"""MLoRE (mtl_jax/models/mlore.py) against the official PyTorch code, docs/mlore.md §3, §4, §10.

The golden arrays come from tests/fixtures/mlore_pascal_tiny_seed0_slim.npz (a slim extract of
the official fixture, see tests/fixtures/make_slim.py): every parameter, the eval-mode outputs
(cropped), intermediates, re-parameterised outputs, losses on random targets and a subset of the
gradients. The parity CLI itself runs on the full fixtures (`python -m mtl_jax.tools.parity`).
"""

import importlib.util
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FIXTURES
from configs import common
from mtl_jax import ConfigError
from mtl_jax import losses
from mtl_jax import tasks as tasks_lib
from mtl_jax.convert import mlore as mlore_convert
from mtl_jax.models import mlore
from mtl_jax.tools import parity

SLIM = 'mlore_pascal_tiny_seed0_slim.npz'


def _slim_crops() -> dict[str, tuple]:
  """{key regex: index} the slim file applied to its arrays (tests/fixtures/make_slim.py)."""
  spec = importlib.util.spec_from_file_location('make_slim', os.path.join(FIXTURES, 'make_slim.py'))
  make_slim = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make_slim)
  return make_slim.SLIMS[SLIM][2]


@pytest.fixture(scope='module')
def fixture():
  """(arrays, sidecar, eval-mode model with the fixture weights, config)."""
  arrays = dict(np.load(os.path.join(FIXTURES, SLIM)))
  with open(os.path.join(FIXTURES, 'mlore_pascal_tiny_seed0.json')) as f:
    sidecar = json.load(f)
  model, config, _ = parity.build_from_fixture(arrays, sidecar)
  return arrays, sidecar, model, config


@pytest.fixture(scope='module')
def reference(fixture):
  """Every array the parity tool compares, cropped like the slim file."""
  arrays, _, model, config = fixture
  got = mlore_convert.reference_arrays(model, arrays['input'], config)
  for pattern, index in _slim_crops().items():
    got.update({k: v[index] for k, v in got.items() if re.fullmatch(pattern, k)})
  return got


# -- forward parity ------------------------------------------------------------------------------

def test_forward_parity_with_official_model(fixture, reference):
  arrays = fixture[0]
  rows = parity.compare(reference, arrays)
  groups = {re.sub(r'/.*', '', k) for k, _, _ in rows}
  assert groups == {'feat', 'fuse', 'moe1', 'moe2', 'route1', 'route2', 'router_logits',
                    'stage_logits', 'dec', 'out', 'out_repara'}
  # taps 4 + fuse 4 + 5 tasks x (8 MoE outputs + 8 gate sets + 8 router logits + stage logits,
  # decoder map, output, re-parameterised output)
  assert len(rows) == 8 + 5 * (3 * 8 + 4)
  bad = [(k, rel) for k, _, rel in rows if rel > 1e-5]
  assert not bad, bad
  # Gates: 9 of 15 kept per sample; PASCAL (pre_softmax False) does not renormalise.
  for key in (k for k in reference if re.match(r'route[12]/', k)):
    gates = reference[key]
    assert ((gates > 0).sum(-1) == 9).all(), key
    assert (gates.sum(-1) < 1 - 1e-3).all(), key


def test_reparameterised_outputs_equal_normal_path(reference):
  for task in ('semseg', 'human_parts', 'sal', 'normals', 'edge'):
    normal, repara = reference[f'out/{task}'], reference[f'out_repara/{task}']
    np.testing.assert_allclose(repara, normal, atol=2e-5 * np.abs(normal).max(), rtol=0,
                               err_msg=task)


def _kernels(fn, *args) -> list[tuple]:
  """(primitive, kernel shape, feature_group_count) of every conv and matmul in fn's jaxpr."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in ('conv_general_dilated', 'dot_general'):
        found.append((eqn.primitive.name, tuple(eqn.invars[1].aval.shape),
                      eqn.params.get('feature_group_count', 1)))
      for param in eqn.params.values():
        inner = getattr(param, 'jaxpr', param)
        if hasattr(inner, 'eqns'):
          walk(inner)
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_reparameterised_block_is_one_dense_conv_per_sample_and_task(fixture):
  """§3.4: with running statistics, V is one 3x3 C -> C conv per (sample, task). Per-task
  kernels are batched matmuls over 3x3 patches (9C = 288 rows), never grouped convs."""
  block = nnx.clone(fixture[2].decoder.mlore_1[0])  # eval mode, 5 tasks, C = 32, R = 135
  x = jnp.zeros((2, 6, 6, 32))
  kernels = lambda: _kernels(lambda x: block(x), x)
  assert all(group == 1 for _, _, group in kernels())
  three_by_three = lambda: [(p, s) for p, s, _ in kernels() if p == 'conv_general_dilated'
                            or s[-2] == 9 * 32]
  # experts (C -> sum r), the 5 task LoRAs (C -> spe_rank 8 each), share_conv; on CPU the shared
  # 3x3 convs are im2col matmuls too (layers.conv_general), elsewhere convs.
  shared = (lambda c: ('dot_general', (9 * 32, c))) if jax.default_backend() == 'cpu' else (
      lambda c: ('conv_general_dilated', (3, 3, 32, c)))
  assert three_by_three() == [shared(135), ('dot_general', (5, 9 * 32, 8)), shared(32)]
  block.repara = True
  assert three_by_three() == [('dot_general', (5, 2, 9 * 32, 32))]


# -- losses and gradients ------------------------------------------------------------------------

@pytest.mark.slow
def test_losses_and_gradients_match_official(fixture):
  """The trainer's loss (eval mode, incl. L_cv) and d total / d params against grad/* (§10)."""
  arrays, _, model, config = fixture
  tasks = tasks_lib.get_tasks(config.tasks, config.dataset.name, config.convention)
  batch = {t: arrays[f'target/{t}'].transpose(0, 2, 3, 1) for t in tasks}
  batch = {t: v if tasks[t].kind in ('normals', 'depth') else v.astype(np.uint8)
           for t, v in batch.items()}
  graph, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def loss_and_grad(params, rest, images, batch):
    def loss_fn(params):
      preds, aux = nnx.merge(graph, params, rest)(images)
      return losses.compute_losses(
          tasks, preds, batch, convention=config.convention, weights=dict(config.loss_weights),
          edge_w=config.edge_w, aux=aux, load_balancing_weight=config.load_balancing_weight)
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (total, per_task), grads = loss_and_grad(nnx.to_pure_dict(params), nnx.to_pure_dict(rest),
                                           arrays['input'].transpose(0, 2, 3, 1), batch)
  assert config.load_balancing_weight == 1e-4 and config.edge_w == 0.95
  for name in tasks:
    np.testing.assert_allclose(per_task[name], arrays[f'loss/{name}'], rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(per_task['load_balancing'], arrays['loss/cv'], rtol=1e-5)
  np.testing.assert_allclose(total, arrays['loss/total'], rtol=1e-5)

  got = mlore_convert.to_torch({'params': grads}, config)
  checked = []
  for key in (k[len('grad/'):] for k in arrays if k.startswith('grad/')):
    want = arrays['grad/' + key]
    if key.endswith('convsp.bias'):  # true gradient 0 (LayerNorm after it), stored: float noise
      assert abs(float(got[key][0])) < 1e-3 * max(np.abs(arrays['grad/' + key.replace(
          'bias', 'weight')]).max(), 1e-6), key
      continue
    err = np.abs(got[key] - want).max() / np.abs(want).max()
    assert err <= 1e-3, (key, err)
    checked.append(key)
  # The subset covers the ViT, a whole MoE block (experts, share_conv, task parts, both BNs,
  # router incl. the position-Linear), every share_conv, the stage fusions and the heads.
  assert len(checked) > 300
  for part in (r'blocks\.0\.attn\.qkv', r'MLoRE_1\.0\.lora_list_1\.14\.M', r'MLoRE_1\.0\.conv1',
               r'MLoRE_1\.0\.router_1\.sal\.0\.convsp\.weight', r'MLoRE_1\.0\.bn_all',
               r'MLoRE_2\.3\.share_conv\.weight', r'MLoRE_1\.2\.share_conv\.bias',
               r'task_mask\.edge\.3', r'heads\.normals\.linear_pred'):
    assert any(re.search(part, k) for k in checked), part


def test_params_round_trip_through_official_layout(fixture):
  arrays, sidecar, _, config = fixture
  state_dict = {k[len('param/'):]: v for k, v in arrays.items() if k.startswith('param/')}
  weights = mlore_convert.from_torch({'module.' + k: v for k, v in state_dict.items()}, config)
  back = mlore_convert.to_torch(weights, config)
  assert set(back) == {k for k in state_dict if not k.endswith('num_batches_tracked')}
  for key, value in back.items():
    np.testing.assert_array_equal(value, state_dict[key], err_msg=key)
  assert back.keys() == mlore_convert.torch_state_dict_shapes(config).keys()
  n_params = sum(v.size for v in jax.tree.leaves(weights['params']))
  assert n_params == sidecar['n_params'] == 1_013_518


# -- pieces --------------------------------------------------------------------------------------

def test_fused_experts_equal_per_expert_loop():
  ranks = (2, 3, 4, 5)
  experts = mlore.LowRankExperts(6, ranks, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  experts.down_bias[...] = jnp.asarray(rng.standard_normal(sum(ranks)), jnp.float32)
  experts.up_bias[...] = jnp.asarray(rng.standard_normal((len(ranks), 6)), jnp.float32)
  x = jnp.asarray(rng.standard_normal((3, 5, 4, 6)), jnp.float32)
  gates = jnp.asarray([[0.5, 0.0, 0.25, 0.1], [0.0, 1.0, 0.0, 0.0], [0.2, 0.3, 0.4, 0.05]])
  fused = experts(x, gates)
  # naive: every expert as its own 3x3 conv then 1x1 conv, weighted by its gate (§3.2 step 5)
  want, start = np.zeros(fused.shape), 0
  down, up = np.asarray(experts.down_kernel[...]), np.asarray(experts.up_kernel[...])
  for i, r in enumerate(ranks):
    sl = slice(start, start + r)
    start += r
    y = jax.lax.conv_general_dilated(x, down[..., sl], (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    y = (y + experts.down_bias[sl]) @ up[sl] + experts.up_bias[i]
    want += np.asarray(gates)[:, i, None, None, None] * np.asarray(y)
  np.testing.assert_allclose(fused, want, atol=1e-5, rtol=1e-5)
  # Both fused forms (factorised; dense kernel per sample) and their gradients are the loop's.
  assert experts._dense_is_cheaper(5 * 4)  # pylint: disable=protected-access
  assert not mlore.LowRankExperts(192, (32,), rngs=nnx.Rngs(0))._dense_is_cheaper(1024)
  loss = lambda e, x, g: jnp.sum(jnp.sin(e(x, g)))
  grads = {}
  for mode in (True, False, 'loop'):
    experts.fused, experts.dense_mixture = mode != 'loop', mode if mode != 'loop' else None
    np.testing.assert_allclose(experts(x, gates), want, atol=1e-5, rtol=1e-5)
    grads[mode] = jax.tree.leaves(nnx.grad(loss, argnums=(0, 1, 2))(experts, x, gates))
  for mode in (True, False):
    for got, ref in zip(grads[mode], grads['loop']):
      np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
  kernel, bias = experts.dense(gates)  # §3.4: the mixture as one dense 3x3 conv per sample
  dense = jnp.stack([jax.lax.conv_general_dilated(
      x[b:b + 1], kernel[b], (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))[0]
                     for b in range(3)]) + bias[:, None, None]
  np.testing.assert_allclose(dense, want, atol=1e-5, rtol=1e-5)


def test_top_k_gates_both_modes_hand_computed():
  # exp(logits) = 1, 4, 0.5, 2, 8 (sum 15.5); top 3 drops experts 2 (0.5) and 0 (1).
  logits = jnp.log(jnp.asarray([[1.0, 4.0, 0.5, 2.0, 8.0]]))
  after = mlore.top_k_gates(logits, 3, pre_softmax=False)  # PASCAL: no renormalisation
  np.testing.assert_allclose(after, [[0, 4 / 15.5, 0, 2 / 15.5, 8 / 15.5]], rtol=1e-6)
  before = mlore.top_k_gates(logits, 3, pre_softmax=True)  # NYUD: softmax over the kept 3
  np.testing.assert_allclose(before, [[0, 4 / 14, 0, 2 / 14, 8 / 14]], rtol=1e-6)
  # Gradient of the kept mass S = 14 / 15.5: dropped logits still get -S p_j through the
  # normaliser when pre_softmax is False; with pre_softmax True the gates sum to 1.
  p, s = np.array([1, 4, 0.5, 2, 8]) / 15.5, 14 / 15.5
  grad = jax.grad(lambda l: mlore.top_k_gates(l, 3, False).sum())(logits)
  np.testing.assert_allclose(grad[0], np.where([0, 1, 0, 1, 1], p * (1 - s), -s * p), atol=1e-6)
  grad = jax.grad(lambda l: mlore.top_k_gates(l, 3, True).sum())(logits)
  np.testing.assert_allclose(grad, 0.0, atol=1e-6)
  np.testing.assert_allclose(mlore.top_k_gates(logits, 5, False), jax.nn.softmax(logits))


def test_router_noise_only_in_training(fixture):
  """Training: logits + N(0, 1) * noise_scale from the 'router' stream (§3.2 step 4)."""
  block = nnx.clone(fixture[2].decoder.mlore_2[1])  # input: one map per task (T, B, h, w, C)
  run = nnx.jit(lambda block, x: block(x))
  x = jnp.asarray(np.random.default_rng(2).standard_normal((5, 2, 6, 6, 32)), jnp.float32)
  _, gates, z = run(block, x)
  np.testing.assert_array_equal(run(block, x)[1], gates)  # eval: deterministic
  np.testing.assert_allclose(gates, mlore.top_k_gates(z[..., :15], 9, False), rtol=1e-6)
  running = np.asarray(block.branches.bn.mean[...])  # (T, C), unchanged by eval calls
  np.testing.assert_array_equal(running, fixture[2].decoder.mlore_2[1].branches.bn.mean[...])
  block.train()
  nnx.reseed(block, router=jax.random.key(7))  # as the trainer does every step
  # the noise of the next call: the stream's first key
  eps = jax.random.normal(nnx.RngStream(block.noise_rng.key[...], tag='router')(), (5, 2, 15))
  _, noisy, z_train = run(block, x)
  np.testing.assert_allclose(z_train, z, rtol=1e-5, atol=1e-6)  # the router sees no BN
  np.testing.assert_allclose(noisy, mlore.top_k_gates(z[..., :15] + eps * z[..., 15:30], 9,
                                                      False), rtol=1e-5, atol=1e-6)
  assert not np.allclose(noisy, gates)
  assert not np.allclose(run(block, x)[1], noisy)  # the stream advances
  updated = np.asarray(block.branches.bn.mean[...])  # every task's BN saw a batch
  assert (np.abs(updated - running).max(axis=1) > 1e-4).all()


# -- fixtures of any official config (NYUD task set, h != w, pre_softmax True) ---------------------

def _nyud_sidecar(**overrides):
  """A sidecar like the official NYUD tiny fixture's (docs/mlore.md §10)."""
  rc = dict(patch_size=16, embed_dim=48, depth=8, num_heads=3, select_list=[2, 4, 6],
            final_embed_dim=32, rank_list=list(range(2, 17)), spe_rank=8, topk=9,
            drop_path_rate=0.15, batch=2, img_size=[96, 128], pre_softmax=True, edge_w=0.88,
            loss_weights=dict(semseg=1.0, depth=1.0, normals=10.0, edge=50.0,
                              load_balancing=5e-4), grid=[6, 8])
  rc.update(overrides)
  return {'dataset': 'nyud', 'db_name': 'NYUD', 'module': 'MLoRE',
          'tasks': ['semseg', 'depth', 'normals', 'edge'],
          'num_output': {'semseg': 40, 'depth': 1, 'normals': 3, 'edge': 1},
          'reduced_config': {k: v for k, v in rc.items() if v is not None}}


def test_config_from_reference_nyud_h_ne_w():
  config = mlore_convert.config_from_reference(common.get_config(), _nyud_sidecar())
  assert config.dataset.name == 'nyud_v2' and config.tasks == 'semseg,depth,normals,edge'
  assert tuple(config.input.crop_size) == (96, 128) and config.model.mlore.pre_softmax
  assert config.load_balancing_weight == 5e-4 and config.edge_w == 0.88
  assert config.loss_weights.depth == 1.0 and config.loss_weights.edge == 50.0
  # spec §10: the NYUD tiny reference model has 951,509 parameters; grid 6 x 8 -> 48 positions
  shapes = mlore_convert.torch_state_dict_shapes(config)
  assert shapes['backbone.pos_embed'] == (1, 49, 48)
  assert shapes['backbone.MLoRE_2.3.router_1.edge.0.convsp.weight'] == (1, 48)
  assert sum(math.prod(s) for k, s in shapes.items() if 'running_' not in k) == 951_509
  # A missing pre_softmax (the shipped ViT-S yml) means the dataset's value; PASCAL's is False.
  config = mlore_convert.config_from_reference(common.get_config(), _nyud_sidecar(pre_softmax=None))
  assert config.model.mlore.pre_softmax
  with pytest.raises(ConfigError, match='not one of pascal, nyud'):
    mlore_convert.config_from_reference(
        common.get_config(), {**_nyud_sidecar(), 'dataset': 'cityscapes', 'db_name': 'Cityscapes'})
  bad = _nyud_sidecar()
  bad['num_output']['semseg'] = 41
  with pytest.raises(ConfigError, match="task 'semseg' has 41 outputs"):
    mlore_convert.config_from_reference(common.get_config(), bad)
  with pytest.raises(ConfigError, match=r'grid \[6, 6\] does not match'):
    mlore_convert.config_from_reference(common.get_config(), _nyud_sidecar(grid=[6, 6]))


@pytest.mark.slow
def test_parity_cli_reads_nyud_fixture(tmp_path, capsys):
  """A fixture in the official NYUD format (h != w, pre_softmax True, BN counters among the
  params) goes through the CLI: every array in torch layout, and only a corrupted one fails.
  (Real NYUD fixtures of the official code: run the CLI on them, docs/mlore.md §10.)"""
  sidecar = _nyud_sidecar(depth=4, select_list=[1, 2, 3], rank_list=[2, 3, 4, 5, 6], topk=3,
                          embed_dim=24)
  config = mlore_convert.config_from_reference(common.get_config(), sidecar)
  rng = np.random.default_rng(3)
  arrays = {f'param/{k}': (rng.standard_normal(s) / math.sqrt(math.prod(s[1:]) or 1)).astype(
      np.float32) for k, s in mlore_convert.torch_state_dict_shapes(config).items()}
  arrays.update({k: np.abs(v) + 0.5 for k, v in arrays.items() if k.endswith('running_var')})
  arrays['param/backbone.MLoRE_1.0.bn.depth.num_batches_tracked'] = np.array(3, np.int64)
  arrays['input'] = rng.standard_normal((2, 3, 96, 128)).astype(np.float32)
  model, config, _ = parity.build_from_fixture(arrays, sidecar)
  golden = mlore_convert.reference_arrays(model, arrays['input'], config)
  assert golden['out/semseg'].shape == (2, 40, 96, 128)
  assert golden['feat/3'].shape == (2, 48, 24) and golden['fuse/0'].shape == (2, 32, 6, 8)
  assert golden['stage_logits/depth'].shape == (2, 4, 6, 8)
  assert golden['dec/edge'].shape == (2, 32, 24, 32)
  assert ((golden['route2/1/normals'] > 0).sum(-1) == 3).all()
  np.testing.assert_allclose(golden['route1/0/depth'].sum(-1), 1.0, rtol=1e-5)  # renormalised
  golden['out/depth'] = golden['out/depth'] * 1.001
  np.savez(tmp_path / 'nyud.npz', **arrays, **golden)
  with open(tmp_path / 'nyud.json', 'w') as f:
    json.dump(sidecar, f)
  assert parity.main([str(tmp_path / 'nyud.npz')]) == 1
  lines = capsys.readouterr().out.splitlines()
  assert [l.split()[0] for l in lines if l.endswith('FAIL')] == ['out/depth']
  assert lines[-1].startswith(f'{len(golden) - 1}/{len(golden)} arrays within 1e-05')
