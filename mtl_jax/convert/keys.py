"""What the conversion families share: entry tables, layouts, the key check (docs/mlore.md §8).

A family describes a PyTorch state dict as a list of `Entry`: one torch tensor, its official
shape, where it goes in the nested pure dicts of the mtl_jax model (`nnx.to_pure_dict` of the
'params' / 'batch_stats' state) and how (`layout`, `join`). `from_torch` checks a state dict
against a table (`check`: one ConfigError naming the missing, unexpected and shape-mismatched
keys) and assembles the weights; `to_torch` is its inverse. Torch layouts: conv (O, I, kh, kw)
is (kh, kw, I, O) here, Linear (O, I) is (I, O), keeping the output order (qkv's (3, heads,
head_dim)).
"""

import collections
from collections.abc import Callable, Iterable, Mapping, Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl_jax import ConfigError
from mtl_jax import models
from mtl_jax import tasks as tasks_lib


# -- layouts ---------------------------------------------------------------------------------------

def conv_kernel_from_torch(w):
  """Conv2d weight (O, I, kh, kw) -> Flax kernel (kh, kw, I, O)."""
  return w.transpose(2, 3, 1, 0)


def conv_kernel_to_torch(w):
  """Flax kernel (kh, kw, I, O) -> Conv2d weight (O, I, kh, kw)."""
  return w.transpose(3, 2, 0, 1)


def linear_kernel_from_torch(w):
  """Linear weight (O, I) -> Flax kernel (I, O); also LoRA A (r, in) / B (out, r)."""
  return w.T


# (torch -> mtl_jax, mtl_jax -> torch) per layout; array methods only, so numpy and traced jax
# arrays both work.
LAYOUTS: dict[str, tuple[Callable, Callable]] = {
    'same': (lambda w: w, lambda w: w),
    'conv': (conv_kernel_from_torch, conv_kernel_to_torch),
    'linear': (linear_kernel_from_torch, linear_kernel_from_torch),
    # a 1x1 conv (O, I, 1, 1) stored as a matrix (I, O) (an expert's `M`, docs/mlore.md §3.2.1)
    'conv1x1_matrix': (lambda w: w[:, :, 0, 0].T, lambda w: w.T[:, :, None, None]),
    'add_axis': (lambda w: w[None], lambda w: w[0]),  # (C,) <-> (1, C)
}


def _dummy(shape) -> np.ndarray:
  return np.broadcast_to(np.zeros((), np.float32), tuple(shape))  # no memory


def jax_shape(layout: str, torch_shape: Sequence[int]) -> tuple[int, ...]:
  return LAYOUTS[layout][0](_dummy(torch_shape)).shape


def torch_shape(layout: str, shape: Sequence[int]) -> tuple[int, ...]:
  return LAYOUTS[layout][1](_dummy(shape)).shape


# -- entry tables ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Entry:
  """One torch tensor: its key and shape, where it goes and how.

  `join`: '' (one array), or a piece of one array: 'stack' (pieces along a new leading axis, e.g.
  per-task modules stacked over config.tasks), 'concat_last' / 'concat_first' (along the last /
  first axis, e.g. the experts of an MLoRE block along their rank axis), in table order.
  """
  key: str
  shape: tuple[int, ...]
  collection: str  # 'params' | 'batch_stats'
  path: tuple  # in the nested pure dict of that collection
  layout: str = 'same'
  join: str = ''


def conv_entries(key, path, cin, cout, k, join='') -> list[Entry]:
  return [Entry(f'{key}.weight', (cout, cin, k, k), 'params', path + ('kernel',), 'conv', join),
          Entry(f'{key}.bias', (cout,), 'params', path + ('bias',), join=join)]


def linear_entries(key, path, din, dout, join='') -> list[Entry]:
  return [Entry(f'{key}.weight', (dout, din), 'params', path + ('kernel',), 'linear', join),
          Entry(f'{key}.bias', (dout,), 'params', path + ('bias',), join=join)]


def norm_entries(key, path, dim, running=False, join='') -> list[Entry]:
  """LayerNorm, or BatchNorm with its running statistics (`running`)."""
  out = [Entry(f'{key}.weight', (dim,), 'params', path + ('scale',), join=join),
         Entry(f'{key}.bias', (dim,), 'params', path + ('bias',), join=join)]
  if running:
    out += [Entry(f'{key}.running_mean', (dim,), 'batch_stats', path + ('mean',), join=join),
            Entry(f'{key}.running_var', (dim,), 'batch_stats', path + ('var',), join=join)]
  return out


