"""The AdamW moments of an MTLoRA / fork training `.pth`, mapped by parameter order
(docs/fork_yaml.md §4 `--resume`).

The references save `{'model': state_dict, 'optimizer': AdamW.state_dict(), ...}`. The AdamW is
built over every parameter of the model (before the freezing, docs/mtlora.md §8) in two groups,
Swin's `set_weight_decay`: first the decayed parameters (not 1-D, not `.bias`), then the others,
each in `named_parameters()` order, which is the state dict's order without its buffers. Its
`state` maps a parameter's index in that order to `exp_avg`, `exp_avg_sq` and `step`; frozen
parameters never got a gradient and have no entry. `read` checks the group sizes and every
moment's shape against the state dict, converts the moments with the weights' own converter (so
transposes and joins apply to them exactly as to the weights) and returns them as parameter
trees; `opt_state_arrays` places them in an optax state (`ScaleByAdamState` mu, nu, count).
"""

from collections.abc import Mapping

import jax
import numpy as np
import optax

from mtl_jax import ConfigError
from mtl_jax import sharding
from mtl_jax.convert import keys
from mtl_jax.convert import torch_pickle

FILE = 'adamw.npz'  # beside the converted weights (mtl_jax/tools/convert.py)
BUFFERS = ('relative_position_index', 'attn_mask', 'running_mean', 'running_var',
           'num_batches_tracked')


def parameter_order(state_dict: Mapping[str, np.ndarray]) -> tuple[list[str], list[str]]:
  """(decayed, not decayed) parameter keys, each in state-dict order (the optimizer's groups)."""
  names = [k for k in state_dict if k.rsplit('.', 1)[-1] not in BUFFERS]
  decayed = [k for k in names if np.ndim(state_dict[k]) > 1 and not k.endswith('.bias')]
  chosen = set(decayed)
  return decayed, [k for k in names if k not in chosen]


def read(path: str, state_dict: Mapping[str, np.ndarray], convert_fn, config) -> dict | None:
  """{'mu', 'nu': params trees, 'count': int, 'entries': int} of the `optimizer` in `.pth`
  `path`, or None when it has none. `convert_fn(state_dict, config)` is the weights' converter."""
  tree = torch_pickle.load(path)
  opt = tree.get('optimizer') if isinstance(tree, Mapping) else None
  if not (isinstance(opt, Mapping) and isinstance(opt.get('state'), Mapping)
          and isinstance(opt.get('param_groups'), (list, tuple))):
    return None
  groups = parameter_order(state_dict)
  sizes = [len(g.get('params', ())) for g in opt['param_groups']]
  if sizes != [len(g) for g in groups]:
    raise ConfigError(
        f'{path}: its optimizer groups hold {sizes} parameters, its model state dict has '
        f'{[len(g) for g in groups]} (decayed, not decayed); the file is not an AdamW state of '
        'the MTLoRA / fork layout (docs/fork_yaml.md §4)')
  index = {}
  for group, names in zip(opt['param_groups'], groups):
    index.update(zip(group['params'], names))
  mu_sd, nu_sd, steps = dict(state_dict), dict(state_dict), []
  for name in groups[0] + groups[1]:
    mu_sd[name] = nu_sd[name] = np.zeros(np.shape(state_dict[name]), np.float32)
  for i, entry in opt['state'].items():
    name = index.get(i)
    if name is None or not isinstance(entry, Mapping):
      raise ConfigError(f'{path}: optimizer state entry {i!r} matches no parameter')
    for moment, target in (('exp_avg', mu_sd), ('exp_avg_sq', nu_sd)):
      value = np.asarray(entry.get(moment))
      if value.shape != np.shape(state_dict[name]):
        raise ConfigError(f'{path}: optimizer state {i} ({moment}) has shape {value.shape}, '
                          f'parameter {name} {np.shape(state_dict[name])}; the file is not an '
                          'AdamW state of the MTLoRA / fork layout')
      target[name] = value.astype(np.float32)
    try:
      steps.append(int(np.asarray(entry.get('step', 0))))
    except (TypeError, ValueError):
      raise ConfigError(f'{path}: optimizer state {i} has a step that is not a number') from None
  mu, _, _ = convert_fn(mu_sd, config)
  nu, _, _ = convert_fn(nu_sd, config)
  return {'mu': mu, 'nu': nu, 'count': max(steps, default=0), 'entries': len(opt['state'])}


def save(path: str, moments: dict) -> None:
  arrays = {f'{k}/{p}': v for k in ('mu', 'nu') for p, v in keys.flatten(moments[k]).items()}
  np.savez(path, count=np.int64(moments['count']), **arrays)


def opt_state_arrays(path, opt_state) -> tuple[int, dict[str, np.ndarray]]:
  """(count, {leaf path in `opt_state`: array}) of the moments saved at `path`, for every
  ScaleByAdamState of `opt_state` (paths as `sharding.path_str` writes them)."""
  with np.load(path, allow_pickle=False) as f:
    saved = {k: f[k] for k in f.files}
  count = int(saved.pop('count'))
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  out = {}
  for path, node in jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_adam)[0]:
    if is_adam(node):
      prefix = sharding.path_str(path) + '/' if path else ''
      out[prefix + 'count'] = np.asarray(count, np.int32)
      out.update({prefix + k: v for k, v in saved.items()})
  return count, out
