"""PyTorch checkpoints <-> mtl_jax weights (docs/mlore.md §8, docs/mtlora.md §7, docs/stack.md §8).

Layout:
  torch_pickle.py  reads `.pth` files without torch and without running pickled code;
  keys.py          what the families share: `Entry` tables (torch key, shape, mtl_jax path,
                   layout, join), the conv / linear layouts, the one key check (`check`: missing,
                   unexpected and shape-mismatched keys, counts and examples), assembling /
                   disassembling weights, the config's abstract model;
  vit.py           timm ViT (state dict, AugReg `.npz`, safetensors) and the MLoRE ViT backbone;
  mlore.py         MLoRE (docs/mlore.md §8, §10);
  mtlora.py        Swin ImageNet, the Swin multi-task baseline, MTLoRA(+) (docs/mtlora.md §7, §10);
  promlora.py      the user fork's ProMLoRA (docs/user_fork.md §2).
Models stay pure (mtl_jax/models has no conversion code).

A family module exposes:
  from_torch(state_dict, config) -> {'params': ..., 'batch_stats': ...}, nested pure dicts of
    the model `config` builds (for `nnx.replace_by_pure_dict`), after one key check;
  to_torch(weights, config) -> {torch key: array}, the inverse (a {'params': grads} tree maps
    gradients);
  FORMATS = {name: convert}: the `--format`s of `python -m mtl_jax.tools.convert` it implements,
    convert(state_dict, config) -> (params, batch_stats, info), info holding counts for the
    checkpoint metadata (e.g. 'dropped');
  and, for `python -m mtl_jax.tools.parity`, config_from_reference(config, sidecar) and
  reference_arrays(model, images_nchw, config).

Adding a family: write mtl_jax/convert/<family>.py with the functions above (its
table from keys.py's `*_entries` helpers, as mlore.py, or read off the abstract model with
`keys.model_entries`, as mtlora.py), add the module to `FAMILIES` below, and, for fixtures, its
sidecar kind to `family_of` in mtl_jax/tools/parity.py.
"""

import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy

from mtl_jax import ConfigError
from mtl_jax.convert import mlore
from mtl_jax.convert import mtlora
from mtl_jax.convert import promlora
from mtl_jax.convert import torch_pickle
from mtl_jax.convert import vit

FAMILIES = (vit, mlore, mtlora, promlora)
# --format name -> convert(state_dict, config) -> (params, batch_stats, info).
FORMATS = {name: fn for family in FAMILIES for name, fn in family.FORMATS.items()}


def read_state_dict(path: str, key: str = '') -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state dict, info) of a `.pth` / `.npz` / `.safetensors` file.

  A `.pth` file (torch_pickle: no torch, no pickled code runs) is reduced to one state dict:
  `key` (dotted path), else `model` or `state_dict` when present, else the whole file; nested
  dicts are flattened with '.'; non-array entries (configs, epoch counters) are skipped and
  counted in info.
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


def convert_state_dict(state_dict: Mapping[str, np.ndarray], fmt: str, config):
  """(params, batch_stats, info) of `state_dict` in format `fmt` (a `FORMATS` key) for
  `config`'s model."""
  if fmt not in FORMATS:
    raise ConfigError(f'unknown --format {fmt!r}; known: {", ".join(FORMATS)}')
  return FORMATS[fmt](state_dict, config)
