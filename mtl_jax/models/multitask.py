"""The multi-task model interface: backbone -> decoder -> per-task heads -> input resolution.

Every model of mtl_jax is a `MultiTaskModel`:

  backbone(images NHWC) -> backbone.Features (multi-scale maps, optional task streams)
  decoder(features)     -> ({task: feature map}, aux)
  heads[task](map)      -> logits, bilinearly resized to the input size (docs/mlore.md §3.3)

A decoder whose maps end in a bilinear x s upsampling (MLoRE's x4, FuseDecoder's `upsample`) may
return them before it and set `head_upsample = s`: the model then calls `head(map, upsample=s)`,
which equals `head(resize_bilinear(map, s x))` and need not build the upsampled map
(`ConvHead`, layers.conv_of_upsampled).

`aux` carries extras for the losses (MLoRE puts its router gates there). `FuseDecoder` is the
decoder of the "ViT multi-task baseline": one map shared by all tasks.

A backbone or decoder sets `task_symmetric = True` when it computes every task's output by the
same code from its shared leaves and the leaves named after that task (TS-LoRA `<task>` keys,
per-task prompts, downsamplers): then task t's map equals the first task's map computed with t's
leaves in the first task's places, which is how the meta-learning scan over tasks computes only
one task's path per pass (`tasks_symmetric`, docs/methods.md §2).
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtl_jax.models import layers
from mtl_jax.tasks import Task


class ConvHead(nnx.Module):
  """3x3 conv C->C, BatchNorm, exact GELU, 1x1 conv C->K (docs/mlore.md §3.3, init §3.6).

  Torch names: `mt_proj.0` = `conv`, `mt_proj.1` = `bn`, `linear_pred` = `linear_pred`.
  """

  def __init__(self, in_ch: int, num_outputs: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.conv = layers.conv(in_ch, in_ch, 3, kernel_init=layers.trunc_normal(0.02), dtype=dtype,
                            rngs=rngs)
    self.bn = layers.BatchNorm(in_ch)
    self.linear_pred = layers.conv(in_ch, num_outputs, 1,
                                   bias_init=jax.nn.initializers.normal(0.02), dtype=dtype,
                                   rngs=rngs)

  def __call__(self, x: jax.Array, upsample: int = 1) -> jax.Array:
    """x (B, h, w, C) -> logits (B, s h, s w, K) of the map upsampled x s (bilinear) first."""
    if upsample == 1:
      y = self.conv(x)
    else:  # conv(resize(x)) with the conv's channel products at the low resolution
      conv = self.conv
      y = layers.conv_of_upsampled(x.astype(conv.dtype), conv.kernel[...].astype(conv.dtype),
                                   upsample) + conv.bias[...].astype(conv.dtype)
    return self.linear_pred(layers.gelu(self.bn(y)))


def tasks_symmetric(model) -> bool:
  """Whether both the backbone and the decoder of `model` are `task_symmetric` (module
  docstring)."""
  return all(getattr(part, 'task_symmetric', False) for part in (model.backbone, model.decoder))


def head_logits(head: nnx.Module, x: jax.Array, upsample: int, size: tuple[int, int]
                ) -> jax.Array:
  """`head` on the decoder map `x` (upsampled x `upsample` inside the head), float32, resized
  bilinearly to the input `size`."""
  logits = (head(x) if upsample == 1 else head(x, upsample=upsample)).astype(jnp.float32)
  return layers.resize_bilinear(logits, size)


class FuseDecoder(nnx.Module):
  """ViT multi-task baseline decoder: concat taps -> 1x1 conv to C -> x`upsample` bilinear.

  The same map goes to every task, returned before the upsampling (`head_upsample`, the
  heads apply it); aux is empty.
  """

  task_symmetric = True

  def __init__(self, in_channels: Sequence[int], channels: int, tasks: Sequence[str],
               upsample: int = 1, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.tasks = tuple(tasks)
    self.head_upsample = upsample
    self.fuse = layers.conv(sum(in_channels), channels, 1, dtype=dtype, rngs=rngs)

  def __call__(self, features: Sequence[jax.Array]) -> tuple[dict[str, jax.Array], dict]:
    x = self.fuse(jnp.concatenate(features, axis=-1))
    return {task: x for task in self.tasks}, {}


def build_fuse_decoder(config, tasks: Mapping[str, Task], backbone, *, rngs: nnx.Rngs
                       ) -> tuple[FuseDecoder, dict[str, ConvHead]]:
  """FuseDecoder over every stage of `backbone` + one ConvHead per task (config.model.decoder:
  channels C, upsample). The stages must share one grid (the ViT's do)."""
  dtype = jnp.dtype(config.model.dtype)
  channels = config.model.decoder.channels
  decoder = FuseDecoder(backbone.stage_dims, channels, list(tasks),
                        upsample=config.model.decoder.upsample, dtype=dtype, rngs=rngs)
  heads = {name: ConvHead(channels, task.num_outputs, dtype=dtype, rngs=rngs)
           for name, task in tasks.items()}
  return decoder, heads


class MultiTaskModel(nnx.Module):
  """backbone -> decoder -> heads; `__call__(images) -> (preds, aux)`.

  images: (B, H, W, 3) normalised float. preds: {task: (B, H, W, K_task) float32 raw logits at
  the input resolution}, one entry per head. aux: the decoder's extras.
  """

  def __init__(self, backbone: nnx.Module, decoder: nnx.Module, heads: dict[str, nnx.Module]):
    self.backbone = backbone
    self.decoder = decoder
    self.heads = nnx.Dict(heads)

  def __call__(self, images: jax.Array) -> tuple[dict[str, jax.Array], dict]:
    task_features, aux = self.decoder(self.backbone(images))
    upsample = getattr(self.decoder, 'head_upsample', 1)
    return {task: head_logits(head, task_features[task], upsample, images.shape[1:3])
            for task, head in self.heads.items()}, aux
