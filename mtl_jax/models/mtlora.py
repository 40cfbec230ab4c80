"""MTLoRA and the Swin multi-task baselines (docs/mtlora.md; MTLoRA repo: models/swin_mtl.py).

Model = Swin backbone (swin.py) -> per task: its 4 multi-scale maps (the task streams of MTLoRA,
else the shared maps) -> 1x1 conv per scale without bias ("downsampler") -> bilinear to the
scale-0 size, concat -> HRNet head (1x1 conv C -> 4C, BatchNorm, ReLU, 1x1 conv 4C -> K) ->
bilinear to the input size (`MultiTaskModel`). The resize and concat happen inside the head's
first conv (`HRNetHead`, docs/stack.md §14).

* `build_backbone` (MTLoRA: `MTLoRAPlacement`, MTLoRALinear per docs/mtlora.md §2.1; the plain
  'swin' model uses swin.build) and `build_decoder` (HRNetDecoder + heads on any backbone);
  models/__init__.py assembles them.
* `frozen_patterns(recipe, ...)`: the trainable-set recipes as `config.frozen` regexes (§5).
* Official checkpoints, Swin ImageNet weights and parity fixtures: mtl_jax/convert/mtlora.py
  (docs/mtlora.md §7, §10).

Config keys read (besides input.crop_size and model.dtype):
  model.backbone: as swin.build reads it (variant or explicit sizes, mlp_ratio, drop_path_rate:
    4.0, 0.2 (Swin-T) / 0.3 (Swin-B)).
  model.decoder.channels: DECODER_CHANNELS per scale, (18, 36, 72, 144); () = no downsampler
    convs (DECODER_DOWNSAMPLER False: the head sees the backbone dims).
  model.mtlora (only for 'mtlora'), per stage (1 value = every stage):
    rank: TA-LoRA rank (R / R_PER_TASK.shared), task_rank: TS-LoRA rank of every task,
    shared_scale / task_scale: SHARED_SCALE / SCALE_PER_TASK multipliers, dropout: LoRA dropout;
    shared_mode: 'matrix' (MTLoRA) or 'lora_only' (TA-LoRA only, every task gets the shared maps);
    layers: which Linears get LoRA, of 'qkv', 'proj', 'fc1', 'fc2', 'reduction' (PatchMerging,
      TA only: MTLoRA+).
"""

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtl_jax import ConfigError
from mtl_jax.models import backbone as backbone_lib
from mtl_jax.models import layers
from mtl_jax.models import lora
from mtl_jax.models import swin
from mtl_jax.tasks import Task

LORA_LAYERS = ('qkv', 'proj', 'fc1', 'fc2', 'reduction')
_TS_LAYERS = ('proj', 'fc1', 'fc2')  # TS-LoRA: these Linears of the last block of each stage


# -- MTLoRA placement (docs/mtlora.md §2.1) -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MTLoRAPlacement:
  """The `make_linear` of swin.SwinTransformer for MTLoRA: which Linear gets which LoRA.

  Linears named in `layers` become MTLoRALinear with the stage's TA rank, scale and dropout;
  proj / fc1 / fc2 of the last block of each stage also get a TS-LoRA per task in `tasks`
  (empty for SHARED_MODE 'lora_only'). qkv and PatchMerging's reduction never get TS-LoRA.
  Every per-stage tuple has one entry per stage. With some of proj / fc1 / fc2 left out, the
  streams follow the reference: no fc2 -> no task streams (every task gets the shared maps); no
  fc1 -> fc2's TS-LoRA sees the shared hidden state; no proj -> fc1's TS-LoRA sees the shared
  input and the task streams lack the attention residual (swin.SwinBlock).
  """
  depths: tuple[int, ...]
  ranks: tuple[int, ...]
  task_ranks: tuple[int, ...]
  shared_scales: tuple[float, ...]
  task_scales: tuple[float, ...]
  dropouts: tuple[float, ...]
  layers: tuple[str, ...]
  tasks: tuple[str, ...]

  def __call__(self, name: str, in_features: int, out_features: int, *, stage: int,
               block: int | None, use_bias: bool = True, dtype=jnp.float32,
               rngs: nnx.Rngs) -> nnx.Module:
    if name not in self.layers:
      return swin.plain_linear(name, in_features, out_features, stage=stage, block=block,
                               use_bias=use_bias, dtype=dtype, rngs=rngs)
    specialised = name in _TS_LAYERS and block == self.depths[stage] - 1
    tasks = self.tasks if specialised else ()
    return lora.MTLoRALinear(
        in_features, out_features, rank=self.ranks[stage],
        task_ranks={t: self.task_ranks[stage] for t in tasks},
        shared_scale=self.shared_scales[stage],
        task_scales={t: self.task_scales[stage] for t in tasks},
        dropout=self.dropouts[stage], use_bias=use_bias, dtype=dtype, rngs=rngs)


