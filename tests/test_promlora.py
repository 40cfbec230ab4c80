"""ProMLoRA, the user fork's method (issue 10; docs/user_fork.md §2, mtl_jax/models/promlora.py):
parity with the fork's PyTorch model, the simplified attention against the literal formulation,
the fork's trainable set and parameter counts, variants and their errors, conversion both ways,
and real training steps.

The parity tests read the slim extract of fixtures/promlora_tiny_seed0 (tests/fixtures/
make_slim.py); `python -m mtl_jax.tools.parity` runs the comparison on the full fixture.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import mtlora_pascal
from configs import promlora_nyud
from configs import promlora_pascal
from conftest import FIXTURES, ROOT, launch_env, sigkill_after_checkpoint
from mtl_jax import ConfigError
from mtl_jax import models
from mtl_jax import optim
from mtl_jax import reporting
from mtl_jax import tasks as tasks_lib
from mtl_jax import train
from mtl_jax.convert import keys
from mtl_jax.convert import mtlora as mtlora_convert
from mtl_jax.convert import promlora as promlora_convert
from mtl_jax.models import promlora
from mtl_jax.models import swin
from mtl_jax.tools import params
from mtl_jax.tools import parity
from test_mtlora import assert_frozen_are_the_base_linears
from test_swin import parity_rows
from test_swin import train_three_steps

NAME = 'promlora_tiny_seed0'
TASKS = ('semseg', 'normals', 'sal', 'human_parts')


def _sidecar():
  with open(os.path.join(FIXTURES, f'{NAME}.json')) as f:
    return json.load(f)


def _fixture_model():
  arrays = dict(np.load(os.path.join(FIXTURES, f'{NAME}_slim.npz')))
  arrays['input'] = np.load(os.path.join(FIXTURES, 'mtlora_tiny_seed0_slim.npz'))['input']
  model, config, _ = parity.build_from_fixture(arrays, _sidecar())
  return model, config, arrays


# -- parity with the fork --------------------------------------------------------------------------

def test_parity_with_the_forks_model():
  """4 task outputs and every task's 4 stage maps (its own backbone pass) <= 1e-5."""
  rows, config = parity_rows(NAME)
  assert config.model.name == 'promlora' and config.model.promlora.tokens == 3
  assert sorted(k for k, _, _ in rows) == sorted(
      [f'out/{t}' for t in TASKS] + [f'feat/{t}/stage{i}' for t in TASKS for i in range(4)])