def model_entries(model: nnx.Module, key_of: Callable[[tuple], str],
                  skip: Callable[[tuple], bool] = lambda path: False,
                  prefix: tuple = ()) -> list[Entry]:
  """One entry per variable of an (abstract) model whose torch names follow its paths: key
  `key_of(path)`, layout 'conv' for 4-D kernels, 'linear' for 2-D ones (Linear, LoRA A / B;
  not the relative position bias tables), else (and for ProMLoRA's prompts) 'same'. `prefix`
  goes before every path."""
  out = []
  for collection, kind in (('params', nnx.Param), ('batch_stats', nnx.BatchStat)):
    for path, variable in nnx.to_flat_state(nnx.state(model, kind)):
      path = tuple(path)
      if skip(path):
        continue
      shape = tuple(variable.shape)
      prompt = any('prompt' in str(p) for p in path)  # ProMLoRA's prompts, pools and gates
      layout = ('same' if prompt else 'conv' if len(shape) == 4 else 'linear' if len(shape) == 2
                and str(path[-1]) != 'relative_position_bias_table' else 'same')
      out.append(Entry(key_of(path), torch_shape(layout, shape), collection, prefix + path,
                       layout))
  return out


# -- the key check ---------------------------------------------------------------------------------

class KeyMismatch(ConfigError, KeyError):
  """A state dict that does not fit the model (a ConfigError; also a KeyError: keys are
  missing or left over)."""
  __str__ = ConfigError.__str__  # not KeyError's repr-quoting


def examples(items: Sequence[str], n: int = 4) -> str:
  """'a, b, c, d, ... 3 more'."""
  return ', '.join(items[:n]) + (f', ... {len(items) - n} more' if len(items) > n else '')


def check(got: Mapping[str, tuple], want: Mapping[str, tuple], what: str, hint: str = '', *,
          listing: bool = False) -> None:
  """Raises one KeyMismatch naming the missing, unexpected and shape-mismatched keys of `got`
  ({key: shape}) against `want`, each kind with its count and examples:

    `{what}: 2 missing (a, b); 1 unexpected (c); 1 shape mismatches: got vs want (d (3,) vs
    (4,)); {hint}`, sorted keys, 4 examples per kind, one line (the converter CLI prints it).

  `listing=True` is the multi-line form of the MLoRE family (its wording is pinned by
  tests/test_convert.py): `{what}` then a line per kind, `N missing: a, b, ...` with up to 20
  examples in table order (`... and N more`), mismatches as `d (3,) (expected (4,))`.
  """
  missing = [k for k in want if k not in got]
  unexpected = [k for k in got if k not in want]
  bad = [k for k in want if k in got and tuple(got[k]) != tuple(want[k])]
  if not (missing or unexpected or bad):
    return
  if listing:
    def show(kind, keys):
      more = f' ... and {len(keys) - 20} more' if len(keys) > 20 else ''
      return f'\n  {len(keys)} {kind}: ' + ', '.join(keys[:20]) + more if keys else ''
    mismatched = [f'{k} {tuple(got[k])} (expected {tuple(want[k])})' for k in bad]
    raise KeyMismatch(what + show('missing', missing) + show('unexpected', unexpected)
                      + show('shape-mismatched', mismatched) + (f'\n  {hint}' if hint else ''))
  mismatch(what, missing, unexpected, [f'{k} {tuple(got[k])} vs {tuple(want[k])}' for k in bad],
           hint)


def mismatch(what: str, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
             mismatched: Sequence[str] = (), hint: str = '') -> None:
  """Raises the one-line KeyMismatch of `check` from its lists (mismatches as 'key got vs
  want'); nothing when all are empty."""
  problems = [f'{len(items)} {kind} ({examples(sorted(items))})' for kind, items in (
      ('missing', missing), ('unexpected', unexpected),
      ('shape mismatches: got vs want', mismatched)) if items]
  if problems:
    raise KeyMismatch(f'{what}: {"; ".join(problems)}' + (f'; {hint}' if hint else ''))


# -- assembling and disassembling ------------------------------------------------------------------

