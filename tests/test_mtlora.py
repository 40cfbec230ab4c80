"""MTLoRA (issue 5): MTLoRALinear against hand-computed values, the LoRA placement, parity with
the official model, the parameter-count table of docs/mtlora.md §5, the recipe's schedule, and
the declarative trainable sets through the real trainer (frozen leaves never move).

The parity test reads the slim extract of fixtures/mtlora_tiny_seed0 (tests/fixtures/
make_slim.py: every parameter, outputs on a 7-pixel grid, every 5th token of the features);
`python -m mtl_jax.tools.parity` runs the same comparison on full fixtures.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import mtlora_nyud
from configs import mtlora_pascal
from configs import swin_pascal
from mtl_jax import models
from mtl_jax import optim
from mtl_jax import tasks as tasks_lib
from mtl_jax.models import layers
from mtl_jax.models import lora
from mtl_jax.models import mtlora
from mtl_jax.tools import params
from test_swin import parity_rows
from test_swin import train_three_steps


# -- MTLoRALinear (docs/mtlora.md §2) -------------------------------------------------------------

def _set(param, value):
  param.value = jnp.asarray(value, jnp.float32)


def _hand_layer(dropout=0.0):
  """in 2, out 2, TA rank 1 (scale 4), one task 'a' with TS rank 1 (scale 2)."""
  layer = lora.MTLoRALinear(2, 2, rank=1, task_ranks={'a': 1}, shared_scale=4.0,
                            task_scales={'a': 2.0}, dropout=dropout, rngs=nnx.Rngs(0))
  _set(layer.linear.kernel, [[1, 0], [0, 1]])
  _set(layer.linear.bias, [0.5, -0.5])
  _set(layer.lora_shared_A, [[1], [2]])  # (in, r): the torch (r, in) transposed
  _set(layer.lora_shared_B, [[1, -1]])
  _set(layer.lora_tasks_A['a'], [[1], [0]])
  _set(layer.lora_tasks_B['a'], [[0, 3]])
  return layer


def test_mtlora_linear_hand_computed():
  layer = _hand_layer()
  layer.eval()
  x = jnp.array([[1.0, 1.0]])
  y, y_tasks = layer(x)
  # base = [1.5, 0.5]; TA: 4 * (1 + 2) * [1, -1]; TS without task input: 2 * 1 * [0, 3], no TA.
  np.testing.assert_allclose(y, [[13.5, -11.5]])
  np.testing.assert_allclose(y_tasks['a'], [[1.5, 6.5]])
  # A task input only feeds the TS delta: base stays that of the shared x.
  _, y_tasks = layer(x, {'a': jnp.array([[2.0, 5.0]])})
  np.testing.assert_allclose(y_tasks['a'], [[1.5, 12.5]])


def test_mtlora_linear_dropout_sample_is_shared_and_task_inputs_skip_it():
  layer = _hand_layer(dropout=0.5)
  _set(layer.lora_tasks_A['a'], layer.lora_shared_A.value)
  _set(layer.lora_tasks_B['a'], layer.lora_shared_B.value)
  layer.task_scales = (('a', 4.0),)
  x = jax.random.normal(jax.random.key(1), (64, 2))
  y, y_tasks = layer(x)  # train mode: LoRA dropout on
  layer.eval()
  y_eval, _ = layer(x)
  layer.train()
  assert not np.allclose(y, y_eval)  # dropout acted ...
  np.testing.assert_array_equal(y_tasks['a'], y)  # ... with the very same sample for the task
  _, y_tasks = layer(x, {'a': x})
  np.testing.assert_allclose(y_tasks['a'], y_eval, rtol=1e-6)  # task inputs: no dropout


def test_mtlora_linear_init_and_rank_zero():
  layer = lora.MTLoRALinear(64, 32, rank=8, task_ranks={'a': 2, 'b': 4}, shared_scale=4.0,
                            task_scales={'a': 1.0, 'b': 1.0}, rngs=nnx.Rngs(0))
  layer.eval()
  x = jax.random.normal(jax.random.key(0), (3, 64))
  y, y_tasks = layer(x)
  base = layer.linear(x)
  np.testing.assert_array_equal(y, base)  # B = 0: a fresh layer is its base
  assert all(np.array_equal(v, base) for v in y_tasks.values()) and set(y_tasks) == {'a', 'b'}
  for a in (layer.lora_shared_A, layer.lora_tasks_A['a'], layer.lora_tasks_A['b']):
    assert 0.09 < np.abs(a.value).max() <= 1 / 8  # kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(64))
  assert layer.lora_tasks_B['b'].value.shape == (4, 32)
  plain = lora.MTLoRALinear(64, 32, rank=0, task_ranks={'a': 2}, rngs=nnx.Rngs(0))
  assert plain(x)[1] == {} and not hasattr(plain, 'lora_shared_A')


# -- placement (docs/mtlora.md §2.1) --------------------------------------------------------------

def _lora_paths(config):
  tasks = tasks_lib.config_tasks(config)
  model = nnx.eval_shape(lambda: models.build_model(config, tasks, rngs=nnx.Rngs(0)))
  return {'/'.join(map(str, p)) for p, v in nnx.iter_graph(model)
          if isinstance(v, nnx.Param) and 'lora_' in '/'.join(map(str, p))}


def test_hrnet_head_on_per_scale_maps_equals_it_on_their_resized_concatenation():
  """HRNetHead on the decoder's per-scale maps (its first conv at each map's resolution, products
  resized: docs/stack.md §14) is the head on the maps resized to the first one's size and
  concatenated, as the reference computes it: values and gradients of maps and kernel."""
  keys = jax.random.split(jax.random.key(0), 4)
  maps = tuple(jax.random.normal(k, (2, 16 // 2 ** i, 12 // 2 ** i, c))
               for i, (k, c) in enumerate(zip(keys, (3, 4, 5, 6))))
  head = mtlora.HRNetHead(18, 7, rngs=nnx.Rngs(1))
  head.eval()  # BatchNorm on its running statistics: a function of the conv output alone

  def concatenated(head, maps):
    return head(jnp.concatenate([layers.resize_bilinear(m, maps[0].shape[1:3]) for m in maps], -1))

  def loss(f):
    return lambda head, maps: jnp.sum(jnp.sin(f(head, maps)))

  per_scale = lambda head, maps: head(maps)
  np.testing.assert_allclose(per_scale(head, maps), concatenated(head, maps), rtol=1e-5,
                             atol=1e-6)
  got = nnx.grad(loss(per_scale), argnums=(0, 1))(head, maps)
  want = nnx.grad(loss(concatenated), argnums=(0, 1))(head, maps)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(got[0]['conv1']['kernel']).min()) > 0  # every row of the kernel is reached
  with pytest.raises(ValueError, match='17 channels for a head of 18'):
    head(maps[:1] + (maps[1][..., :3],) + maps[2:])


def test_placement_table():
  paths = _lora_paths(mtlora_pascal.get_config('smoke'))  # depths (2, 2), 4 tasks
  ta = {p.rsplit('/lora_', 1)[0] for p in paths if '/lora_shared_A' in p}
  ts = {p.split('/lora_tasks_A/')[0] for p in paths if '/lora_tasks_A/' in p}
  blocks = [f'backbone/layers/{i}/blocks/{j}' for i in range(2) for j in range(2)]
  assert ta == {f'{b}/{layer}' for b in blocks
                for layer in ('attn/qkv', 'attn/proj', 'mlp/fc1', 'mlp/fc2')}
  # TS-LoRA: proj / fc1 / fc2 of the last block of each stage, one per task; never qkv.
  assert ts == {f'backbone/layers/{i}/blocks/1/{layer}' for i in range(2)
                for layer in ('attn/proj', 'mlp/fc1', 'mlp/fc2')}
  assert len([p for p in paths if '/lora_tasks_A/' in p]) == len(ts) * 4
  plus = _lora_paths(mtlora_pascal.get_config('smoke,plus'))
  assert plus - paths == {'backbone/layers/0/downsample/reduction/lora_shared_A',
                          'backbone/layers/0/downsample/reduction/lora_shared_B'}
  config = mtlora_pascal.get_config('smoke')
  config.model.mtlora.shared_mode = 'lora_only'
  assert {p for p in paths if '/lora_tasks_' not in p} == _lora_paths(config)


# -- parity ----------------------------------------------------------------------------------------

def test_parity_mtlora_with_official_model():
  """4 task outputs; the shared stream and the 4 task streams at every stage."""
  rows, config = parity_rows('mtlora_tiny_seed0')
  assert config.model.name == 'mtlora'
  tasks = ('semseg', 'human_parts', 'sal', 'normals')
  assert sorted(k for k, _, _ in rows) == sorted(
      [f'out/{t}' for t in tasks]
      + [f'feat/{s}/stage{i}' for s in ('shared',) + tasks for i in range(4)])


@pytest.mark.slow
def test_parity_lora_layer_subset_with_official_model():
  """LoRA on qkv and fc2 only (the reference's PROJ/FC1_ENABLED False): fc2's task streams see
  the shared hidden state and get no attention residual (swin.SwinBlock)."""
  rows, config = parity_rows('mtlora_layers_qkv_fc2_seed6')
  assert tuple(config.model.mtlora.layers) == ('qkv', 'fc2')
  assert [k for k, _, _ in rows] == [f'out/{t}' for t in sorted(('semseg', 'human_parts', 'sal',
                                                                 'normals'))]


# -- parameter counts (docs/mtlora.md §5) ---------------------------------------------------------

@pytest.mark.parametrize('module, arg, total, trainable', [
    (mtlora_pascal, None, 34_262_906, 8_344_634),  # mtlora_tiny_448_r64_scale4_pertask
    (mtlora_pascal, 'rank=16,plus=True', 30_935_930, 3_469_370),  # mtlora_plus_..._r16_..._pertask
    (swin_pascal, None, 29_464_442, 29_464_442),  # swin_tiny_patch4_window7_448, full fine-tuning
])
def test_parameter_count_table(module, arg, total, trainable):
  counts = params.count(module.get_config(arg))['<all>']
  assert (counts['total'], counts['trainable']) == (total, trainable)


def test_trainable_recipes():
  """The recipes of configs/mtlora_pascal.py on one abstract r64 model. Hand-computed: TS-LoRA =
  4 tasks x 48 C (proj 8C, fc1 20C, fc2 20C at rank 4) summed over C = 96, 192, 384, 768 =
  276,480; TA-LoRA = 1024 C (rank 64 on qkv, proj, fc1, fc2) x sum(depth C) 4416 = 4,521,984."""
  config = mtlora_pascal.get_config()
  tasks = tasks_lib.get_tasks(config.tasks, 'pascal_context', config.convention)
  model = nnx.eval_shape(lambda: models.build_model(config, tasks, rngs=nnx.Rngs(0)))
  leaves = [(p, int(np.prod(v.shape))) for p, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Param)]

  def trainable(recipe):
    frozen = optim.frozen_filter(mtlora.frozen_patterns(recipe))
    return sum(n for p, n in leaves if not frozen(p, None))

  assert trainable('full') == 34_262_906
  assert trainable('mtlora') == 8_344_634
  assert trainable('freeze_ts_lora') == 8_344_634 - 276_480  # the user's stage 1
  assert trainable('freeze_ta_lora') == 8_344_634 - 4_521_984  # stage 2
  assert trainable('freeze_backbone') == 1_946_624  # downsamplers + HRNet heads
  reductions = 4 * 96 * 192 + 4 * 192 * 384 + 4 * 384 * 768
  assert reductions == 1_548_288
  plus = optim.frozen_filter(mtlora.frozen_patterns('mtlora', lora_reduction=True))
  assert sum(n for p, n in leaves if not plus(p, None)) == 8_344_634 - reductions


def test_recipe_schedule_and_optimizer():
  """docs/mtlora.md §8 at batch 32: lr 5e-4 * 32 / 512 after 20 warmup epochs from 5e-7 *
  32 / 512, cosine to 5e-6 * 32 / 512 at epoch 300; AdamW wd 0.05, no decay on 1-D leaves."""
  config = mtlora_pascal.get_config()
  assert (config.total_steps, config.schedule.warmup_steps) == (156 * 300, 156 * 20)
  lr = optim.make_schedule(config)
  np.testing.assert_allclose(
      [lr(0), lr(3120), lr((3120 + 46800) // 2), lr(46800)],
      [3.125e-8, 3.125e-5, (3.125e-5 + 3.125e-7) / 2, 3.125e-7], rtol=1e-5)
  assert (config.optimizer.name, config.optimizer.weight_decay) == ('adamw', 0.05)
  assert (config.optimizer.grad_clip_norm, config.optimizer.decay_1d) == (5.0, False)
  assert mtlora_nyud.get_config().total_steps == 795 // 32 * 300
  # bigger batch: linear scaling of every learning rate
  config.batch_size = 64
  assert optim.make_schedule(config)(1560) == pytest.approx(6.25e-5)


# -- trainable sets in training --------------------------------------------------------------------

def assert_frozen_are_the_base_linears(config) -> None:
  """config.frozen of a two-stage smoke Swin matches exactly the pretrained qkv / proj / fc1 /
  fc2 kernels and biases."""
  frozen = optim.frozen_filter(config.frozen)
  tasks = tasks_lib.config_tasks(config)
  model = nnx.eval_shape(lambda: models.build_model(config, tasks, rngs=nnx.Rngs(0)))
  names = {'/'.join(map(str, p)) for p, v in nnx.iter_graph(model)
           if isinstance(v, nnx.Param) and frozen(p, v)}
  assert names == {f'backbone/layers/{i}/blocks/{j}/{layer}/linear/{leaf}'
                   for i in range(2) for j in range(2)
                   for layer in ('attn/qkv', 'attn/proj', 'mlp/fc1', 'mlp/fc2')
                   for leaf in ('kernel', 'bias')}


@pytest.mark.slow
def test_mtlora_pascal_smoke_recipe_freezes_exactly_the_base_linears(tfds_dir, tmp_path):
  config = mtlora_pascal.get_config('smoke')
  assert_frozen_are_the_base_linears(config)
  train_three_steps(config, tfds_dir, tmp_path)


@pytest.mark.slow
def test_mtlora_nyud_plus_stage1_smoke_keeps_ts_lora_bit_identical(tfds_dir, tmp_path):
  """MTLoRA+ on the NYUD smoke config with the user's stage-1 recipe (TS-LoRA frozen); two of
  the four tasks keep the test short."""
  config = mtlora_nyud.get_config('smoke,plus,recipe=freeze_ts_lora,tasks=semseg+depth')
  assert config.tasks == 'semseg,depth'
  assert r'^backbone/.*/lora_tasks_' in config.frozen
  train_three_steps(config, tfds_dir, tmp_path)
