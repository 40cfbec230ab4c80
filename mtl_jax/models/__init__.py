"""Model zoo: `build_model(config, tasks, rngs=...)` -> `MultiTaskModel(backbone, decoder, heads)`.

`config.model.name` picks a decoder family and its usual backbone; `config.model.backbone.name`
('' = that usual one) swaps the backbone for any other of `BACKBONES`: decoders are built from
the backbone contract alone (models/backbone.py), so e.g. `model.name=mlore,
model.backbone.name=swin` runs MLoRE's decoder on a Swin. Adding a backbone or a decoder is one
entry here (docs/extending.md).

Config keys read by every model: model.dtype (computation dtype, e.g. 'float32' or 'bfloat16';
parameters stay float32), input.crop_size ((H, W) the model is built for: the ViT's pos_embed
and Swin's masks are resolution-locked); the rest are listed by each builder.
"""

from collections.abc import Mapping

from flax import nnx

from mtl_jax import ConfigError
from mtl_jax import xla_cpu
from mtl_jax.models import mlore
from mtl_jax.models import mtlora
from mtl_jax.models import promlora
from mtl_jax.models import multitask
from mtl_jax.models import swin
from mtl_jax.models import vit
from mtl_jax.tasks import Task

# Dropout masks: jax's unrolled threefry on CPU too (same bits, ~3x faster; mtl_jax/xla_cpu.py).
xla_cpu.unroll_threefry()

# Backbone families: build(config, tasks, *, rngs) -> a module honouring models/backbone.py.
BACKBONES = {'vit': vit.build, 'swin': swin.build}

# config.model.name -> (its usual backbone builder, decoder builder). A decoder builder is
# build_decoder(config, tasks, backbone, *, rngs) -> (decoder, {task: head}).
MODELS = {
    # The ViT multi-task baseline: FuseDecoder + ConvHeads.
    'vit_baseline': (vit.build, multitask.build_fuse_decoder),
    'mlore': (vit.build, mlore.build_decoder),  # docs/mlore.md §3
    # Swin + per-task HRNet heads (docs/mtlora.md §1, §3); the same with MTLoRA (§2).
    'swin': (swin.build, mtlora.build_decoder),
    'mtlora': (mtlora.build_backbone, mtlora.build_decoder),
    # The user fork's ProMLoRA: shared LoRA + deep per-task prompts (docs/user_fork.md §2).
    'promlora': (promlora.build_backbone, mtlora.build_decoder),
}


def build_model(config, tasks: Mapping[str, Task], *, rngs: nnx.Rngs) -> multitask.MultiTaskModel:
  """Builds the model named by config.model.name for `tasks` ({name: Task}, mtl_jax.tasks)."""
  name = config.model.name
  if name not in MODELS:
    raise ConfigError(f'unknown config.model.name {name!r}; known: {", ".join(MODELS)}')
  build_backbone, build_decoder = MODELS[name]
  backbone_name = config.model.backbone.get('name', '')
  if backbone_name:
    if backbone_name not in BACKBONES:
      raise ConfigError(f'unknown config.model.backbone.name {backbone_name!r}; known: '
                        f'{", ".join(BACKBONES)} (or leave it empty for the model\'s own)')
    build_backbone = BACKBONES[backbone_name]
  backbone = build_backbone(config, tasks, rngs=rngs)
  decoder, heads = build_decoder(config, tasks, backbone, rngs=rngs)
  return multitask.MultiTaskModel(backbone, decoder, heads)
