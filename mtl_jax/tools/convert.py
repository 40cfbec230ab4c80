r"""Converts reference / ImageNet checkpoints into mtl_jax weights checkpoints (`config.init_from`).

  python -m mtl_jax.tools.convert --format=FORMAT --input=FILE --config=configs/X.py[:args] \
      --output=DIR [--key=model]

Formats (the model is built from `--config`, and every converted array is checked against it):

* `timm_vit`: an ImageNet ViT, as Google's AugReg `.npz` or a timm state dict (`.pth`,
  `.safetensors`) -> only the ViT backbone (`backbone/...` of mtl_jax/models/vit.py): AugReg names
  mapped like timm's `_load_weights` (q/k/v kernels fused into qkv), the pos-embed grid resized to
  the config's grid with torch's bicubic (a = -0.75, align_corners=False, clamped borders; slot 0
  copied), class token / head / pre_logits dropped (specs/mlore.md §2). The decoder keeps its
  initialisation when `launch.py --config.init_from=DIR` loads it.
* `mlore`: an official MLoRE checkpoint `.pth` (`checkpoint['model']`): `module.` prefixes
  stripped, `num_batches_tracked` and the ViT-B variant's unused keys dropped (specs/mlore.md §3.5,
  §8) -> all weights, for `launch.py --mode=eval --config.init_from=DIR`.
* `swin_imagenet`: Microsoft's Swin ImageNet `.pth` -> the Swin backbone of the swin / MTLoRA
  configs (specs/mtlora.md §7).
* `mtlora`: a full MTLoRA checkpoint `ckpt_epoch_N.pth` (`model` key; its pickled yacs config is
  read inertly and skipped) -> all weights.

`.pth` files are read by `mtl_jax.tools.torch_pickle` (no torch, no pickled code runs). The
nested checkpoint dict is reduced to one state dict: `--key` (dotted path), else `model` or
`state_dict` when present, else the whole file. The output directory is written under a temporary
name and renamed when complete; its metadata records the source path and sha256, the format and
the key counts. Bad input prints one `error:` line (missing / unexpected / mismatched keys are
listed) and exits with status 1.
"""

import hashlib
import os
import pickle
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
import safetensors
import safetensors.numpy

from mtl_jax import ConfigError
from mtl_jax.models import layers
from mtl_jax.tools import torch_pickle

FORMATS = ('timm_vit', 'mlore', 'swin_imagenet', 'mtlora')

_FORMAT = flags.DEFINE_enum('format', None, FORMATS, 'Kind of the input checkpoint.')
_INPUT = flags.DEFINE_string('input', None, 'Checkpoint file (.pth, .npz or .safetensors).')
_OUTPUT = flags.DEFINE_string('output', None, 'New directory for the weights checkpoint.')
_KEY = flags.DEFINE_string('key', '', 'Dotted path of the state dict inside a .pth file '
                           '(default: "model" or "state_dict" when present, else the file).')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:args]) '
                                          'of the model the weights are for.', lock_config=True)
flags.mark_flags_as_required(['format', 'input', 'output', 'config'])

# specs/mlore.md §3.5: parameters of the ViT-B variant that its forward never uses.
_MLORE_UNUSED = re.compile(r'(backbone\.(q_fuse|classify_route_[12])|aux_heads)\..*')
# ImageNet classifier parts with no place in a dense-prediction backbone.
_TIMM_CLASSIFIER = re.compile(r'cls_token|(head|pre_logits)\..*')
# Swin ImageNet entries the dense model has no place for (specs/mtlora.md §7).
_SWIN_DROPPED = re.compile(r'.*attn_mask|norm\.(weight|bias)|head\..*')


# -- reading ------------------------------------------------------------------------------------

