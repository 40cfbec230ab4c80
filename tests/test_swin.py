"""Swin backbone and the Swin multi-task baselines (issue 5; docs/mtlora.md §1, §3, §5).

Window geometry against hand-computed values, parity of Swin + HRNet decoders with the official
model (slim extract of fixtures/swin_tiny_decoder_seed0), and the smoke configs of
configs/swin_{pascal,nyud}.py through the real trainer. `train_three_steps` is shared with
tests/test_mtlora.py.
"""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import swin_nyud
from configs import swin_pascal
from conftest import FIXTURES
from mtl_jax import ConfigError
from mtl_jax import input_pipeline
from mtl_jax import reporting
from mtl_jax import sharding
from mtl_jax import train
from mtl_jax.models import swin
from mtl_jax.tools import params
from mtl_jax.tools import parity


# -- window geometry (docs/mtlora.md §1.3) --------------------------------------------------------

def test_window_partition_is_row_major_and_reversible():
  x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
  windows = np.asarray(swin.window_partition(x, 2))
  assert windows.shape == (2, 6, 4, 3)
  # window id = row-block * 3 + col-block; tokens row-major inside the window
  np.testing.assert_array_equal(windows[1, 4], x[1, 2:4, 2:4].reshape(4, 3))
  np.testing.assert_array_equal(windows[0, 2], x[0, 0:2, 4:6].reshape(4, 3))
  np.testing.assert_array_equal(swin.window_reverse(windows, 2, 4, 6), x)


