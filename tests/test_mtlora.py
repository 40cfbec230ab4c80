"""MTLoRA and the Swin baselines (issue 5): parity with the official model, the parameter-count
table of specs/mtlora.md §5, and the declarative trainable set (frozen leaves never move).

The parity tests read slim extracts of fixtures/{mtlora_tiny_seed0,swin_tiny_decoder_seed0}
(tests/fixtures/make_slim.py: every parameter, outputs on a 7-pixel grid, every 5th token of the
features); `python -m mtl_jax.tools.parity` runs the same comparison on full fixtures.
"""

import importlib.util
import json
import os
import re

import jax
import numpy as np
import pytest

from configs import mtlora_nyud
from configs import mtlora_pascal
from configs import swin_nyud
from configs import swin_pascal
from conftest import FIXTURES
from mtl_jax import input_pipeline
from mtl_jax import sharding
from mtl_jax import train
from mtl_jax.models import mtlora
from mtl_jax.tools import params
from mtl_jax.tools import parity


def _slims():
  spec = importlib.util.spec_from_file_location('make_slim', os.path.join(FIXTURES, 'make_slim.py'))
  make_slim = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make_slim)
  return make_slim.SLIMS


# -- parity ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('name, num_arrays', [
    ('mtlora_tiny_seed0', 4 + 4 * 5),  # 4 task outputs; shared + 4 task streams x 4 stages
    ('swin_tiny_decoder_seed0', 4 + 4),  # 4 task outputs; shared features x 4 stages
])
def test_parity_with_official_model(name, num_arrays):
  slim = f'{name}_slim.npz'
  arrays = dict(np.load(os.path.join(FIXTURES, slim)))
  if 'input' not in arrays:  # both fixtures share one input, kept once
    arrays['input'] = np.load(os.path.join(FIXTURES, 'mtlora_tiny_seed0_slim.npz'))['input']
  with open(os.path.join(FIXTURES, f'{name}.json')) as f:
    sidecar = json.load(f)
  model, config, family = parity.build_from_fixture(arrays, sidecar)
  assert family is mtlora
  got = mtlora.reference_arrays(model, arrays['input'], config)
  for pattern, index in _slims()[slim][2].items():
    got.update({k: v[index] for k, v in got.items() if re.fullmatch(pattern, k)})
  rows = parity.compare(got, arrays)
  assert len(rows) == num_arrays, sorted(k for k, _, _ in rows)
  worst = max(rows, key=lambda r: r[2])
  assert worst[2] <= 1e-5, worst


# -- parameter counts ------------------------------------------------------------------------------

@pytest.mark.parametrize('module, arg, total, trainable', [
    # specs/mtlora.md §5 (= the official listings in specs/state_dicts/)
    (mtlora_pascal, None, 34_262_906, 8_344_634),  # mtlora_tiny_448_r64_scale4_pertask
    (mtlora_pascal, 'rank=16,plus=True', 30_935_930, 3_469_370),  # mtlora_plus_tiny_448_r16
    (swin_pascal, None, 29_464_442, 29_464_442),  # Swin-T + 4 HRNet heads, full fine-tuning
])
def test_parameter_count_table(module, arg, total, trainable):
  counts = params.count(module.get_config(arg))['<all>']
  assert (counts['total'], counts['trainable']) == (total, trainable)


def test_trainable_recipes_partition_the_mtlora_parameters():
  """Stage 1 (TS-LoRA frozen) + stage 2 (TA-LoRA frozen) train disjoint LoRA sets whose union,
  with what both train, is the MTLoRA recipe; freeze_backbone trains only the decoder."""
  def trainable(recipe):
    c = mtlora_pascal.get_config(f'recipe={recipe}')
    return params.count(c)['<all>']['trainable'], params.count(c)

  full, _ = trainable('full')
  recipe, groups = trainable('mtlora')
  ta_frozen, _ = trainable('freeze_ta_lora')
  ts_frozen, _ = trainable('freeze_ts_lora')
  decoder_only, _ = trainable('freeze_backbone')
  assert full == 34_262_906 and recipe == 8_344_634
  assert ta_frozen < recipe and ts_frozen < recipe
  # LoRA = TA + TS; each stage freezes one of the two.
  assert (recipe - ta_frozen) + (recipe - ts_frozen) == groups['kind:lora']['total']
  assert decoder_only == full - groups['backbone']['total']


# -- trainable set in training ---------------------------------------------------------------------

@pytest.mark.parametrize('module, arg', [
    (mtlora_pascal, 'smoke=True'),  # the MTLoRA recipe
    (swin_nyud, 'smoke=True,recipe=freeze_backbone'),
])
def test_frozen_leaves_bit_identical_after_three_steps(module, arg, tfds_dir, tmp_path):
  config = module.get_config(arg)
  config.dataset.update(name='synthetic_scenes/tiny', data_dir=tfds_dir, build_if_missing=False)
  trainer = train.Trainer(config, tmp_path, jax.devices()[:2])
  state = trainer.init_state()
  frozen0 = jax.device_get(state.frozen)
  params0 = jax.device_get(state.params)
  batches = input_pipeline.make_train_iterator(config, trainer.tasks, source=trainer.train_source)
  for _ in range(3):
    state, scalars = trainer.train_step(state, trainer.rest,
                                        sharding.global_batch(next(batches), trainer.mesh))
    assert np.isfinite(float(scalars['loss']))

  flat = lambda tree: {sharding.path_str(p): np.asarray(v)
                       for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}
  frozen1, frozen0, params1, params0 = (flat(t) for t in (state.frozen, frozen0, state.params,
                                                           params0))
  assert frozen0, 'the recipe freezes something'
  for key, value in frozen0.items():
    assert np.array_equal(frozen1[key], value), f'{key} moved'
  assert sum(not np.array_equal(params1[k], v) for k, v in params0.items()) > len(params0) // 2

  # The optimizer holds state for the trainable leaves only: AdamW's mu and nu, one each.
  n_trainable = params.count(config)['<all>']['trainable']
  assert sum(v.size for v in params0.values()) == n_trainable
  opt_sizes = [np.size(x) for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
  assert sum(opt_sizes) == 2 * n_trainable


@pytest.mark.parametrize('module', [mtlora_pascal, mtlora_nyud, swin_pascal, swin_nyud])
def test_configs_build_and_smoke_configs_are_tiny(module):
  full = params.count(module.get_config(None))['<all>']
  smoke = params.count(module.get_config('smoke=True'))['<all>']
  assert full['total'] > 25_000_000 and smoke['total'] < 1_000_000