def read_state_dict(path: str, key: str = '') -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state dict, info) of a `.pth` / `.npz` / `.safetensors` file.

  A `.pth` file's nested dicts are flattened with '.' after selecting `key` (see module
  docstring); non-array entries (configs, epoch counters) are skipped and counted in info.
  """
  if not os.path.isfile(path):
    raise ConfigError(f'--input {path}: no such file')
  if (path.endswith('.npz') or path.endswith('.safetensors')) and key:
    raise ConfigError(f'--key is for .pth files; {path} is a flat file of named arrays')
  try:
    if path.endswith('.npz'):
      with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}, {'key': ''}
    if path.endswith('.safetensors'):
      return dict(safetensors.numpy.load_file(path)), {'key': ''}
    tree = torch_pickle.load(path)
  except (ValueError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError,
          safetensors.SafetensorError) as e:
    raise ConfigError(f'--input {path}: {e}') from e
  if not key and isinstance(tree, Mapping):
    key = next((k for k in ('model', 'state_dict') if isinstance(tree.get(k), Mapping)), '')
  for part in filter(None, key.split('.')):
    if not isinstance(tree, Mapping) or part not in tree:
      found = sorted(map(str, tree)) if isinstance(tree, Mapping) else type(tree).__name__
      raise ConfigError(f'--key {key}: no entry {part!r} in {path} (found: {found})')
    tree = tree[part]
  arrays, skipped = {}, []
  _flatten_into(tree, '', arrays, skipped)
  if not arrays:
    raise ConfigError(f'--input {path}: no tensors under key {key!r} (set --key)')
  return arrays, {'key': key, 'skipped_entries': len(skipped)}


def _flatten_into(tree, prefix: str, arrays: dict, skipped: list) -> None:
  if isinstance(tree, np.ndarray):
    arrays[prefix[:-1]] = tree
  elif isinstance(tree, Mapping):
    for k, v in tree.items():
      _flatten_into(v, f'{prefix}{k}.', arrays, skipped)
  else:
    skipped.append(prefix[:-1])


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 24), b''):
      digest.update(block)
  return digest.hexdigest()


# -- key checks ---------------------------------------------------------------------------------

def check_keys(got: Mapping[str, tuple], want: Mapping[str, tuple], what: str) -> None:
  """Raises one ConfigError naming the missing, unexpected and shape-mismatched keys."""
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  mismatched = sorted(f'{k} {tuple(got[k])} vs {tuple(want[k])}' for k in set(got) & set(want)
                      if tuple(got[k]) != tuple(want[k]))
  problems = [f'{len(items)} {kind} ({_truncate(items)})' for kind, items in (
      ('missing', missing), ('unexpected', unexpected), ('shape mismatches: got vs want',
                                                         mismatched)) if items]
  if problems:
    raise ConfigError(f'{what}: {"; ".join(problems)}; check --format and --config')


def _truncate(items: list[str], n: int = 4) -> str:
  return ', '.join(items[:n]) + (f', ... {len(items) - n} more' if len(items) > n else '')


def flatten(tree: Mapping, prefix: str = '') -> dict[str, Any]:
  """Nested dict -> {'a/b/0/c': leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f'{prefix}{k}/'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _shapes(tree: Mapping) -> dict[str, tuple]:
  return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def abstract_model(config):
  """The config's model with ShapeDtypeStruct variables (nothing allocated)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mtl_jax import models  # pylint: disable=g-import-not-at-top
  from mtl_jax import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  dataset = config.dataset.name.split('/')[0].split(':')[0]  # as train.dataset_kind (no TF import)
  tasks = tasks_lib.get_tasks(config.tasks, dataset, config.convention)
  return nnx.eval_shape(lambda: models.build_model(config, tasks, rngs=nnx.Rngs(0)))


def abstract_weights(config) -> tuple[dict, dict]:
  """(params, batch_stats) of the config's model as nested dicts of ShapeDtypeStruct."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  model = abstract_model(config)
  return (nnx.to_pure_dict(nnx.state(model, nnx.Param)),
          nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))