def _per_stage(cfg, key: str, n: int, kind=float) -> tuple:
  values = cfg[key]
  values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
  if len(values) == 1:
    values *= n
  if len(values) != n:
    raise ConfigError(f'config.model.mtlora.{key}={values} needs 1 or {n} (one per stage) values')
  return tuple(kind(v) for v in values)


def placement(config, tasks: Sequence[str], depths: Sequence[int]) -> MTLoRAPlacement:
  """The MTLoRAPlacement of config.model.mtlora for `tasks`; ConfigError names bad values."""
  cfg, n = config.model.mtlora, len(depths)
  unknown = set(cfg.layers) - set(LORA_LAYERS)
  if unknown:
    raise ConfigError(f'config.model.mtlora.layers has unknown {sorted(unknown)}; known: '
                      f'{", ".join(LORA_LAYERS)}')
  if cfg.shared_mode not in ('matrix', 'lora_only'):
    raise ConfigError(f'config.model.mtlora.shared_mode={cfg.shared_mode!r} is not supported; '
                      "use 'matrix' (MTLoRA) or 'lora_only' (TA-LoRA only)")
  with_tasks = cfg.shared_mode == 'matrix'
  return MTLoRAPlacement(
      depths=tuple(depths), ranks=_per_stage(cfg, 'rank', n, int),
      task_ranks=_per_stage(cfg, 'task_rank', n, int),
      shared_scales=_per_stage(cfg, 'shared_scale', n),
      task_scales=_per_stage(cfg, 'task_scale', n),
      dropouts=_per_stage(cfg, 'dropout', n), layers=tuple(cfg.layers),
      tasks=tuple(tasks) if with_tasks else ())


# -- decoder (docs/mtlora.md §3) ------------------------------------------------------------------

