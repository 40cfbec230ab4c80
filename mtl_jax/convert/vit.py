"""The ViT family: timm ViT state dicts, Google AugReg `.npz` files and the MLoRE ViT backbone
(docs/mlore.md §2, §8).

Torch names of mtl_jax/models/vit.py: `pos_embed`, `patch_embed.proj.*`, `blocks.<i>.{norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*`, `norm.*` (`backbone.` before them in MLoRE).

* `from_torch(state_dict, config)` / `to_torch(weights, config)`: an ImageNet ViT <-> the ViT
  backbone of `config`'s model (`--format=timm_vit`). AugReg names are mapped like timm's
  `_load_weights` (q/k/v kernels fused into qkv); the pos-embed grid is resized to the config's
  grid with torch's bicubic (a = -0.75, align_corners=False, clamped borders; slot 0 copied);
  class token / head / pre_logits are dropped.
* `entries(sizes, prefix, path)`: the table of one ViT, also used by the MLoRE family.
* `backbone_from_torch(state_dict, prefix)`: a ViT read off a state dict without a config.
"""

import re
from collections.abc import Mapping

import numpy as np

from mtl_jax import ConfigError
from mtl_jax.convert import keys

# ImageNet classifier parts with no place in a dense-prediction backbone.
_CLASSIFIER = re.compile(r'cls_token|(head|pre_logits)\..*')
# The names of a ViT (without prefix).
_VIT_KEY = re.compile(r'pos_embed|patch_embed\.proj\.\w+|blocks\.\d+\..+|norm\.\w+')
_HINT = 'check --format and --config'


def entries(sizes: Mapping[str, int], prefix: str = '', path: tuple = ()) -> list[keys.Entry]:
  """The ViT's tensors in timm order. `sizes`: embed_dim, patch_size, num_pos (grid tokens + the
  class slot), depth, hidden (MLP width)."""
  d, p, depth, hidden = (sizes[k] for k in ('embed_dim', 'patch_size', 'depth', 'hidden'))
  out = [keys.Entry(f'{prefix}pos_embed', (1, sizes['num_pos'], d), 'params',
                    path + ('pos_embed',)),
         *keys.conv_entries(f'{prefix}patch_embed.proj', path + ('patch_embed',), 3, d, p)]
  for i in range(depth):
    k, bp = f'{prefix}blocks.{i}', path + ('blocks', i)
    out += [*keys.norm_entries(f'{k}.norm1', bp + ('norm1',), d),
            *keys.linear_entries(f'{k}.attn.qkv', bp + ('attn', 'qkv'), d, 3 * d),
            *keys.linear_entries(f'{k}.attn.proj', bp + ('attn', 'proj'), d, d),
            *keys.norm_entries(f'{k}.norm2', bp + ('norm2',), d),
            *keys.linear_entries(f'{k}.mlp.fc1', bp + ('mlp', 'fc1'), d, hidden),
            *keys.linear_entries(f'{k}.mlp.fc2', bp + ('mlp', 'fc2'), hidden, d)]
  return out + keys.norm_entries(f'{prefix}norm', path + ('norm',), d)


