"""The MLoRE experiment configs (configs/mlore_{pascal,nyud}.py): recipe, exact parameter counts
(docs/mlore.md §7) and a smoke run of each through the trainer."""

import jax
import numpy as np
import pytest

from configs import mlore_nyud
from configs import mlore_pascal
from mtl_jax import reporting
from mtl_jax import tasks as tasks_lib
from mtl_jax import train
from mtl_jax.tools import params


# docs/mlore.md §7 (`model.parameters()` of the official models); ViT-B without the 26,661,804
# parameters of aux_heads / q_fuse / classify_route that its forward never uses (§3.5).
@pytest.mark.parametrize('module, arg, expected', [
    (mlore_pascal, None, 407_690_406),
    (mlore_pascal, 'vit=S', 42_176_918),
    (mlore_pascal, 'vit=B', 285_794_210 - 26_661_804),
    (mlore_nyud, None, 551_625_533),
])
def test_param_counts_match_the_reference(module, arg, expected):
  groups = params.count(module.get_config(arg))
  assert groups['<all>'] == {'total': expected, 'trainable': expected}


def test_vit_s_param_groups():
  """ViT encoder / decoder / heads split of §7 (pascal ViT-S, C = 192)."""
  groups = params.count(mlore_pascal.get_config('vit=S'))
  assert groups['backbone']['total'] == 21_983_232
  assert groups['decoder']['total'] == 18_525_364
  assert groups['heads']['total'] == 1_668_322


@pytest.mark.parametrize('vit, channels, ranks, spe_rank, edge_w, lb', [
    ('S', 192, (8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64), 32, 0.95, 1e-4),
    ('B', 640, (16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128), 64, 0.95, 1e-4),
    ('L', 452, (16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128), 72, 0.925, 3e-4),
])
def test_pascal_recipe(vit, channels, ranks, spe_rank, edge_w, lb):
  """docs/mlore.md §1 table and §4-5, written out by hand."""
  c = mlore_pascal.get_config(f'vit={vit}')
  assert c.model.backbone.variant == f'{vit}/16' and c.model.backbone.drop_path_rate == 0.15
  assert dict(c.model.mlore) == dict(channels=channels, rank_list=ranks, spe_rank=spe_rank,
                                     topk=9, pre_softmax=False, repara=False)
  assert (c.edge_w, c.load_balancing_weight) == (edge_w, lb)
  assert c.optimizer.learning_rate == 2e-5
  _assert_common_recipe(c)
  assert c.dataset.name == 'pascal_context' and c.input.crop_size == (512, 512)
  assert list(tasks_lib.get_tasks(c.tasks, 'pascal_context', c.convention)) == [
      'semseg', 'human_parts', 'sal', 'normals', 'edge']
  assert {t: c.loss_weights[t] for t in c.tasks.split(',')} == dict(
      semseg=1.0, human_parts=2.0, sal=5.0, normals=10.0, edge=50.0)


def test_nyud_recipe():
  c = mlore_nyud.get_config()
  assert c.model.backbone.variant == 'L/16'
  assert dict(c.model.mlore) == dict(channels=768, rank_list=tuple(range(16, 241, 16)),
                                     spe_rank=16, topk=9, pre_softmax=True, repara=False)
  assert len(c.model.mlore.rank_list) == 15 and c.model.mlore.rank_list[-1] == 240
  assert (c.edge_w, c.load_balancing_weight, c.optimizer.learning_rate) == (0.88, 5e-4, 1e-5)
  _assert_common_recipe(c)
  assert c.dataset.name == 'nyud_v2/invpt' and c.input.crop_size == (448, 576)
  assert list(tasks_lib.get_tasks(c.tasks, 'nyud_v2', c.convention)) == [
      'semseg', 'depth', 'normals', 'edge']
  assert {t: c.loss_weights[t] for t in c.tasks.split(',')} == dict(
      semseg=1.0, depth=1.0, normals=10.0, edge=50.0)


def _assert_common_recipe(c):
  """Adam + coupled L2 1e-6 on all params, poly 0.9 no warmup, 40k its, batch 4, clip 10 (§5)."""
  assert (c.total_steps, c.batch_size, c.eval_every_steps, c.seed) == (40_000, 4, 2_000, 0)
  assert dict(c.optimizer) == dict(name='adam', learning_rate=c.optimizer.learning_rate, b1=0.9,
                                   b2=0.999, eps=1e-8, weight_decay=1e-6, grad_clip_norm=10.0,
                                   decay_1d=True, no_decay=())
  assert dict(c.schedule) == dict(name='poly', power=0.9, warmup_steps=0, warmup_lr=0.0,
                                  min_lr=0.0)
  assert c.frozen == () and c.model.dtype == 'float32' and c.convention == 'mlore'
  assert (c.input.augment, c.input.scale_range, c.input.cat_max_ratio) == ('mlore', (0.5, 2.0),
                                                                           0.75)
  assert c.input.flip and c.input.photometric


def test_bad_vit_arg():
  with pytest.raises(ValueError, match='unknown vit'):
    mlore_pascal.get_config('vit=H')


@pytest.mark.slow
def test_smoke_config_trains(tfds_dir, tmp_path):
  """`smoke` runs two train steps (batch 4 on 2 devices) and an eval end to end, with the
  load-balancing loss. (mlore_nyud's smoke differs only in the task set; compiling MLoRE is the
  cost of this test, so one config runs.)"""
  c = mlore_pascal.get_config('smoke')
  c.dataset.update(data_dir=tfds_dir, build_if_missing=False)
  c.update(total_steps=2, log_every_steps=1, eval_every_steps=2, checkpoint_every_steps=2,
           eval_at_start=False)
  final = train.train_and_evaluate(c, tmp_path, jax.devices()[:2])
  assert 'semseg/miou' in final and 'normals/mean' in final
  lines = [l for l in reporting.read_metrics(tmp_path) if 'train/loss' in l]
  assert [l['step'] for l in lines] == [1, 2]
  for line in lines:
    assert np.isfinite(line['train/loss']) and line['train/load_balancing_loss'] > 0
