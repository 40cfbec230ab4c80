"""The Swin / MTLoRA family: official MTLoRA checkpoints and Swin ImageNet weights <-> mtl_jax
(docs/mtlora.md §7, §10).

Torch names follow the mtl_jax paths (`torch_key`: dots, `kernel`/`scale` -> `weight`, BatchNorm
`mean`/`var` -> `running_mean`/`running_var`) except in the decoder (`_MODULE_RENAMES`), so the
tables are read off the config's (abstract) model (`keys.model_entries`). `relative_position_index`
buffers are checked against the config's windows (`_check_index_buffers`, not loaded) and written
back by `to_torch`; `attn_mask` buffers and `num_batches_tracked` are dropped (masks are
recomputed from the geometry).

* `from_torch` / `to_torch`: a full model, the Swin multi-task baseline ('swin') or MTLoRA(+)
  ('mtlora'), `--format=mtlora`.
* `imagenet_from_torch` / `imagenet_to_torch`: Microsoft's Swin ImageNet `model` <-> the Swin
  backbone, `--format=swin_imagenet` (§7): names without `backbone.` and without MTLoRALinear's
  `.linear`; LoRA matrices keep their initialisation (B = 0: the adapted model starts at the
  pretrained backbone; ProMLoRA's prompts too); `attn_mask`, the `head` and the final `norm`
  (kept where the backbone has one: ProMLoRA's) are dropped.
* `config_from_reference`, `reference_arrays`: the parity family (mtl_jax/tools/parity.py).
"""

import re
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mtl_jax import ConfigError
from mtl_jax import tasks as tasks_lib
from mtl_jax.convert import keys
from mtl_jax.models import multitask
from mtl_jax.models import mtlora as mtlora_model
from mtl_jax.models import swin

# Dropped keys of full checkpoints, and of the ImageNet model (no place in the dense model).
IGNORED = re.compile(r'.*\.(num_batches_tracked|attn_mask)')
IMAGENET_IGNORED = re.compile(r'.*attn_mask|norm\.(weight|bias)|head\..*')
_HINT = 'check --format and --config'

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


def imagenet_key(path: Sequence) -> str:
  """ImageNet Swin key of a backbone variable path (relative to the backbone)."""
  return re.sub(r'\.(qkv|proj|fc1|fc2|reduction)\.linear\.', r'.\1.', torch_key(path))


# -- relative_position_index buffers ---------------------------------------------------------------

def _index_buffers(module: nnx.Module, key_of) -> dict[str, np.ndarray]:
  """{key: relative_position_index of the window} of every WindowAttention under `module`."""
  return {key_of((*path, 'relative_position_index')):
          swin.relative_position_index(m.window_size).astype(np.int64)
          for path, m in nnx.iter_graph(module) if isinstance(m, swin.WindowAttention)}


def _check_index_buffers(state_dict: Mapping[str, np.ndarray], module: nnx.Module,
                         key_of) -> list[str]:
  """Keys of the relative_position_index buffers of `state_dict` (absent ones are fine), each
  checked against its window (swin.relative_position_index); one ConfigError names the bad."""
  want = _index_buffers(module, key_of)
  present = [k for k in want if k in state_dict]
  bad = [k for k in present if not np.array_equal(state_dict[k], want[k])]
  if bad:
    raise ConfigError(f'{len(bad)} relative_position_index buffers differ from the config\'s '
                      f'window ({keys.examples(bad)}); check config.model.backbone.window_size')
  return present


# -- full models: Swin multi-task, MTLoRA(+) -------------------------------------------------------

def from_torch(state_dict: Mapping[str, np.ndarray], config) -> dict[str, dict]:
  """Official MTLoRA / Swin multi-task state dict -> {'params', 'batch_stats'} pure dicts.

  Every parameter and BatchNorm statistic of the model built from `config` must be present with
  its shape (one ConfigError lists every missing, unexpected and mismatched key); the DDP
  `module.` prefix is accepted.
  """
  sd = {k: v for k, v in keys.strip_prefix(state_dict).items() if not IGNORED.fullmatch(k)}
  model = keys.abstract_model(config)
  index = _check_index_buffers(sd, model, torch_key)
  sd = {k: v for k, v in sd.items() if k not in index}
  return keys.from_torch(sd, keys.model_entries(model, torch_key),
                         'MTLoRA / Swin state dict -> config model', _HINT)


def to_torch(weights: Mapping[str, Mapping], config) -> dict[str, np.ndarray]:
  """Inverse of `from_torch`: the official state dict (with the relative_position_index
  buffers; without `attn_mask` and `num_batches_tracked`)."""
  model = keys.abstract_model(config)
  out = keys.to_torch(weights, keys.model_entries(model, torch_key))
  return {**out, **_index_buffers(model, torch_key)}