class HRNetDecoder(nnx.Module):
  """Per task: its maps (task stream, else shared) -> 1x1 conv per scale. Returns each task's
  per-scale maps, not yet resized to scale 0 and concatenated: HRNetHead does that inside its
  first conv (docs/stack.md §14). Torch names: `downsampler.<task>.downsample_<i>` =
  `downsampler/<task>/<i>`."""

  task_symmetric = True  # models/multitask.py

  def __init__(self, dims: Sequence[int], channels: Sequence[int], tasks: Sequence[str], *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if channels and len(channels) != len(dims):
      raise ConfigError(f'config.model.decoder.channels={tuple(channels)} needs one entry per '
                        f'backbone stage ({len(dims)}), or none')
    self.tasks = tuple(tasks)
    self.downsampler = nnx.Dict({t: nnx.List([
        layers.conv(d, c, 1, use_bias=False, dtype=dtype, rngs=rngs)
        for d, c in zip(dims, channels)]) for t in tasks}
                               ) if channels else None

  def __call__(self, features: backbone_lib.Features) -> tuple[dict[str, jax.Array], dict]:
    out = {}
    for task in self.tasks:
      maps = features.for_task(task)
      if self.downsampler is not None:
        maps = [conv(m) for conv, m in zip(self.downsampler[task], maps)]
      out[task] = tuple(maps)
    return out, {}


class HRNetHead(nnx.Module):
  """1x1 conv C -> 4C, BatchNorm, ReLU, 1x1 conv 4C -> K (torch `last_layer.{0,1,3}`) on the
  concatenation of the per-scale maps resized to the first one's size.

  Called on HRNetDecoder's maps, the first conv multiplies each map by its rows of the kernel at
  the map's own resolution and resizes the products: resizing and a 1x1 conv commute, so this is
  the conv of the concatenation with s² fewer products for a map upsampled x s (docs/stack.md
  §14). Called on one (concatenated) map, it is the plain head.
  """

  def __init__(self, in_ch: int, num_outputs: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.conv1 = layers.conv(in_ch, 4 * in_ch, 1, dtype=dtype, rngs=rngs)
    self.bn = layers.BatchNorm(4 * in_ch)
    self.conv2 = layers.conv(4 * in_ch, num_outputs, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array | Sequence[jax.Array]) -> jax.Array:
    return self.conv2(jax.nn.relu(self.bn(self.first_conv(x))))

  def first_conv(self, x: jax.Array | Sequence[jax.Array]) -> jax.Array:
    """conv1(concat([resize_bilinear(m, size of x[0]) for m in x])), or conv1(x) for one map."""
    if not isinstance(x, (tuple, list)):
      return self.conv1(x)
    dtype = self.conv1.dtype
    kernel = self.conv1.kernel[...][0, 0].astype(dtype)  # (sum of channels, 4C)
    size, out, start = x[0].shape[1:3], None, 0
    for m in x:
      part = layers.matmul(m.astype(dtype), kernel[start:start + m.shape[-1]])
      part = layers.resize_bilinear(part, size)
      out, start = part if out is None else out + part, start + m.shape[-1]
    if start != kernel.shape[0]:
      raise ValueError(f'maps with {start} channels for a head of {kernel.shape[0]}')
    return out + self.conv1.bias[...].astype(dtype)


# -- model -----------------------------------------------------------------------------------------

def build_backbone(config, tasks: Mapping[str, Task], *, rngs: nnx.Rngs) -> swin.SwinTransformer:
  """The MTLoRA backbone: the configured Swin with `placement`'s LoRA Linears."""
  depths = swin.arch(config.model.backbone)['depths']
  return swin.build(config, tasks, make_linear=placement(config, list(tasks), depths), rngs=rngs)


def build_decoder(config, tasks: Mapping[str, Task], backbone, *, rngs: nnx.Rngs
                  ) -> tuple[HRNetDecoder, dict[str, HRNetHead]]:
  """HRNetDecoder + one HRNetHead per task on `backbone`'s stages (models/backbone.py)."""
  dtype = jnp.dtype(config.model.dtype)
  channels = tuple(config.model.decoder.channels)
  decoder = HRNetDecoder(backbone.stage_dims, channels, list(tasks), dtype=dtype, rngs=rngs)
  width = sum(channels or backbone.stage_dims)
  heads = {name: HRNetHead(width, task.num_outputs, dtype=dtype, rngs=rngs)
           for name, task in tasks.items()}
  return decoder, heads


# -- trainable sets (docs/mtlora.md §5, docs/user_fork.md §4) ------------------------------------

RECIPES = ('mtlora', 'full', 'freeze_backbone', 'freeze_ta_lora', 'freeze_ts_lora', 'lora_only')


def frozen_patterns(recipe: str, *, lora_reduction: bool = False) -> tuple[str, ...]:
  """`config.frozen` regexes (over 'backbone/layers/0/...' paths) of a named recipe.

  'mtlora': in the backbone only LoRA, patch_embed, every LayerNorm, the relative position bias
    tables and (unless `lora_reduction`, i.e. MTLoRA+) the PatchMerging reductions train; the
    decoder always trains (FREEZE_PRETRAINED, MTLORA.BIAS 'none').
  'freeze_ts_lora' / 'freeze_ta_lora': 'mtlora' with the TS-LoRA / TA-LoRA also frozen (stage 1
    / stage 2 of the user's two-stage training).
  'full': nothing frozen. 'freeze_backbone': the whole backbone frozen (decoder only).
  'lora_only': only the LoRA factors train (TA and TS); decoders, norms, patch embedding, position
    tables and reductions are frozen: the fork's MAML family (docs/user_fork.md §3).
  """
  if recipe not in RECIPES:
    raise ConfigError(f'unknown trainable-set recipe {recipe!r}; known: {", ".join(RECIPES)}')
  if recipe == 'full':
    return ()
  if recipe == 'freeze_backbone':
    return (r'^backbone/',)
  if recipe == 'lora_only':
    return (r'^(?!.*/lora_(shared|tasks)_)',)
  keep = ['lora_', 'patch_embed', 'norm', 'relative_position_bias_table']
  if not lora_reduction:
    keep.append('downsample/reduction')
  frozen = [rf'^backbone/(?!.*({"|".join(keep)}))']
  if recipe == 'freeze_ts_lora':
    frozen.append(r'^backbone/.*/lora_tasks_')
  if recipe == 'freeze_ta_lora':
    frozen.append(r'^backbone/.*/lora_shared_')
  return tuple(frozen)