def test_relative_position_index_hand_computed():
  # coords (0,0) (0,1) (1,0) (1,1); index = (dr + 1) * 3 + (dc + 1)
  np.testing.assert_array_equal(swin.relative_position_index(2),
                                [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
  assert swin.relative_position_index(7).max() == 168


def test_shift_mask_hand_computed():
  # 4x4 grid, window 2, shift 1: regions per axis [0, 2) -> 0, [2, 3) -> 1, [3, 4) -> 2.
  mask = swin.shift_mask(4, 4, 2, 1)
  assert mask.shape == (4, 4, 4)
  np.testing.assert_array_equal(mask[0], np.zeros((4, 4)))  # rows 0-1, cols 0-1: one region
  o = -100.0
  # rows 0-1, cols 2-3: labels [1, 2, 1, 2]
  np.testing.assert_array_equal(mask[1], [[0, o, 0, o], [o, 0, o, 0]] * 2)
  # rows 2-3, cols 2-3: labels [4, 5, 7, 8], all different
  np.testing.assert_array_equal(mask[3], np.where(np.eye(4), 0.0, o))


def test_geometry_errors_name_the_fix():
  with pytest.raises(ConfigError, match='crop_size'):
    nnx.eval_shape(lambda: swin.SwinTransformer((224, 200), **swin.VARIANTS['T'],
                                                rngs=nnx.Rngs(0)))
  with pytest.raises(ConfigError, match='multiple of the window'):
    nnx.eval_shape(lambda: swin.SwinTransformer((320, 320), **swin.VARIANTS['T'],
                                                rngs=nnx.Rngs(0)))  # 80 / 40 / 20 / 10 tokens
  # At 224 the 7x7 last stage gets one unshifted window (the reference shrinks it likewise).
  model = nnx.eval_shape(lambda: swin.SwinTransformer((224, 224), **swin.VARIANTS['T'],
                                                      rngs=nnx.Rngs(0)))
  assert [(b.window_size, b.shift) for b in model.layers[3].blocks] == [(7, 0), (7, 0)]
  assert [(b.window_size, b.shift) for b in model.layers[2].blocks[:2]] == [(7, 0), (7, 3)]


# -- parity ----------------------------------------------------------------------------------------

def test_parity_swin_decoder_with_official_model():
  """Plain Swin + per-task downsamplers and HRNet heads: 4 task outputs, 4 shared stages."""
  rows, config = parity_rows('swin_tiny_decoder_seed0')
  assert config.model.name == 'swin'
  assert sorted(k for k, _, _ in rows) == sorted(
      [f'out/{t}' for t in ('semseg', 'human_parts', 'sal', 'normals')]
      + [f'feat/shared/stage{i}' for i in range(4)])


def parity_rows(name: str, dtype: str = 'float32', tol: float = 1e-5):
  """(parity.compare rows, config) of the slim fixture `name` computed in `dtype`, every row's
  relative error asserted <= `tol`. Slims hold arrays cropped as tests/fixtures/make_slim.py crops
  them."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  slim = f'{name}_slim.npz'
  arrays = dict(np.load(os.path.join(FIXTURES, slim)))
  if 'input' not in arrays:  # the two shipped MTLoRA-family slims share one input, kept once
    arrays['input'] = np.load(os.path.join(FIXTURES, 'mtlora_tiny_seed0_slim.npz'))['input']
  with open(os.path.join(FIXTURES, f'{name}.json')) as f:
    sidecar = json.load(f)
  model, config, family = parity.build_from_fixture(arrays, sidecar, dtype)
  got = family.reference_arrays(model, arrays['input'], config)
  spec = importlib.util.spec_from_file_location('make_slim', os.path.join(FIXTURES, 'make_slim.py'))
  make_slim = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make_slim)
  for pattern, index in make_slim.SLIMS[slim][2].items():
    got.update({k: v[index] for k, v in got.items() if re.fullmatch(pattern, k)})
  rows = parity.compare(got, arrays)
  worst = max(rows, key=lambda r: r[2])
  assert worst[2] <= tol, worst
  return rows, config


def test_freeze_backbone_trains_only_the_decoders():
  """docs/mtlora.md §3, §5: 1,946,624 decoder parameters of the 29,464,442."""
  counts = params.count(swin_pascal.get_config('recipe=freeze_backbone'))
  assert counts['<all>'] == {'total': 29_464_442, 'trainable': 1_946_624}
  assert counts['backbone']['trainable'] == 0


# -- the trainer on the smoke configs --------------------------------------------------------------

def train_three_steps(config, tfds_dir, tmp_path) -> set[str]:
  """Three real train steps (mtl_jax/train.py) on 2 devices: frozen leaves stay bit-identical,
  most trainable leaves move, and the optimizer (AdamW: mu, nu) holds state for the trainable
  parameters only. Returns the paths of the leaves that moved."""
  config.dataset.update(name='synthetic_scenes/tiny', data_dir=tfds_dir, build_if_missing=False)
  trainer = train.Trainer(config, tmp_path, jax.devices()[:2])
  state = trainer.init_state()
  frozen0, params0 = jax.device_get((state.frozen, state.params))
  batches = input_pipeline.make_train_iterator(config, trainer.tasks, source=trainer.train_source)
  for _ in range(3):
    state, scalars = trainer.train_step(state, trainer.rest,
                                        sharding.global_batch(next(batches), trainer.mesh))
    assert np.isfinite(float(scalars['loss']))

  def flat(tree):
    return {sharding.path_str(p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}

  frozen0, frozen1, params0, params1 = map(flat, (frozen0, state.frozen, params0, state.params))
  for key, value in frozen0.items():
    assert np.array_equal(frozen1[key], value), f'{key} moved'
  moved = {k for k, v in params0.items() if not np.array_equal(params1[k], v)}
  assert len(moved) > len(params0) // 2, (len(moved), len(params0))
  counts = params.count(config)['<all>']
  assert sum(v.size for v in params0.values()) == counts['trainable']
  assert sum(v.size for v in frozen0.values()) == counts['total'] - counts['trainable']
  opt_sizes = [np.size(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
  assert sum(opt_sizes) == 2 * counts['trainable']
  return moved


@pytest.mark.slow
def test_swin_nyud_smoke_decoder_only_keeps_backbone_bit_identical(tfds_dir, tmp_path):
  config = swin_nyud.get_config('smoke,recipe=freeze_backbone')
  assert config.frozen == (r'^backbone/',)
  train_three_steps(config, tfds_dir, tmp_path)


@pytest.mark.slow
def test_swin_pascal_smoke_runs_end_to_end(tfds_dir, tmp_path):
  """launch.py's loop (train, eval, checkpoint) on the full fine-tuning smoke config."""
  config = swin_pascal.get_config('smoke')
  assert config.frozen == ()
  config.dataset.update(data_dir=tfds_dir, build_if_missing=False)
  config.update(total_steps=2, eval_every_steps=2, checkpoint_every_steps=2, log_every_steps=1,
                eval_at_start=False)
  config.schedule.warmup_steps = 1
  final = train.train_and_evaluate(config, tmp_path, jax.devices()[:2])
  assert {'semseg/miou', 'human_parts/miou', 'sal/miou', 'normals/mean'} <= set(final), final
  assert all(np.isfinite(v) for v in final.values())
  lines = reporting.read_metrics(tmp_path)
  assert [l['step'] for l in lines if 'train/loss' in l] == [1, 2]