def _literal_block(block: swin.SwinBlock, z, tokens: int):
  """The fork's PromptedSwinTransformerBlock, literally: every window's sequence is [prompts ;
  window], bias and mask zero-padded on prompt rows and columns, prompt outputs averaged over
  windows, then residuals and the MLP on all T + h*w tokens."""
  (h, w), ws, s = block.resolution, block.window_size, block.shift
  b, _, c = z.shape
  attn = block.attn
  heads = attn.num_heads
  u = block.norm1(z)
  up, ux = u[:, :tokens], u[:, tokens:].reshape(b, h, w, c)
  if s:
    ux = jnp.roll(ux, (-s, -s), axis=(1, 2))
  win = swin.window_partition(ux, ws)  # (B, nW, N, C)
  nw, n = win.shape[1:3]
  seq = jnp.concatenate([jnp.broadcast_to(up[:, None], (b, nw, tokens, c)), win], axis=2)
  qkv, _ = swin.apply_linear(attn.qkv, seq)
  qkv = qkv.reshape(b, nw, tokens + n, 3, heads, c // heads)
  q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
  logits = jnp.einsum('bwqhd,bwkhd->bwhqk', q * (c // heads) ** -0.5, k)
  rpb = attn.relative_position_bias_table[...][swin.relative_position_index(ws).reshape(-1)]
  bias = jnp.zeros((heads, tokens + n, tokens + n)).at[:, tokens:, tokens:].set(
      rpb.reshape(n, n, heads).transpose(2, 0, 1))
  logits = logits + bias
  if s:
    mask = jnp.zeros((nw, tokens + n, tokens + n)).at[:, tokens:, tokens:].set(
        swin.shift_mask(h, w, ws, s))
    logits = logits + mask[:, None]
  out = jnp.einsum('bwhqk,bwkhd->bwqhd', jax.nn.softmax(logits, -1), v).reshape(
      b, nw, tokens + n, c)
  out, _ = swin.apply_linear(attn.proj, out)
  out_p = out[:, :, :tokens].mean(axis=1)
  out_x = swin.window_reverse(out[:, :, tokens:], ws, h, w)
  if s:
    out_x = jnp.roll(out_x, (s, s), axis=(1, 2))
  z = z + jnp.concatenate([out_p, out_x.reshape(b, h * w, c)], axis=1)
  return z + block.mlp(block.norm2(z))[0]


def _literal_merge(merge: swin.PatchMerging, z, tokens: int, h: int, w: int):
  """The fork's PromptedPatchMerging: prompts tiled 4x on channels, image tokens merged 2x2,
  then LayerNorm and the reduction on all of them."""
  b, _, c = z.shape
  x = z[:, tokens:].reshape(b, h, w, c)
  x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      axis=-1).reshape(b, -1, 4 * c)
  z = jnp.concatenate([jnp.tile(z[:, :tokens], (1, 1, 4)), x], axis=1)
  return swin.apply_linear(merge.reduction, merge.norm(z))[0]


def _literal_features(backbone: promlora.PromptedSwin, images, task_index: int):
  """One backbone pass of one task as the fork computes it (docs/user_fork.md §2, steps 1-4)."""
  t = backbone.num_tokens
  x = backbone.patch_embed(images)
  b, h, w, c = x.shape
  shallow = backbone.prompt_embeddings[backbone.keys[task_index]][...]
  z = jnp.concatenate([jnp.broadcast_to(shallow, (b, t, c)), x.reshape(b, h * w, c)], axis=1)
  maps = []
  for s, stage in enumerate(backbone.layers):
    deep = backbone.deep_prompts(s)[task_index]
    for j, block in enumerate(stage.blocks):
      if (s, j) != (0, 0):
        z = jnp.concatenate([jnp.broadcast_to(deep[j - (s == 0)], (b, t, z.shape[-1])),
                             z[:, t:]], axis=1)
      z = _literal_block(block, z, t)
    if stage.downsample is not None:
      z = _literal_merge(stage.downsample, z, t, *stage.blocks[0].resolution)
    maps.append(z[:, t:])
  return maps


@pytest.mark.slow
@pytest.mark.parametrize('name', ['promlora_dynamic_seed3', 'promlora_nyud_seed5'])
def test_parity_of_variants_with_the_forks_model(name):
  """Fixtures from the fork's code (tests/fixtures/fork_variants.py): dynamic per-stage pools
  (5, 6, 7, 8) with gates; NYUD's four heads (edge included) on a 224x336 input."""
  rows, config = parity_rows(name)
  assert sorted(k for k, _, _ in rows) == sorted(f'out/{t}' for t in config.tasks.split(','))
  if name == 'promlora_dynamic_seed3':
    assert tuple(config.model.promlora.pool_sizes) == (5, 6, 7, 8)
  else:
    assert tuple(config.input.crop_size) == (224, 336)


@pytest.mark.slow
def test_gradients_equal_the_forks():
  """d/dθ of L = sum_t sum(out_t[::8, ::8] * W_t) in eval mode, for every trainable parameter of
  the fork's recipe, against torch's (tests/fixtures/fork_variants.py: the shipped fixture's
  weights and input): <= 1e-3 of each gradient's max magnitude."""
  model, config, arrays = _fixture_model()
  want = dict(np.load(os.path.join(FIXTURES, 'promlora_grad_seed0_slim.npz')))
  images = jnp.asarray(arrays['input'].transpose(0, 2, 3, 1))
  weights = {k[len('lossweight/'):]: jnp.asarray(v.transpose(0, 2, 3, 1))
             for k, v in want.items() if k.startswith('lossweight/')}
  graph, params_, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def grads(params_):
    def loss(p):
      out = nnx.merge(graph, p, rest)(images)[0]
      return sum(jnp.sum(out[t][:, ::8, ::8] * w) for t, w in weights.items())
    return jax.grad(loss)(params_)

  got = promlora_convert.to_torch({'params': nnx.to_pure_dict(grads(params_))}, config)
  trainable = _sidecar()['trainable_params_after_recipe']
  assert sorted(k[len('grad/'):] for k in want if k.startswith('grad/')) == sorted(trainable)
  worst = 0.0
  for key in trainable:
    g, w = got[key], want[f'grad/{key}']
    scale = np.abs(w).max()
    if scale == 0:  # backbone.norm: unused in the forward
      assert np.abs(g).max() == 0, key
      continue
    worst = max(worst, float(np.abs(g - w).max() / scale))
  print(f'max gradient error / max |gradient|: {worst:.2e} over {len(trainable)} parameters')
  assert worst <= 1e-3, worst


@pytest.mark.slow
def test_simplified_attention_equals_the_literal_formulation():
  """Prompt keys / values once per block and task over a (tasks x batch) stack == the fork's
  per-task passes with prompts copied into every window (on the fixture's weights), and both
  equal the fork's features."""
  model, _, arrays = _fixture_model()
  images = jnp.asarray(arrays['input'].transpose(0, 2, 3, 1))
  features = nnx.jit(lambda m, x: m.backbone(x))(model, images)
  literal = nnx.jit(lambda m, x, i: _literal_features(m.backbone, x, i), static_argnums=2)
  for i, task in enumerate(TASKS):
    for stage, (got, want) in enumerate(zip(features.for_task(task), literal(model, images, i))):
      got = np.asarray(got).reshape(want.shape)
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
      golden = arrays[f'feat/{task}/stage{stage}']  # every 5th token (make_slim.py)
      np.testing.assert_allclose(np.asarray(want)[:, ::5], golden, rtol=0,
                                 atol=1e-5 * np.abs(golden).max())


# -- trainable set and counts (docs/user_fork.md §2 "Trainable set") ------------------------------

def _trainable_keys(config) -> tuple[set[str], int, int]:
  tasks = tasks_lib.config_tasks(config)
  model = nnx.eval_shape(lambda: models.build_model(config, tasks, rngs=nnx.Rngs(0)))
  frozen = optim.frozen_filter(tuple(config.frozen))
  trainable, total, count = set(), 0, 0
  for path, v in nnx.iter_graph(model):
    if isinstance(v, nnx.Param):
      total += v.size
      if not frozen(path, v):
        trainable.add(mtlora_convert.torch_key(path))
        count += v.size
  return trainable, count, total


def test_trainable_names_equal_the_forks():
  """The fixture's trainable list (the fork's main.py recipe): 185,708 of 712,268."""
  sidecar = _sidecar()
  config = promlora_convert.config_from_reference(promlora_pascal.get_config('smoke'), sidecar)
  trainable, count, total = _trainable_keys(config)
  assert trainable == set(sidecar['trainable_params_after_recipe'])
  assert (count, total) == (185_708, 712_268)
  assert 'backbone.norm.weight' in trainable  # unused in the forward, trained by the recipe
  # decay: prompts and LoRA matrices decayed, 1-D leaves not (the fork's AdamW)
  tasks = tasks_lib.config_tasks(config)
  model = nnx.eval_shape(lambda: models.build_model(config, tasks, rngs=nnx.Rngs(0)))
  mask = keys.flatten(optim.decay_mask(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                                       decay_1d=False))
  assert mask['backbone/prompt_embeddings/sal'] and mask['backbone/deep_prompt_embeddings/2/sal']
  assert mask['backbone/layers/1/blocks/0/attn/qkv/lora_shared_A']
  assert not mask['backbone/layers/1/blocks/0/norm1/scale']


def test_freeze_flags():
  """TRAIN.FREEZE_* of the fork: each removes its group from the trainable set."""
  base, _, _ = _trainable_keys(promlora_pascal.get_config('smoke'))
  for flag, pattern in (('freeze_patch_embed', r'patch_embed\.proj'),
                        ('freeze_layer_norm', r'norm\d?\.'),
                        ('freeze_downsample_reduction', r'downsample\.reduction'),
                        ('freeze_relative_position_bias', 'relative_position_bias_table')):
    got, _, _ = _trainable_keys(promlora_pascal.get_config(f'smoke,{flag}'))
    removed = base - got
    assert removed and all(re.search(pattern, k) for k in removed), (flag, sorted(removed)[:4])
  got, _, _ = _trainable_keys(promlora_pascal.get_config('smoke,freeze_layer_norm'))
  assert 'backbone.patch_embed.norm.weight' in got  # still trained as part of patch_embed


@pytest.mark.parametrize('module, arg, total, trainable', [
    (promlora_pascal, 'rank=32,tokens=50', 32_610_170, 6_691_898),
    pytest.param(promlora_pascal, 'rank=64,tokens=50,shared_prompt', 34_208_762, 8_290_490,
                 marks=pytest.mark.slow),
    pytest.param(promlora_pascal, 'rank=64,tokens=50,dynamic,pools=20+20+20+20', 34_137_562,
                 8_219_290, marks=pytest.mark.slow),
    pytest.param(promlora_pascal, 'variant=B,rank=64,tokens=60', 104_142_520, 20_279_224,
                 marks=pytest.mark.slow),
    pytest.param(promlora_nyud, 'rank=64,tokens=60,tasks=semseg+normals+depth', 34_317_806,
                 8_399_534, marks=pytest.mark.slow),
])
def test_parameter_counts_equal_the_forks_models(module, arg, total, trainable):
  """(total, trainable) of the fork's model built from each yaml (counted from the fork's code),
  what `python -m mtl_jax.tools.params` prints as its last line."""
  counts = params.count(module.get_config(arg))['<all>']
  assert (counts['total'], counts['trainable']) == (total, trainable)


# -- variants and errors ---------------------------------------------------------------------------

def _smoke_model(arg='', **updates):
  config = promlora_pascal.get_config('smoke' + (f',{arg}' if arg else ''))
  config.input.crop_size = (32, 32)
  for key, value in updates.items():
    config.model.promlora[key] = value
  tasks = tasks_lib.config_tasks(config)
  return models.build_model(config, tasks, rngs=nnx.Rngs(1)), config


@pytest.mark.parametrize('key, value, match', [
    ('location', 'add', 'location=.add. is not implemented'),
    ('deep', False, 'deep=False is not implemented'),
    ('project', 8, 'project=8 is not implemented'),
    ('tokens', 0, 'at least one prompt token'),
])
def test_unimplemented_options_are_config_errors(key, value, match):
  with pytest.raises(ConfigError, match=match):
    _smoke_model(**{key: value})


def test_invalid_combinations_are_config_errors():
  with pytest.raises(ConfigError, match='needs per-task prompts'):
    _smoke_model('shared_prompt,dynamic')
  with pytest.raises(ConfigError, match='pool_sizes=.* needs 1 or 2'):
    _smoke_model('dynamic,pools=4+4+4')
  config = promlora_pascal.get_config('smoke')
  config.model.mtlora.shared_mode = 'matrix'
  with pytest.raises(ConfigError, match="shared_mode='matrix'.*mtlora_vpt"):
    models.build_model(config, tasks_lib.config_tasks(config), rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_shared_prompt_is_one_pass_equal_to_equal_task_prompts():
  """SHARE_TASK_PROMPT: one pass over the batch (not one per task), equal to per-task prompts
  that all hold the shared values."""
  shared, config = _smoke_model('shared_prompt')
  per_task, _ = _smoke_model()
  assert list(shared.backbone.prompt_embeddings) == ['shared']
  graph, state = nnx.split(per_task)
  flat = dict(nnx.to_flat_state(state))
  source = dict(nnx.to_flat_state(nnx.state(shared)))
  for path in list(flat):
    if path[:2] == ('backbone', 'prompt_embeddings') or path[:2] == (
        'backbone', 'deep_prompt_embeddings'):
      flat[path].value = source[(*path[:-1], 'shared')].value
    elif path in source and 'prompt' not in str(path):
      flat[path].value = source[path].value
  per_task = nnx.merge(graph, nnx.from_flat_state(flat))
  images = jax.random.uniform(jax.random.key(0), (2, *config.input.crop_size, 3))
  forward = nnx.jit(lambda m, x: (m.backbone(x), m(x)[0]))
  for m in (shared, per_task):
    m.eval()
  (features, got), (_, want) = forward(shared, images), forward(per_task, images)
  assert features.maps[0].shape[0] == 2 and not any(features.task_maps)
  for task in want:
    np.testing.assert_allclose(got[task], want[task], rtol=0, atol=1e-5)


def test_dynamic_prompts_mix_per_stage_pools_by_gates():
  """The fork's later DYNAMIC_PROMPT: pools (n_s, K_s, C_s), gates (n_s, tasks, T, K_s) one-hot
  at (token + task) mod K_s; a gate that is sharp enough picks that pool row."""
  model, _ = _smoke_model('dynamic,pools=2+5')
  bb = model.backbone
  assert [p.shape for p in bb.deep_prompt_pools] == [(1, 2, 8), (2, 5, 16)]
  assert [g.shape for g in bb.deep_prompt_gates] == [(1, 4, 3, 2), (2, 4, 3, 5)]
  gates = np.asarray(bb.deep_prompt_gates[1][...])
  assert gates.sum() == 2 * 4 * 3 and gates[1, 2, 1, (1 + 2) % 5] == 1
  bb.deep_prompt_gates[1].value = bb.deep_prompt_gates[1][...] * 100.0
  prompts = np.asarray(bb.deep_prompts(1))  # (tasks, n_s, T, C)
  pool = np.asarray(bb.deep_prompt_pools[1][...])
  for task in range(4):
    for token in range(3):
      np.testing.assert_allclose(prompts[task, :, token], pool[:, (token + task) % 5], atol=1e-6)
  default, _ = _smoke_model('dynamic')  # pool size 0 = tokens
  assert [p.shape[1] for p in default.backbone.deep_prompt_pools] == [3, 3]


def test_prompt_only_vpt_deep_has_no_lora():
  """vpt_deep_*: rank 0, prompts only; the LoRA-free Linears keep their `linear` names."""
  model, config = _smoke_model('rank=0')
  names = {'/'.join(map(str, p)) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
  assert not any('lora_' in n for n in names)
  assert 'backbone/layers/0/blocks/0/attn/qkv/linear/kernel' in names
  trainable, _, _ = _trainable_keys(config)
  assert 'backbone.prompt_embeddings.semseg' in trainable
  assert not any(re.search(r'\.(qkv|proj|fc1|fc2)\.linear\.', k) for k in trainable)


# -- conversion (mtl_jax/convert/promlora.py) -----------------------------------------------------

def _fixture_state_dict():
  arrays = np.load(os.path.join(FIXTURES, f'{NAME}_slim.npz'))
  return {k[len('param/'):]: arrays[k] for k in arrays.files if k.startswith('param/')}


def test_fork_checkpoint_round_trip_and_errors():
  """from_torch then to_torch gives the fork's state dict back exactly (less its attn_mask
  buffers, recomputed, and the BatchNorm counters); a broken one is one ConfigError naming
  every problem."""
  sd = _fixture_state_dict()
  config = promlora_convert.config_from_reference(promlora_pascal.get_config('smoke'), _sidecar())
  want = {k: v for k, v in sd.items() if not re.search(r'(attn_mask|num_batches_tracked)$', k)}
  got = promlora_convert.to_torch(promlora_convert.from_torch(sd, config), config)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert got[key].dtype == value.dtype, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)

  broken = dict(sd)
  del broken['backbone.deep_prompt_embeddings.1.sal']
  broken['backbone.prompt_embeddings.semseg'] = np.zeros((1, 4, 16), np.float32)
  broken['backbone.prompt_embeddings.depth'] = np.zeros((1, 3, 16), np.float32)
  with pytest.raises(ConfigError) as e:
    promlora_convert.from_torch(broken, config)
  message = str(e.value)
  assert '\n' not in message
  assert '1 missing (backbone.deep_prompt_embeddings.1.sal)' in message
  assert '1 unexpected (backbone.prompt_embeddings.depth)' in message
  assert 'backbone.prompt_embeddings.semseg (1, 4, 16) vs (1, 3, 16)' in message
  with pytest.raises(ConfigError, match='--format=promlora needs a ProMLoRA config'):
    promlora_convert.from_torch(sd, mtlora_pascal.get_config('smoke'))


@pytest.mark.slow
def test_fork_checkpoint_through_convert_and_the_trainer(tfds_dir, tmp_path):
  """A fork-format `ckpt_epoch_N.pth` -> `python -m mtl_jax.tools.convert --format=promlora` ->
  `config.init_from` of the trainer -> its eval forward reproduces the fork's outputs.

  The trainer runs on synthetic_scenes, whose semseg / human_parts have other class counts, so
  the model is the fixture's with its normals and sal tasks; the other tasks' prompts, downsamplers
  and heads are left out of the checkpoint (a task's output depends only on its own).
  """
  from test_convert import save_pth  # pylint: disable=g-import-not-at-top
  from mtl_jax.tools import convert as convert_cli  # pylint: disable=g-import-not-at-top
  config = promlora_convert.config_from_reference(promlora_pascal.get_config('smoke'), _sidecar())
  tasks = ('normals', 'sal')
  config.tasks = ','.join(tasks)
  config.dataset.update(name='synthetic_scenes/tiny', data_dir=tfds_dir, build_if_missing=False)
  config.batch_size = config.eval_batch_size = 2
  sd = {k: v for k, v in _fixture_state_dict().items()
        if not re.search(r'\.(semseg|human_parts)(\.|$)', k)}
  save_pth(tmp_path / 'ckpt_epoch_7.pth', {
      'model': sd, 'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-4}]}, 'epoch': 7})
  metadata = convert_cli.run('promlora', str(tmp_path / 'ckpt_epoch_7.pth'), str(tmp_path / 'w'),
                             config)
  assert metadata['key'] == 'model' and metadata['source_arrays'] == len(sd)

  config.init_from = str(tmp_path / 'w')
  trainer = train.Trainer(config, tmp_path / 'run', devices=jax.devices()[:1])
  blank = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype)),
                       trainer.abstract_state)
  state = trainer.load_weights(blank, config.init_from)
  arrays = np.load(os.path.join(FIXTURES, f'{NAME}_slim.npz'))
  images = np.load(os.path.join(FIXTURES, 'mtlora_tiny_seed0_slim.npz'))['input']
  preds = jax.jit(lambda s, r, x: trainer.model(trainer.eval_graph, s, r)(x)[0])(
      state, trainer.rest, images.transpose(0, 2, 3, 1))
  for t in tasks:
    want = arrays[f'out/{t}']  # (2, K, 224, 224)[..., ::7, ::7] (make_slim.py)
    got = np.asarray(preds[t]).transpose(0, 3, 1, 2)[:, :, ::7, ::7]
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0, err_msg=t)


def test_swin_imagenet_into_promlora():
  """The fork's --resume-backbone: Microsoft's Swin-T ImageNet weights into a ProMLoRA Swin-T;
  the final norm is loaded (the fork's backbone has one), prompts and LoRA keep their init."""
  from test_convert import read_listing, relative_position_index  # pylint: disable=g-import-not-at-top
  from mtl_jax import convert  # pylint: disable=g-import-not-at-top
  listing = read_listing('mtlora_state_dict_swin_tiny_patch4_window7_224_imagenet_ckpt.txt')
  sd = {k: relative_position_index(7) if k.endswith('relative_position_index')
        else np.broadcast_to(np.float32(0.5), shape) for k, (shape, _, _) in listing.items()}
  config = promlora_pascal.get_config('rank=32,tokens=50')
  params_, batch_stats, info = convert.convert_state_dict(sd, 'swin_imagenet', config)
  assert list(params_) == ['backbone'] and not batch_stats
  flat = keys.flatten(params_['backbone'])
  assert 'norm/scale' in flat and not any('prompt' in k or 'lora_' in k for k in flat)
  prompts = 4 * (1 + 4)  # per task: the shallow prompt and one deep prompt tensor per stage
  lora = 12 * 4 * 2  # 12 blocks x (qkv, proj, fc1, fc2) x (A, B)
  # dropped: the head (2) and the 5 shifted-block masks at 224 (stage 3 is unshifted)
  assert info == {'dropped': 2 + 5, 'index_checked': 12, 'lora_kept_at_init': prompts + lora}


# -- training --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_three_steps_move_prompts_and_lora_only(tfds_dir, tmp_path):
  """3 real steps of configs/promlora_pascal.py:smoke: frozen leaves (the pretrained Linears)
  bit-identical, prompts and LoRA move, optimizer state for the trainable leaves only."""
  config = promlora_pascal.get_config('smoke')
  assert_frozen_are_the_base_linears(config)
  moved = train_three_steps(config, tfds_dir, tmp_path)
  assert {'backbone/prompt_embeddings/semseg', 'backbone/deep_prompt_embeddings/1/sal',
          'backbone/layers/1/blocks/1/mlp/fc2/lora_shared_A'} <= moved


def _train_losses(workdir):
  return {row['step']: row['train/loss'] for row in reporting.read_metrics(workdir)
          if 'train/loss' in row}


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(tfds_dir, tmp_path):
  """Kill -9 a ProMLoRA smoke run after a checkpoint; the rerun's losses equal an uninterrupted
  run's bit for bit (LoRA dropout and drop-path streams included)."""
  args = lambda workdir: [
      sys.executable, os.path.join(ROOT, 'launch.py'),
      f'--config={os.path.join(ROOT, "configs", "promlora_pascal.py")}:smoke',
      f'--workdir={workdir}', f'--config.dataset.data_dir={tfds_dir}',
      '--config.dataset.build_if_missing=False', '--config.total_steps=16',
      '--config.log_every_steps=1', '--config.eval_every_steps=100',
      '--config.checkpoint_every_steps=4', '--config.eval_at_start=False']
  run = dict(cwd=tmp_path, env=launch_env())
  subprocess.run(args('straight'), check=True, capture_output=True, **run)
  killed = tmp_path / 'killed'
  sigkill_after_checkpoint(args('killed'), killed / 'checkpoints' / '4', **run)
  restarted = subprocess.run(args('killed'), check=True, capture_output=True, text=True, **run)
  resumed_from = int(re.search(r'Resumed from .* at step (\d+)', restarted.stderr).group(1))
  assert 4 <= resumed_from < 16
  want, got = _train_losses(tmp_path / 'straight'), _train_losses(killed)
  assert sorted(got) == list(range(1, 17))
  for step in range(resumed_from + 1, 17):
    assert got[step] == want[step], (step, got[step], want[step])