def shape_of(value) -> tuple[int, ...]:
  return tuple(getattr(value, 'shape', np.shape(value)))


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = 'module.') -> dict[str, Any]:
  """Drops `prefix` where a key has it: DDP-wrapped models save `module.<key>`."""
  return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def from_torch(state_dict: Mapping[str, Any], entries: Sequence[Entry], what: str,
               hint: str = '', *, ignore: Callable[[str], bool] = lambda key: False,
               listing: bool = False) -> dict[str, dict]:
  """{'params', 'batch_stats'} nested pure dicts of `state_dict` read through `entries`.

  Every entry must be present with its shape; keys outside the table must be `ignore`d (else
  `check` raises). Values are cast to float32. With `jax.ShapeDtypeStruct` values the result is
  abstract (checks the layout of a large model, e.g. ViT-L, without memory).
  """
  check({k: shape_of(v) for k, v in state_dict.items() if not ignore(k)},
        {e.key: e.shape for e in entries}, what, hint, listing=listing)
  needed = {e.key: state_dict[e.key] for e in entries}
  if any(isinstance(v, jax.ShapeDtypeStruct) for v in needed.values()):
    return jax.eval_shape(lambda sd: _assemble(sd, entries, jnp), needed)
  return _assemble(needed, entries, np)


_JOINS = {'concat_last': lambda xp, v: xp.concatenate(v, axis=-1),
          'concat_first': lambda xp, v: xp.concatenate(v, axis=0),
          'stack': lambda xp, v: xp.stack(v)}


def _assemble(state_dict: Mapping, entries: Sequence[Entry], xp) -> dict[str, dict]:
  """The conversion proper, with the array namespace `xp` (numpy, or jax.numpy when traced)."""
  out = {'params': {}, 'batch_stats': {}}
  pieces = collections.defaultdict(list)
  for e in entries:
    value = LAYOUTS[e.layout][0](xp.asarray(state_dict[e.key], xp.float32))
    if e.join:
      pieces[(e.collection, e.path, e.join)].append(value)
    else:
      set_path(out[e.collection], e.path, value)
  for (collection, path, join), values in pieces.items():
    set_path(out[collection], path, _JOINS[join](xp, values))
  return out


def to_torch(weights: Mapping[str, Mapping], entries: Sequence[Entry]) -> dict[str, np.ndarray]:
  """Inverse of `from_torch`: {'params'[, 'batch_stats']} -> {torch key: array}, in table order.

  Collections absent from `weights` are skipped, so a `{'params': grads}` tree maps gradients
  to the torch names and layouts.
  """
  offsets = collections.Counter()  # per joined array: next stack index / concat offset
  out = {}
  for e in entries:
    if e.collection not in weights:
      continue
    value = np.asarray(get_path(weights[e.collection], e.path))
    group = (e.collection, e.path, e.join)
    if e.join == 'stack':
      value = value[offsets[group]]
      offsets[group] += 1
    elif e.join:
      shape = jax_shape(e.layout, e.shape)
      size = shape[-1] if e.join == 'concat_last' else shape[0]
      sl = slice(offsets[group], offsets[group] + size)
      value = value[..., sl] if e.join == 'concat_last' else value[sl]
      offsets[group] += size
    value = LAYOUTS[e.layout][1](value)
    if value.shape != e.shape:
      raise ConfigError(f'{e.key}: the weights give shape {value.shape}, the table '
                        f'{e.shape}; the weights are not of this config\'s model')
    out[e.key] = value
  return out


# -- nested dicts ----------------------------------------------------------------------------------

def flatten(tree: Mapping, prefix: str = '') -> dict[str, Any]:
  """Nested dict -> {'a/b/0/c': leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f'{prefix}{k}/'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def shapes(tree: Mapping) -> dict[str, tuple]:
  """{'a/b/0/c': shape} of a nested dict of arrays."""
  return {k: shape_of(v) for k, v in flatten(tree).items()}


def set_path(tree: dict, path: Iterable, value) -> None:
  *parents, leaf = path
  for k in parents:
    tree = tree.setdefault(k, {})
  tree[leaf] = value


def get_path(tree: Mapping, path: Iterable):
  for k in path:
    tree = tree[k]
  return tree


# -- the model a state dict is checked against -----------------------------------------------------

def abstract_model(config) -> nnx.Module:
  """The config's model with ShapeDtypeStruct variables (nothing allocated)."""
  tasks = tasks_lib.config_tasks(config)
  return nnx.eval_shape(lambda: models.build_model(config, tasks, rngs=nnx.Rngs(0)))


def abstract_weights(config) -> tuple[dict, dict]:
  """(params, batch_stats) of the config's model as nested dicts of ShapeDtypeStruct."""
  model = abstract_model(config)
  return (nnx.to_pure_dict(nnx.state(model, nnx.Param)),
          nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))


def check_against_model(params: Mapping, batch_stats: Mapping, config) -> None:
  """The converted trees hold exactly the leaves (and shapes) of the config's model."""
  want_params, want_stats = abstract_weights(config)
  check(shapes(params), shapes(want_params), 'converted params vs config model')
  check(shapes(batch_stats), shapes(want_stats), 'converted batch_stats vs config model')