def _torch_shape(leaf_name: str, shape: tuple) -> tuple:
  """Torch shape of an mtl_jax parameter: kernels are (I, O) / (kh, kw, I, O) here."""
  if leaf_name != 'kernel':
    return shape
  return shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])


def _from_torch(leaf_name: str, value: np.ndarray) -> np.ndarray:
  """Inverse of `_torch_shape` on values, as float32."""
  value = np.asarray(value, np.float32)
  if leaf_name != 'kernel':
    return value
  if value.ndim == 2:
    return layers.linear_kernel_from_torch(value)
  return layers.conv_kernel_from_torch(value)


# -- timm ViT ----------------------------------------------------------------------------------

def augreg_to_timm(npz: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Google AugReg ViT `.npz` names/layouts -> timm state dict (as timm's `_load_weights`).

  Unknown names are kept as they are (the key check then reports them as unexpected).
  """
  prefix = 'opt/target/' if 'opt/target/embedding/kernel' in npz else ''
  w = {k[len(prefix):]: np.asarray(v) for k, v in npz.items() if k.startswith(prefix)}
  out, qkv = {}, {}
  for name, v in w.items():
    block = re.fullmatch(r'Transformer/encoderblock_(\d+)/(.+)', name)
    sub = block.group(2) if block else ''
    b = f'blocks.{block.group(1)}.' if block else ''
    if name == 'embedding/kernel':  # (p, p, 3, D) -> (D, 3, p, p)
      out['patch_embed.proj.weight'] = v.transpose(3, 2, 0, 1)
    elif name == 'embedding/bias':
      out['patch_embed.proj.bias'] = v
    elif name == 'cls':
      out['cls_token'] = v
    elif name == 'Transformer/posembed_input/pos_embedding':
      out['pos_embed'] = v
    elif m := re.fullmatch(r'Transformer/encoder_norm/(scale|bias)', name):
      out[f'norm.{_TORCH_NAME[m.group(1)]}'] = v
    elif m := re.fullmatch(r'(head|pre_logits)/(kernel|bias)', name):
      key = 'head' if m.group(1) == 'head' else 'pre_logits.fc'
      out[f'{key}.{_TORCH_NAME[m.group(2)]}'] = v.T
    elif m := re.fullmatch(r'LayerNorm_([02])/(scale|bias)', sub):
      out[f'{b}norm{1 + int(m.group(1)) // 2}.{_TORCH_NAME[m.group(2)]}'] = v
    elif m := re.fullmatch(r'MlpBlock_3/Dense_([01])/(kernel|bias)', sub):
      out[f'{b}mlp.fc{1 + int(m.group(1))}.{_TORCH_NAME[m.group(2)]}'] = v.T
    elif m := re.fullmatch(r'MultiHeadDotProductAttention_1/(query|key|value)/(kernel|bias)', sub):
      # kernel (D, heads, head_dim) -> torch rows (heads * head_dim, D); bias -> (heads * head_dim,)
      part = v.reshape(v.shape[0], -1).T if m.group(2) == 'kernel' else v.reshape(-1)
      qkv.setdefault((b, _TORCH_NAME[m.group(2)]), {})[m.group(1)] = part
    elif m := re.fullmatch(r'MultiHeadDotProductAttention_1/out/(kernel|bias)', sub):
      # kernel (heads, head_dim, D) -> (D, heads * head_dim)
      out[f'{b}attn.proj.{_TORCH_NAME[m.group(1)]}'] = (
          v.reshape(-1, v.shape[-1]).T if m.group(1) == 'kernel' else v)
    else:
      out[name] = v
  for (b, kind), parts in qkv.items():
    if set(parts) == {'query', 'key', 'value'}:
      out[f'{b}attn.qkv.{kind}'] = np.concatenate([parts[n] for n in ('query', 'key', 'value')])
    else:  # leave the incomplete parts for the key check to report
      out.update({f'{b}attn.{n}.{kind}': p for n, p in parts.items()})
  return out


_TORCH_NAME = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of torch's 1-D bicubic resize (Keys a = -0.75, align_corners=False,
  border samples clamped), float64. Separable: 2-D resize = M_h @ X @ M_w^T."""
  a = -0.75
  # Source coordinates as torch computes them for float32 inputs (scale in float32; no clamping
  # at 0 for cubic), weights in float64.
  scale = np.float32(n_in) / np.float32(n_out)
  src = (scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5))
  x0 = np.floor(src).astype(np.float64)
  t = src.astype(np.float64) - x0

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  m = np.zeros((n_out, n_in))
  for k, w in enumerate((far(t + 1), near(t), near(1 - t), far(2 - t))):
    np.add.at(m, (np.arange(n_out), np.clip(x0 - 1 + k, 0, n_in - 1).astype(int)), w)
  return m


def resize_pos_embed(pos_embed: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """(1, 1 + g*g, D) -> (1, 1 + h*w, D): the g x g grid resized bicubically (timm's
  `resize_pos_embed` with F.interpolate(mode='bicubic')); slot 0 is copied."""
  rows, dim = pos_embed.shape[1] - 1, pos_embed.shape[2]
  g = int(round(rows ** 0.5))
  if g * g != rows:
    raise ConfigError(f'pos_embed has {rows} grid rows (+1 class slot), not a square grid')
  h, w = grid
  x = np.asarray(pos_embed[0, 1:], np.float64).reshape(g, g, dim)
  y = np.einsum('ij,jkd,lk->ild', bicubic_matrix(g, h), x, bicubic_matrix(g, w))
  y = y.reshape(1, h * w, dim).astype(pos_embed.dtype)
  return np.concatenate([pos_embed[:, :1], y], axis=1)


def _find_vit(params: Mapping, path=()) -> list[tuple]:
  """Paths of the ViT subtrees (dicts with patch_embed, pos_embed, blocks, norm) in `params`."""
  if {'patch_embed', 'pos_embed', 'blocks', 'norm'} <= set(params):
    return [path]
  return [p for k, v in params.items() if isinstance(v, Mapping) for p in _find_vit(v, path + (k,))]


def _vit_torch_shapes(vit_params: Mapping) -> dict[str, tuple]:
  """timm state-dict names and shapes of an (abstract) mtl_jax ViT param tree."""
  shapes = {}
  for name, leaf in flatten(vit_params).items():
    parts = name.split('/')
    shape = _torch_shape(parts[-1], tuple(leaf.shape))
    if parts[0] == 'patch_embed':
      parts[0] = 'patch_embed.proj'
    parts[-1] = _TORCH_NAME.get(parts[-1], parts[-1])
    shapes['.'.join(parts)] = shape
  return shapes


def _nest(path: tuple, tree: dict) -> dict:
  for k in reversed(path):
    tree = {k: tree}
  return tree


def convert_timm_vit(state_dict: Mapping[str, np.ndarray], config):
  """timm / AugReg ViT -> ({backbone ViT params}, {}, info) for `config`'s model."""
  from mtl_jax.models import vit  # pylint: disable=g-import-not-at-top
  if 'embedding/kernel' in state_dict or 'opt/target/embedding/kernel' in state_dict:
    state_dict = augreg_to_timm(state_dict)
  state_dict = _strip_module(state_dict)
  sd = {k: v for k, v in state_dict.items() if not _TIMM_CLASSIFIER.fullmatch(k)}
  params, _ = abstract_weights(config)
  paths = _find_vit(params)
  if len(paths) != 1:
    raise ConfigError(f'--format=timm_vit needs a model with one ViT backbone; '
                      f'config.model.name={config.model.name!r} has {len(paths)}')
  vit_abstract = params
  for k in paths[0]:
    vit_abstract = vit_abstract[k]
  want = _vit_torch_shapes(vit_abstract)
  info = {'dropped': len(state_dict) - len(sd)}
  pos = sd.get('pos_embed')
  if pos is not None and pos.ndim == 3 and pos.shape[2] == want['pos_embed'][2] and (
      pos.shape != want['pos_embed']):
    h, w = (tuple(config.input.crop_size)[i] // want['patch_embed.proj.weight'][2]
            for i in (0, 1))
    sd['pos_embed'] = resize_pos_embed(pos, (h, w))
    info['pos_embed_resized'] = f'{pos.shape[1] - 1} -> {h}x{w}'
  check_keys(_shapes(sd), want, 'timm ViT -> config ViT')
  converted = vit.vit_params_from_torch(sd, prefix='')
  check_keys(_shapes(converted), _shapes(vit_abstract), 'converted ViT')
  return _nest(paths[0], converted), {}, info


# -- full models (family modules) ---------------------------------------------------------------

def _strip_module(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops the `module.` prefix of DDP-wrapped models (specs/mlore.md §8)."""
  return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}


def _family(name: str):
  import importlib  # pylint: disable=g-import-not-at-top
  try:
    return importlib.import_module(f'mtl_jax.models.{name}')
  except ModuleNotFoundError as e:
    raise ConfigError(f'the {name} model family (mtl_jax/models/{name}.py) is not available') from e


def _check_full(params: Mapping, batch_stats: Mapping, config) -> None:
  want_params, want_stats = abstract_weights(config)
  check_keys(_shapes(params), _shapes(want_params), 'converted params vs config model')
  check_keys(_shapes(batch_stats), _shapes(want_stats), 'converted batch_stats vs config model')


def convert_mlore(state_dict: Mapping[str, np.ndarray], config):
  """Official MLoRE checkpoint -> (params, batch_stats, info) (specs/mlore.md §3.5, §8)."""
  sd = _strip_module(state_dict)
  kept = {k: v for k, v in sd.items()
          if not (k.endswith('num_batches_tracked') or _MLORE_UNUSED.fullmatch(k))}
  weights = _family('mlore').params_from_torch(kept, config)
  _check_full(weights['params'], weights['batch_stats'], config)
  return weights['params'], weights['batch_stats'], {'dropped': len(sd) - len(kept)}


def convert_mtlora(state_dict: Mapping[str, np.ndarray], config):
  """Full MTLoRA checkpoint `model` -> (params, batch_stats, info) (specs/mtlora.md §7)."""
  sd = _strip_module(state_dict)
  kept = {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}
  weights = _family('mtlora').params_from_torch(kept, config)
  _check_full(weights['params'], weights['batch_stats'], config)
  return weights['params'], weights['batch_stats'], {'dropped': len(sd) - len(kept)}


def convert_swin_imagenet(state_dict: Mapping[str, np.ndarray], config):
  """Microsoft Swin ImageNet `model` -> ({'backbone': ...}, {}, info) (specs/mtlora.md §7).

  Names come from the mtlora family (`mtlora.torch_key`) without the `backbone.` prefix and with
  MTLoRALinear's `.linear` dropped (qkv/proj/fc1/fc2, and PatchMerging's reduction under
  MTLoRA+). LoRA matrices keep their initialisation (B = 0: the adapted model starts at the
  pretrained backbone); `attn_mask`, the final `norm` and the `head` are dropped;
  `relative_position_index` is checked against the model's window, not loaded.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mtl_jax.models import swin  # pylint: disable=g-import-not-at-top
  mtlora = _family('mtlora')
  if config.model.name not in ('swin', 'mtlora'):
    raise ConfigError(f'--format=swin_imagenet needs config.model.name swin or mtlora, not '
                      f'{config.model.name!r}')
  sd = _strip_module(state_dict)
  kept = {k: v for k, v in sd.items() if not _SWIN_DROPPED.fullmatch(k)}
  model = abstract_model(config)
  want, paths, lora_leaves = {}, {}, 0
  for path, leaf in nnx.to_flat_state(nnx.state(model.backbone, nnx.Param)):
    if any(str(p).startswith('lora_') for p in path):
      lora_leaves += 1
      continue
    key = re.sub(r'\.(qkv|proj|fc1|fc2|reduction)\.linear\.', r'.\1.',
                 mtlora.torch_key(path))
    want[key], paths[key] = _torch_shape(str(path[-1]), tuple(leaf.shape)), path
  index_errors, checked = [], 0
  for path, module in nnx.iter_graph(model.backbone):
    if isinstance(module, swin.WindowAttention):
      key = mtlora.torch_key((*path, 'relative_position_index'))
      if key in kept:
        checked += 1
        if not np.array_equal(kept.pop(key), swin.relative_position_index(module.window_size)):
          index_errors.append(key)
  if index_errors:
    raise ConfigError(f'{len(index_errors)} relative_position_index buffers differ from the '
                      f"config's window ({_truncate(index_errors)}); check "
                      'config.model.backbone.window_size')
  check_keys(_shapes(kept), want, 'Swin ImageNet -> config backbone')
  backbone = {}
  for key, path in paths.items():
    _set(backbone, path, _from_torch(str(path[-1]), kept[key]))
  return {'backbone': backbone}, {}, {'dropped': len(sd) - len(kept) - checked,
                                      'index_checked': checked, 'lora_kept_at_init': lora_leaves}


def _set(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


_CONVERTERS = {
    'timm_vit': convert_timm_vit,
    'mlore': convert_mlore,
    'swin_imagenet': convert_swin_imagenet,
    'mtlora': convert_mtlora,
}


def convert_state_dict(state_dict: Mapping[str, np.ndarray], fmt: str, config):
  """(params, batch_stats, info) of `state_dict` in format `fmt` for `config`'s model."""
  return _CONVERTERS[fmt](state_dict, config)


# -- writing ------------------------------------------------------------------------------------

def run(fmt: str, input_path: str, output: str, config, key: str = '') -> dict[str, Any]:
  """Reads, converts and writes `output` (complete or not at all); returns the metadata."""
  from mtl_jax import checkpoint  # pylint: disable=g-import-not-at-top
  output = os.path.abspath(output)
  if os.path.exists(output):
    raise ConfigError(f'--output {output} exists; remove it or choose another directory')
  state_dict, info = read_state_dict(input_path, key)
  params, batch_stats, conv_info = convert_state_dict(state_dict, fmt, config)
  metadata = {
      'format': fmt, 'source': input_path, 'source_sha256': sha256(input_path),
      'model': config.model.name, 'source_arrays': len(state_dict), **info, **conv_info,
      'params_arrays': len(flatten(params)), 'batch_stats_arrays': len(flatten(batch_stats))}
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(output)}.tmp-', dir=parent)
  try:
    checkpoint.save_weights(tmp, params, batch_stats, metadata)
    os.rename(tmp, output)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return metadata


def _parse_flags(argv):
  """absl flag parsing with one `error:` line (instead of usage + traceback) for bad flags."""
  try:
    args = flags.FLAGS(argv)
    _ = flags.FLAGS.config.model  # a config file that failed to load raises here
    return args
  except Exception as e:  # pylint: disable=broad-except
    message = next((l.strip() for l in reversed(str(e).splitlines()) if l.strip()), repr(e))
    print(f'error: {message}', file=sys.stderr)
    sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    metadata = run(_FORMAT.value, _INPUT.value, _OUTPUT.value, _CONFIG.value, _KEY.value)
  except ConfigError as e:  # one line, also for multi-line messages of the model families
    print('error: ' + '; '.join(l.strip() for l in str(e).splitlines() if l.strip()),
          file=sys.stderr)
    return 1
  print(f'wrote {os.path.abspath(_OUTPUT.value)}: ' + ', '.join(
      f'{k}={v}' for k, v in metadata.items() if k not in ('source_sha256',)))
  return 0


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
