"""MTLoRA and the Swin multi-task baselines (specs/mtlora.md; MTLoRA repo: models/swin_mtl.py).

Model = Swin backbone (swin.py) -> per task: its 4 multi-scale maps (the task streams of MTLoRA,
else the shared maps) -> 1x1 conv per scale without bias ("downsampler") -> bilinear to the
scale-0 size, concat -> HRNet head (1x1 conv C -> 4C, BatchNorm, ReLU, 1x1 conv 4C -> K) ->
bilinear to the input size (`MultiTaskModel`).

* `build(config, tasks, rngs=...)`: `config.model.name` 'swin' (plain Swin, every Linear a Linear)
  or 'mtlora' (`MTLoRAPlacement`: MTLoRALinear per specs/mtlora.md §2.1).
* `frozen_patterns(recipe, ...)`: the trainable-set recipes as `config.frozen` regexes (§5).
* `config_from_reference`, `params_from_torch`, `reference_arrays`: the parity family functions
  (mtl_jax/tools/parity.py) for the MTLoRA fixtures (§10) and official state dicts (§7).

Config keys read (besides input.crop_size and model.dtype):
  model.backbone.variant: a key of swin.VARIANTS ('T', 'S', 'B', 'tiny'); if empty,
    model.backbone.{patch_size, embed_dim, depths, num_heads, window_size} give the Swin.
  model.backbone.{mlp_ratio, drop_path_rate}: 4.0, 0.2 (Swin-T) / 0.3 (Swin-B).
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
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mtl_jax import ConfigError
from mtl_jax import tasks as tasks_lib
from mtl_jax.models import layers
from mtl_jax.models import lora
from mtl_jax.models import multitask
from mtl_jax.models import swin
from mtl_jax.tasks import Task

LORA_LAYERS = ('qkv', 'proj', 'fc1', 'fc2', 'reduction')
_TS_LAYERS = ('proj', 'fc1', 'fc2')  # TS-LoRA: these Linears of the last block of each stage


# -- MTLoRA placement (specs/mtlora.md §2.1) -------------------------------------------------------

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
      shared_scales=_per_stage(cfg, 'shared_scale', n), task_scales=_per_stage(cfg, 'task_scale', n),
      dropouts=_per_stage(cfg, 'dropout', n), layers=tuple(cfg.layers),
      tasks=tuple(tasks) if with_tasks else ())


# -- decoder (specs/mtlora.md §3) ------------------------------------------------------------------

class HRNetDecoder(nnx.Module):
  """Per task: its maps (task stream, else shared) -> 1x1 conv per scale -> resize to scale 0,
  concat. Torch names: `downsampler.<task>.downsample_<i>` = `downsampler/<task>/<i>`."""

  def __init__(self, dims: Sequence[int], channels: Sequence[int], tasks: Sequence[str], *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if channels and len(channels) != len(dims):
      raise ConfigError(f'config.model.decoder.channels={tuple(channels)} needs one entry per '
                        f'backbone stage ({len(dims)}), or none')
    self.tasks = tuple(tasks)
    self.downsampler = nnx.Dict({t: nnx.List([
        nnx.Conv(d, c, (1, 1), use_bias=False, kernel_init=layers.torch_kernel_init(),
                 dtype=dtype, rngs=rngs) for d, c in zip(dims, channels)]) for t in tasks}
                               ) if channels else None

  def __call__(self, features: Sequence[swin.Streams]) -> tuple[dict[str, jax.Array], dict]:
    out = {}
    for task in self.tasks:
      maps = [streams.get(task, shared) for shared, streams in features]
      if self.downsampler is not None:
        maps = [conv(m) for conv, m in zip(self.downsampler[task], maps)]
      size = maps[0].shape[1:3]
      out[task] = jnp.concatenate([layers.resize_bilinear(m, size) for m in maps], axis=-1)
    return out, {}


class HRNetHead(nnx.Module):
  """1x1 conv C -> 4C, BatchNorm, ReLU, 1x1 conv 4C -> K (torch `last_layer.{0,1,3}`)."""

  def __init__(self, in_ch: int, num_outputs: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.conv1 = layers.conv(in_ch, 4 * in_ch, 1, dtype=dtype, rngs=rngs)
    self.bn = layers.BatchNorm(4 * in_ch)
    self.conv2 = layers.conv(4 * in_ch, num_outputs, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv2(jax.nn.relu(self.bn(self.conv1(x))))


# -- model -----------------------------------------------------------------------------------------

def backbone_arch(cfg) -> dict:
  """swin.SwinTransformer kwargs of config.model.backbone (a variant or explicit sizes)."""
  if cfg.variant:
    if cfg.variant not in swin.VARIANTS:
      raise ConfigError(f'unknown config.model.backbone.variant {cfg.variant!r}; known: '
                        f'{", ".join(swin.VARIANTS)} (or leave it empty and set patch_size, '
                        'embed_dim, depths, num_heads, window_size)')
    arch = dict(swin.VARIANTS[cfg.variant])
  else:
    arch = {k: cfg[k] for k in ('patch_size', 'embed_dim', 'depths', 'num_heads', 'window_size')}
  arch.update(depths=tuple(arch['depths']), num_heads=tuple(arch['num_heads']),
              mlp_ratio=cfg.mlp_ratio, drop_path_rate=cfg.drop_path_rate)
  return arch


def build(config, tasks: Mapping[str, Task], *, rngs: nnx.Rngs) -> multitask.MultiTaskModel:
  """The 'swin' or 'mtlora' model of `config` for `tasks` (see the module docstring)."""
  dtype = jnp.dtype(config.model.dtype)
  arch = backbone_arch(config.model.backbone)
  make_linear = swin.plain_linear
  if config.model.name == 'mtlora':
    make_linear = placement(config, list(tasks), arch['depths'])
  backbone = swin.SwinTransformer(tuple(config.input.crop_size), **arch,
                                  make_linear=make_linear, dtype=dtype, rngs=rngs)
  channels = tuple(config.model.decoder.channels)
  decoder = HRNetDecoder(backbone.dims, channels, list(tasks), dtype=dtype, rngs=rngs)
  width = sum(channels or backbone.dims)
  heads = {name: HRNetHead(width, task.num_outputs, dtype=dtype, rngs=rngs)
           for name, task in tasks.items()}
  return multitask.MultiTaskModel(backbone, decoder, heads)


# -- trainable sets (specs/mtlora.md §5, specs/user_fork.md §4) ------------------------------------

RECIPES = ('mtlora', 'full', 'freeze_backbone', 'freeze_ta_lora', 'freeze_ts_lora')


def frozen_patterns(recipe: str, *, lora_reduction: bool = False) -> tuple[str, ...]:
  """`config.frozen` regexes (over 'backbone/layers/0/...' paths) of a named recipe.

  'mtlora': in the backbone only LoRA, patch_embed, every LayerNorm, the relative position bias
    tables and (unless `lora_reduction`, i.e. MTLoRA+) the PatchMerging reductions train; the
    decoder always trains (FREEZE_PRETRAINED, MTLORA.BIAS 'none').
  'freeze_ts_lora' / 'freeze_ta_lora': 'mtlora' with the TS-LoRA / TA-LoRA also frozen (stage 1
    / stage 2 of the user's two-stage training).
  'full': nothing frozen. 'freeze_backbone': the whole backbone frozen (decoder only).
  """
  if recipe not in RECIPES:
    raise ConfigError(f'unknown trainable-set recipe {recipe!r}; known: {", ".join(RECIPES)}')
  if recipe == 'full':
    return ()
  if recipe == 'freeze_backbone':
    return (r'^backbone/',)
  keep = ['lora_', 'patch_embed', 'norm', 'relative_position_bias_table']
  if not lora_reduction:
    keep.append('downsample/reduction')
  frozen = [rf'^backbone/(?!.*({"|".join(keep)}))']
  if recipe == 'freeze_ts_lora':
    frozen.append(r'^backbone/.*/lora_tasks_')
  if recipe == 'freeze_ta_lora':
    frozen.append(r'^backbone/.*/lora_shared_')
  return tuple(frozen)


# -- parity with the official code (mtl_jax/tools/parity.py) ---------------------------------------

_MODULE_RENAMES = (  # mtl_jax module path (dots) -> torch module name
    (r'^decoder\.downsampler\.(\w+)\.(\d+)$', r'downsampler.\1.downsample_\2'),
    (r'^heads\.(\w+)\.conv1$', r'decoders.decoders.\1.last_layer.0'),
    (r'^heads\.(\w+)\.bn$', r'decoders.decoders.\1.last_layer.1'),
    (r'^heads\.(\w+)\.conv2$', r'decoders.decoders.\1.last_layer.3'),
)
_LEAF_RENAMES = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean',
                 'var': 'running_var'}


def torch_key(path: Sequence) -> str:
  """Official state-dict key of an mtl_jax variable path, e.g.
  ('backbone', 'layers', 0, 'blocks', 1, 'attn', 'qkv', 'linear', 'kernel') ->
  'backbone.layers.0.blocks.1.attn.qkv.linear.weight'."""
  *modules, leaf = [str(p) for p in path]
  name = '.'.join(modules)
  for pattern, replacement in _MODULE_RENAMES:
    name = re.sub(pattern, replacement, name)
  return f'{name}.{_LEAF_RENAMES.get(leaf, leaf)}'


def _from_torch_layout(path: Sequence, value: np.ndarray) -> np.ndarray:
  """Conv OIHW -> HWIO; Linear weights and LoRA A (r, in) / B (out, r) transposed."""
  if value.ndim == 4:
    return layers.conv_kernel_from_torch(value)
  if value.ndim == 2 and str(path[-1]) != 'relative_position_bias_table':
    return value.T
  return value


def _dataset_kind(config) -> str:
  return config.dataset.name.split('/')[0].split(':')[0]


def params_from_torch(state_dict: Mapping[str, np.ndarray], config) -> dict:
  """Official MTLoRA / Swin multi-task state dict -> {'params', 'batch_stats'} pure dicts.

  Every parameter and BatchNorm statistic of the model built from `config` must be present with
  the matching shape. `relative_position_index` buffers are checked against
  swin.relative_position_index (not loaded); `attn_mask` buffers and `num_batches_tracked` are
  ignored (masks are recomputed). Raises one ConfigError listing every missing, unexpected or
  mismatched key.
  """
  tasks = tasks_lib.get_tasks(config.tasks, _dataset_kind(config), config.convention)
  model = nnx.eval_shape(lambda: build(config, tasks, rngs=nnx.Rngs(0)))
  used, missing, mismatched = set(), [], []
  out = {'params': {}, 'batch_stats': {}}
  for collection, kind in (('params', nnx.Param), ('batch_stats', nnx.BatchStat)):
    for path, variable in nnx.to_flat_state(nnx.state(model, kind)):
      key = torch_key(path)
      if key not in state_dict:
        missing.append(key)
        continue
      used.add(key)
      value = _from_torch_layout(path, np.asarray(state_dict[key], np.float32))
      if value.shape != variable.shape:
        mismatched.append(f'{key} {tuple(np.shape(state_dict[key]))} (model: {variable.shape} '
                          'in mtl_jax layout)')
        continue
      node = out[collection]
      for p in path[:-1]:
        node = node.setdefault(p, {})
      node[path[-1]] = value
  for path, module in nnx.iter_graph(model):
    if isinstance(module, swin.WindowAttention):
      key = torch_key((*path, 'relative_position_index'))
      if key in state_dict:
        used.add(key)
        if not np.array_equal(state_dict[key], swin.relative_position_index(module.window_size)):
          mismatched.append(f'{key} differs from the index of window {module.window_size}')
  unexpected = sorted(k for k in state_dict if k not in used
                      and not k.endswith(('.num_batches_tracked', '.attn_mask')))
  if missing or unexpected or mismatched:
    raise ConfigError('state dict does not match the configured model: ' + '; '.join(
        f'{len(keys)} {what}: {", ".join(keys)}' for what, keys in (
            ('missing', missing), ('unexpected', unexpected), ('mismatched', mismatched))
        if keys))
  return out


_SIDECAR_LAYER_FLAGS = (('qkv', 'QKV_ENABLED'), ('proj', 'PROJ_ENABLED'), ('fc1', 'FC1_ENABLED'),
                        ('fc2', 'FC2_ENABLED'), ('reduction', 'DOWNSAMPLER_ENABLED'))


def config_from_reference(config, sidecar: Mapping) -> ml_collections.ConfigDict:
  """The mtl_jax config of a fixture sidecar (specs/mtlora.md §10): plain Swin or MTLoRA(+)."""
  errors = []
  sw, dec, ml = sidecar['swin'], sidecar['decoder'], sidecar['mtlora']
  for key, want in (('QKV_BIAS', True), ('APE', False), ('PATCH_NORM', True)):
    if sw.get(key, want) != want:
      errors.append(f'swin.{key}={sw[key]} (only {want} is implemented)')
  heads = {t: h for t, h in dec['DECODER_HEAD'].items() if h != 'hrnet'}
  if heads:
    errors.append(f'decoder heads {heads} (only hrnet is implemented)')
  if not dec.get('PER_TASK_DOWNSAMPLER', True):
    errors.append('PER_TASK_DOWNSAMPLER=False (only per-task downsamplers are implemented)')
  tasks = list(sidecar['tasks'])
  num_outputs = sidecar['num_outputs']
  nyud = 'depth' in tasks or num_outputs.get('semseg') == 40
  config.tasks = ','.join(tasks)
  config.convention = 'mtlora'
  config.dataset.name = 'nyud_v2' if nyud else 'pascal_context'
  config.input.crop_size = tuple(sidecar['input_shape'][2:])
  config.model.dtype = 'float32'
  config.model.backbone = ml_collections.ConfigDict(dict(
      variant='', patch_size=sw['PATCH_SIZE'], embed_dim=sw['EMBED_DIM'],
      depths=tuple(sw['DEPTHS']), num_heads=tuple(sw['NUM_HEADS']),
      window_size=sw['WINDOW_SIZE'], mlp_ratio=float(sw['MLP_RATIO']), drop_path_rate=0.0))
  config.model.decoder = ml_collections.ConfigDict(dict(
      channels=tuple(dec['DECODER_CHANNELS']) if dec.get('DECODER_DOWNSAMPLER', True) else ()))
  enabled = bool(ml['ENABLED'])
  if enabled != (sidecar.get('kind', 'mtlora') != 'swin'):
    errors.append(f'kind {sidecar.get("kind")!r} but mtlora.ENABLED={ml["ENABLED"]}')
  config.model.name = 'mtlora' if enabled else 'swin'
  lora_reduction = False
  if enabled:
    for key in ('INTERMEDIATE_SPECIALIZATION', 'TRAINABLE_SCALE_SHARED', 'TRAINABLE_SCALE_PER_TASK'):
      if ml.get(key):
        errors.append(f'mtlora.{key}=True (not implemented)')
    if ml['SHARED_MODE'] not in ('matrix', 'lora_only'):
      errors.append(f'mtlora.SHARED_MODE={ml["SHARED_MODE"]!r} (only matrix and lora_only are '
                    'implemented)')

    def uniform(per_stage, what):  # the task value of each stage (equal over tasks)
      values = []
      for stage in per_stage:
        task_values = {stage[t] for t in tasks if t in stage}
        if len(task_values) > 1:
          errors.append(f'mtlora.{what} differs between tasks ({stage}); only one per stage '
                        'is implemented')
        values.append(task_values.pop() if task_values else 0)
      return tuple(values)

    ranks = ml['R_PER_TASK_LIST']
    lora_reduction = bool(ml['DOWNSAMPLER_ENABLED'])
    config.model.mtlora = ml_collections.ConfigDict(dict(
        rank=tuple(int(s['shared']) for s in ranks),
        task_rank=uniform(ranks, 'R_PER_TASK_LIST'),
        shared_scale=tuple(float(s) for s in ml['SHARED_SCALE']),
        task_scale=uniform(ml['SCALE_PER_TASK_LIST'], 'SCALE_PER_TASK_LIST'),
        dropout=tuple(float(d) for d in ml['DROPOUT']),
        shared_mode=ml['SHARED_MODE'],
        layers=tuple(name for name, key in _SIDECAR_LAYER_FLAGS if ml.get(key))))
  config.frozen = frozen_patterns('mtlora' if enabled else 'full', lora_reduction=lora_reduction)
  try:
    registry = tasks_lib.get_tasks(tasks, _dataset_kind(config), config.convention)
  except ConfigError as e:
    errors.append(str(e))
  else:
    for t, task in registry.items():
      if task.num_outputs != num_outputs.get(t, task.num_outputs):
        errors.append(f'{t} has {num_outputs[t]} outputs in the fixture, {task.num_outputs} here')
  if errors:
    raise ConfigError('fixture config not supported: ' + '; '.join(errors))
  return config


@nnx.jit
def _forward(model, images):
  return model.backbone(images), model(images)[0]


def reference_arrays(model: multitask.MultiTaskModel, images_nchw: np.ndarray, config
                     ) -> dict[str, np.ndarray]:
  """`out/<task>` (B, K, H, W), `feat/shared/stage<i>` and (MTLoRA) `feat/<task>/stage<i>`
  (B, h*w, C)."""
  features, preds = _forward(model, jnp.asarray(np.transpose(images_nchw, (0, 2, 3, 1))))
  arrays = {f'out/{t}': np.transpose(np.asarray(p), (0, 3, 1, 2)) for t, p in preds.items()}

  def tokens(x):
    x = np.asarray(x)
    return x.reshape(x.shape[0], -1, x.shape[-1])

  tasks = model.decoder.tasks if config.model.name == 'mtlora' else ()
  for i, (shared, streams) in enumerate(features):
    arrays[f'feat/shared/stage{i}'] = tokens(shared)
    # A stage without task streams hands every task the shared map (as the reference's backbone).
    arrays.update({f'feat/{t}/stage{i}': tokens(streams.get(t, shared)) for t in tasks})
  return arrays