def _convert(state_dict, config):
  """--format=mtlora: a full checkpoint's `model` -> (params, batch_stats, info)."""
  weights = from_torch(state_dict, config)
  return weights['params'], weights['batch_stats'], {
      'dropped': sum(bool(IGNORED.fullmatch(k)) for k in keys.strip_prefix(state_dict))}


# -- Swin ImageNet -> the backbone -----------------------------------------------------------------

def _is_adapter(path: tuple) -> bool:
  """LoRA matrices and ProMLoRA prompts: not in an ImageNet checkpoint."""
  return any(str(p).startswith('lora_') or 'prompt' in str(p) for p in path)


def _imagenet_backbone(config) -> nnx.Module:
  if config.model.name not in ('swin', 'mtlora', 'promlora'):
    raise ConfigError(f'--format=swin_imagenet needs config.model.name swin, mtlora or '
                      f'promlora, not {config.model.name!r}')
  return keys.abstract_model(config).backbone


def _imagenet_ignored(backbone: nnx.Module, key: str) -> bool:
  """Dropped ImageNet keys; the final `norm` is kept where the backbone has one (ProMLoRA's,
  loaded as the fork's `--resume-backbone` does)."""
  if hasattr(backbone, 'norm') and re.fullmatch(r'norm\.(weight|bias)', key):
    return False
  return bool(IMAGENET_IGNORED.fullmatch(key))


def _imagenet_from_torch(state_dict, config) -> tuple[dict, dict]:
  backbone = _imagenet_backbone(config)
  sd = keys.strip_prefix(state_dict)
  kept = {k: v for k, v in sd.items() if not _imagenet_ignored(backbone, k)}
  index = _check_index_buffers(kept, backbone, imagenet_key)
  kept = {k: v for k, v in kept.items() if k not in index}
  table = keys.model_entries(backbone, imagenet_key, skip=_is_adapter, prefix=('backbone',))
  weights = keys.from_torch(kept, table, 'Swin ImageNet -> config backbone', _HINT)
  adapters = sum(_is_adapter(tuple(p))
                 for p, _ in nnx.to_flat_state(nnx.state(backbone, nnx.Param)))
  return weights, {'dropped': len(sd) - len(kept) - len(index), 'index_checked': len(index),
                   'lora_kept_at_init': adapters}


def imagenet_from_torch(state_dict: Mapping[str, np.ndarray], config) -> dict[str, dict]:
  """Swin ImageNet `model` -> {'params': {'backbone': ...}, 'batch_stats': {}} (no LoRA)."""
  return _imagenet_from_torch(state_dict, config)[0]


def imagenet_to_torch(weights: Mapping[str, Mapping], config) -> dict[str, np.ndarray]:
  """The non-LoRA backbone of `weights` -> Swin ImageNet names (with relative_position_index,
  without attn_mask / norm / head)."""
  backbone = _imagenet_backbone(config)
  table = keys.model_entries(backbone, imagenet_key, skip=_is_adapter, prefix=('backbone',))
  return {**keys.to_torch(weights, table), **_index_buffers(backbone, imagenet_key)}


def _convert_imagenet(state_dict, config):
  weights, info = _imagenet_from_torch(state_dict, config)
  return weights['params'], weights['batch_stats'], info


FORMATS = {'swin_imagenet': _convert_imagenet, 'mtlora': _convert}


# -- parity (mtl_jax/tools/parity.py, fixtures of §10) ---------------------------------------------

_SIDECAR_LAYER_FLAGS = (('qkv', 'QKV_ENABLED'), ('proj', 'PROJ_ENABLED'), ('fc1', 'FC1_ENABLED'),
                        ('fc2', 'FC2_ENABLED'), ('reduction', 'DOWNSAMPLER_ENABLED'))


def config_from_reference(config, sidecar: Mapping) -> ml_collections.ConfigDict:
  """The mtl_jax config of a fixture sidecar (docs/mtlora.md §10): plain Swin or MTLoRA(+)."""
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
    for key in ('INTERMEDIATE_SPECIALIZATION', 'TRAINABLE_SCALE_SHARED',
                'TRAINABLE_SCALE_PER_TASK'):
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
  config.frozen = mtlora_model.frozen_patterns('mtlora' if enabled else 'full',
                                               lora_reduction=lora_reduction)
  try:
    registry = tasks_lib.get_tasks(tasks, config.dataset.name, config.convention)
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

  tasks = model.decoder.tasks if config.model.name in ('mtlora', 'promlora') else ()
  for i, shared in enumerate(features.maps):
    arrays[f'feat/shared/stage{i}'] = tokens(shared)
  # A stage without task streams hands every task the shared map (as the reference's backbone).
  for t in tasks:
    arrays.update({f'feat/{t}/stage{i}': tokens(m) for i, m in enumerate(features.for_task(t))})
  return arrays
