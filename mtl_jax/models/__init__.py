"""Model zoo: `build_model(config, tasks, rngs=...)` -> `MultiTaskModel`."""

from collections.abc import Mapping

import jax.numpy as jnp
from flax import nnx

from mtl_jax import ConfigError
from mtl_jax.models import mlore
from mtl_jax.models import mtlora
from mtl_jax.models import multitask
from mtl_jax.models import vit
from mtl_jax.tasks import Task


def _vit(config, *, rngs: nnx.Rngs) -> vit.ViT:
  """The ViT of config.model.backbone (specs/mlore.md §2)."""
  cfg = config.model.backbone
  variant = cfg.get('variant')
  if variant:
    if variant not in vit.VARIANTS:
      raise ConfigError(f'unknown config.model.backbone.variant {variant!r}; known: '
                       f'{", ".join(vit.VARIANTS)} (or leave it empty and set patch_size, '
                       'embed_dim, depth, num_heads, taps)')
    arch = vit.VARIANTS[variant]
  else:
    arch = {k: cfg[k] for k in ('patch_size', 'embed_dim', 'depth', 'num_heads', 'taps')}
  return vit.ViT(tuple(config.input.crop_size), **arch, drop_path_rate=cfg.drop_path_rate,
                 dtype=jnp.dtype(config.model.dtype), rngs=rngs)


def _vit_baseline(config, tasks: Mapping[str, Task], *, rngs: nnx.Rngs):
  """ViT + FuseDecoder + ConvHead per task (the "ViT multi-task baseline")."""
  backbone = _vit(config, rngs=rngs)
  dtype = jnp.dtype(config.model.dtype)
  channels = config.model.decoder.channels
  decoder = multitask.FuseDecoder(
      [backbone.embed_dim] * (len(backbone.taps) + 1), channels, list(tasks),
      upsample=config.model.decoder.upsample, dtype=dtype, rngs=rngs)
  heads = {name: multitask.ConvHead(channels, task.num_outputs, dtype=dtype, rngs=rngs)
           for name, task in tasks.items()}
  return multitask.MultiTaskModel(backbone, decoder, heads)


def _mlore(config, tasks: Mapping[str, Task], *, rngs: nnx.Rngs):
  """ViT + MLoRE decoder + ConvHead per task (mtl_jax/models/mlore.py, specs/mlore.md §3)."""
  return mlore.build(config, tasks, _vit(config, rngs=rngs), rngs=rngs)


_BUILDERS = {
    'vit_baseline': _vit_baseline,
    'mlore': _mlore,
    'swin': mtlora.build,  # Swin + per-task HRNet heads (specs/mtlora.md §1, §3)
    'mtlora': mtlora.build,  # the same with MTLoRA (specs/mtlora.md §2)
}


def build_model(config, tasks: Mapping[str, Task], *, rngs: nnx.Rngs) -> multitask.MultiTaskModel:
  """Builds the model named by config.model.name for `tasks` ({name: Task}, mtl_jax.tasks).

  Config keys read:
    model.name: 'vit_baseline'.
    model.dtype: computation dtype, e.g. 'float32' or 'bfloat16' (parameters stay float32).
    model.backbone.variant: a key of vit.VARIANTS ('S/16', 'B/16', 'L/16', 'tiny/16'); if empty,
      model.backbone.{patch_size, embed_dim, depth, num_heads, taps} give the ViT.
    model.backbone.drop_path_rate: stochastic depth of the last block (0.15 in MLoRE).
    model.decoder.channels: C, width of the fused map and of the heads.
    model.decoder.upsample: integer bilinear upsampling of the fused map (4 -> 1/4 resolution
      for patch 16).
    input.crop_size: (H, W) the model is built for (the pos_embed is resolution-locked).
  """
  name = config.model.name
  if name not in _BUILDERS:
    raise ConfigError(f'unknown config.model.name {name!r}; known: {", ".join(_BUILDERS)}')
  return _BUILDERS[name](config, tasks, rngs=rngs)
