"""The backbone contract (mtl_jax/models/backbone.py): declared stage dims / grids match what the
backbones return, decoders run on another family's backbone, one dataset-name parser."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import demo
from configs import swin_pascal
from mtl_jax import ConfigError
from mtl_jax import models
from mtl_jax import tasks as tasks_lib
from mtl_jax.models import backbone


def _swin_config(model: str, **mlore):
  """configs/swin_pascal.py:smoke with a 4-stage Swin (MLoRE's decoder needs 4 stages)."""
  c = swin_pascal.get_config('smoke')
  c.model.backbone.update(depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), window_size=2)
  c.model.decoder.channels = (4, 4, 8, 8)
  c.input.crop_size = (32, 64)
  if model == 'mlore':
    c.model.name = 'mlore'
    c.model.mlore = dict(channels=8, rank_list=(1, 2, 2), spe_rank=2, topk=2, pre_softmax=False,
                         repara=False, fused=True, **mlore)
  return c


def _abstract_forward(config):
  tasks = tasks_lib.config_tasks(config)
  model = nnx.eval_shape(lambda: models.build_model(config, tasks, rngs=nnx.Rngs(0)))
  model.eval()
  images = jnp.zeros((2, *config.input.crop_size, 3))
  features = nnx.eval_shape(lambda m, x: m.backbone(x), model, images)
  preds, _ = nnx.eval_shape(lambda m, x: m(x), model, images)
  return model, tasks, features, preds


@pytest.mark.parametrize('config', [
    pytest.param(lambda: demo.get_config('smoke,model=vit_baseline'), id='vit'),
    pytest.param(lambda: _swin_config('swin'), id='swin'),
])
def test_declared_stages_match_the_features(config):
  model, tasks, features, preds = _abstract_forward(config())
  assert isinstance(features, backbone.Features)
  got = [(f.shape[-1], tuple(f.shape[1:3])) for f in features.maps]
  assert got == list(zip(model.backbone.stage_dims, model.backbone.stage_grids))
  assert len(features) == len(got) and features[0].shape == features.maps[0].shape
  for task in tasks:
    assert [m.shape for m in features.for_task(task)] == [m.shape for m in features.maps]


def test_task_streams_reach_the_decoder_through_features():
  c = _swin_config('swin')
  c.model.name = 'mtlora'
  c.model.mtlora = dict(rank=(2,), task_rank=(2,), shared_scale=(4.0,), task_scale=(4.0,),
                        dropout=(0.0,), shared_mode='matrix', layers=('qkv', 'proj', 'fc1', 'fc2'))
  _, tasks, features, _ = _abstract_forward(c)
  assert all(set(streams) == set(tasks) for streams in features.task_maps)
  shared = jnp.zeros((1, 2, 2, 3))
  own = jnp.ones((1, 2, 2, 3))
  f = backbone.Features((shared, shared), ({'semseg': own}, {}))
  assert f.for_task('semseg')[0] is own and f.for_task('semseg')[1] is shared
  assert f.for_task('sal') == (shared, shared)


@pytest.mark.slow
def test_mlore_decoder_on_a_swin_backbone():
  """`model.name=mlore, model.backbone.name=swin`: the MLoRE decoder on Swin's 4 stages (grids
  8x16 ... 2x4), no decoder code aware of which backbone it runs on."""
  c = _swin_config('mlore')
  c.model.backbone.name = 'swin'
  model, tasks, _, preds = _abstract_forward(c)
  assert type(model.backbone).__name__ == 'SwinTransformer'
  # Each stage's routers see that stage's grid (the positional Linear is resolution-locked).
  grids = model.backbone.stage_grids
  assert grids == ((8, 16), (4, 8), (2, 4), (2, 4))
  assert [b.branches.router.pos_linear.kernel.shape[1] for b in model.decoder.mlore_1] == [
      h * w for h, w in grids]
  assert [model.decoder.fea_fuse[s].kernel.shape[2] for s in range(4)] == list(
      model.backbone.stage_dims)
  for name, task in tasks.items():
    assert preds[name].shape == (2, 32, 64, task.num_outputs)
  # A real forward (tiny): finite outputs of the right shapes.
  real = models.build_model(c, tasks, rngs=nnx.Rngs(0))
  real.eval()
  out, aux = real(jax.random.normal(jax.random.key(0), (2, 32, 64, 3)))
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in out.values()) and len(aux['gates']) == 8


def test_unknown_backbone_and_too_few_stages_are_config_errors():
  c = _swin_config('mlore')
  c.model.backbone.name = 'resnet'
  with pytest.raises(ConfigError, match="backbone.name 'resnet'.*vit, swin"):
    models.build_model(c, tasks_lib.config_tasks(c), rngs=nnx.Rngs(0))
  c.model.backbone.update(name='swin', depths=(2, 2), num_heads=(1, 1))
  c.model.decoder.channels = (4, 8)
  with pytest.raises(ConfigError, match='MLoRE needs 4 backbone stages, got 2'):
    models.build_model(c, tasks_lib.config_tasks(c), rngs=nnx.Rngs(0))


@pytest.mark.parametrize('name', ['pascal_context', 'pascal_context/full', 'pascal_context:1.0.0',
                                  'pascal_context/full:1.0.0'])
def test_dataset_kind_strips_builder_config_and_version(name):
  assert tasks_lib.dataset_kind(name) == 'pascal_context'
  assert list(tasks_lib.get_tasks('semseg,sal', name)) == ['semseg', 'sal']
  assert tasks_lib.num_outputs('semseg', name) == 21


def test_variant_lookup_is_shared_by_both_families():
  c = demo.get_config('smoke')
  c.model.backbone.variant = 'H/14'
  with pytest.raises(ConfigError, match="variant 'H/14' for the ViT; known: tiny/16, S/16"):
    models.build_model(c, tasks_lib.config_tasks(c), rngs=nnx.Rngs(0))
  c = _swin_config('swin')
  c.model.backbone.variant = 'XL'
  with pytest.raises(ConfigError, match="variant 'XL' for Swin; known: T, S, B, tiny"):
    models.build_model(c, tasks_lib.config_tasks(c), rngs=nnx.Rngs(0))