def backbone_from_torch(state_dict: Mapping[str, np.ndarray], prefix: str = 'backbone.') -> dict:
  """Torch ViT state dict -> nested pure dict of `nnx.state(vit, nnx.Param)` (docs/mlore.md §8).

  Sizes are read off the state dict (`patch_embed.proj.weight`, `pos_embed`, the number of
  `blocks.<i>`), every tensor is checked against them (keys.KeyMismatch, a ConfigError and a
  KeyError); keys under `prefix` outside the ViT (decoder, heads) are ignored.
  """
  sd = {k: v for k, v in state_dict.items()
        if k.startswith(prefix) and _VIT_KEY.fullmatch(k[len(prefix):])}
  what, hint = 'ViT state dict', f'check the prefix {prefix!r}'
  keys.mismatch(what, missing=[prefix + k for k in ('patch_embed.proj.weight', 'pos_embed')
                               if prefix + k not in sd], hint=hint)
  pe = keys.shape_of(sd[prefix + 'patch_embed.proj.weight'])
  pos = keys.shape_of(sd[prefix + 'pos_embed'])
  if len(pe) != 4 or pe[1] != 3 or pe[2] != pe[3]:
    keys.mismatch(what, mismatched=[f'{prefix}patch_embed.proj.weight {pe} vs (D, 3, p, p)'])
  if len(pos) != 3 or pos[0] != 1 or pos[2] != pe[0]:
    keys.mismatch(what, mismatched=[f'{prefix}pos_embed {pos} vs (1, N + 1, {pe[0]})'])
  depth = 1 + max((int(k[len(prefix + 'blocks.'):].split('.')[0]) for k in sd
                   if k.startswith(prefix + 'blocks.')), default=-1)
  sizes = dict(embed_dim=pe[0], patch_size=pe[2], num_pos=pos[1], depth=max(depth, 1),
               hidden=4 * pe[0])
  return keys.from_torch(sd, entries(sizes, prefix), what, hint)['params']


# -- timm / AugReg -> the config's ViT -------------------------------------------------------------

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


def _config_entries(config) -> list[keys.Entry]:
  """The table of the one ViT of `config`'s model, keys without prefix (timm names)."""
  params, _ = keys.abstract_weights(config)
  paths = _find_vit(params)
  if len(paths) != 1:
    raise ConfigError(f'--format=timm_vit needs a model with one ViT backbone; '
                      f'config.model.name={config.model.name!r} has {len(paths)}')
  vit = keys.get_path(params, paths[0])
  sizes = dict(embed_dim=vit['pos_embed'].shape[2],
               patch_size=vit['patch_embed']['kernel'].shape[0],
               num_pos=vit['pos_embed'].shape[1], depth=len(vit['blocks']),
               hidden=vit['blocks'][0]['mlp']['fc1']['kernel'].shape[1])
  return entries(sizes, '', paths[0])


def _from_timm(state_dict: Mapping[str, np.ndarray], config) -> tuple[dict, dict]:
  if 'embedding/kernel' in state_dict or 'opt/target/embedding/kernel' in state_dict:
    state_dict = augreg_to_timm(state_dict)
  state_dict = keys.strip_prefix(state_dict)
  sd = {k: v for k, v in state_dict.items() if not _CLASSIFIER.fullmatch(k)}
  table = _config_entries(config)
  want = {e.key: e.shape for e in table}
  info = {'dropped': len(state_dict) - len(sd)}
  pos = sd.get('pos_embed')
  if pos is not None and pos.ndim == 3 and pos.shape[2] == want['pos_embed'][2] and (
      pos.shape != want['pos_embed']):
    patch = want['patch_embed.proj.weight'][2]
    h, w = (tuple(config.input.crop_size)[i] // patch for i in (0, 1))
    sd['pos_embed'] = resize_pos_embed(pos, (h, w))
    info['pos_embed_resized'] = f'{pos.shape[1] - 1} -> {h}x{w}'
  return keys.from_torch(sd, table, 'timm ViT -> config ViT', _HINT), info


def from_torch(state_dict: Mapping[str, np.ndarray], config) -> dict[str, dict]:
  """timm / AugReg ViT -> {'params': {<ViT path>: ...}, 'batch_stats': {}} for `config`."""
  return _from_timm(state_dict, config)[0]


def to_torch(weights: Mapping[str, Mapping], config) -> dict[str, np.ndarray]:
  """The ViT backbone of `weights` (of `config`'s model) -> timm state dict, at the config's
  grid, without class token and head."""
  return keys.to_torch(weights, _config_entries(config))


def _convert_timm(state_dict, config):
  weights, info = _from_timm(state_dict, config)
  return weights['params'], weights['batch_stats'], info


FORMATS = {'timm_vit': _convert_timm}
