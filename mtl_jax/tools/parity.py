r"""Parity with the official PyTorch code: `python -m mtl_jax.tools.parity FIXTURE.npz [--tol T]
[--dtype bfloat16]`.

A fixture (docs/mlore.md §10, docs/mtlora.md §10) holds the parameters of a reduced reference
model as `param/<torch key>`, its `input` and golden arrays (`out/<task>`, intermediates) in torch
layouts, with a `.json` sidecar describing the reduced config. This tool builds the matching
mtl_jax model, converts every parameter, runs the eval-mode forward and prints, for every array it
can compare, the max abs error and the max error relative to the array's max magnitude; it exits 1
when any relative error exceeds `--tol` (default 1e-5).

Model families plug in through three functions of their conversion module
(`mtl_jax/convert/<family>.py`, see mtl_jax/convert/__init__.py):

* `config_from_reference(config, sidecar) -> config`: the mtl_jax config (model, tasks,
  convention, dataset, input size) of the fixture's reduced reference config;
* `from_torch(state_dict, config) -> {'params': ..., 'batch_stats': ...}` (pure dicts);
* `reference_arrays(model, images_nchw, config) -> {fixture key: array in torch layout}`.
"""

import argparse
import importlib
import json
import os
import sys
import zipfile
from typing import Mapping

import numpy as np

from mtl_jax import ConfigError

# Sidecar -> family module. MLoRE fixtures name the reference module, MTLoRA-family ones a kind.
_FAMILIES = {
    'mlore': 'mtl_jax.convert.mlore',
    'mtlora': 'mtl_jax.convert.mtlora',
    'promlora': 'mtl_jax.convert.promlora',
}


def family_of(sidecar: Mapping) -> str:
  """'mlore', 'mtlora' or 'promlora' from a fixture sidecar."""
  if str(sidecar.get('module', '')).lower().startswith('mlore'):
    return 'mlore'
  if sidecar.get('kind') in ('mtlora', 'mtlora_plus', 'swin'):
    return 'mtlora'
  if sidecar.get('kind') == 'promlora':
    return 'promlora'
  raise ConfigError(f'cannot tell the model family of this fixture (module='
                    f'{sidecar.get("module")!r}, kind={sidecar.get("kind")!r}); supported: MLoRE, '
                    'MTLoRA / MTLoRA+ / Swin and ProMLoRA fixtures')


def load_fixture(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """(arrays, sidecar) of FIXTURE.npz and its FIXTURE.json."""
  try:
    with np.load(path, allow_pickle=False) as npz:  # a fixture holds arrays only
      arrays = {k: npz[k] for k in npz.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise ConfigError(f'{path} is not a fixture .npz of named arrays ({type(e).__name__}); give '
                      'a FIXTURE.npz written by the fixture scripts (tests/fixtures)') from None
  sidecar_path = os.path.splitext(path)[0] + '.json'
  if not os.path.exists(sidecar_path):
    raise ConfigError(f'{sidecar_path} not found: the fixture needs its .json sidecar')
  try:
    with open(sidecar_path) as f:
      return arrays, json.load(f)
  except ValueError as e:
    raise ConfigError(f'{sidecar_path} is not JSON ({e})') from None


def build_from_fixture(arrays: Mapping[str, np.ndarray], sidecar: Mapping,
                       dtype: str = 'float32'):
  """(model in eval mode with the fixture's parameters computing in `dtype`, config, family
  module). Parameters stay float32 whatever `dtype` (config.model.dtype)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  from mtl_jax import models  # pylint: disable=g-import-not-at-top
  from mtl_jax import tasks as tasks_lib  # pylint: disable=g-import-not-at-top

  family = importlib.import_module(_FAMILIES[family_of(sidecar)])
  config = family.config_from_reference(common.get_config(), sidecar)
  config.model.dtype = dtype
  tasks = tasks_lib.config_tasks(config)
  state_dict = {k[len('param/'):]: v for k, v in arrays.items() if k.startswith('param/')}
  weights = family.from_torch(state_dict, config)
  model = nnx.eval_shape(lambda: models.build_model(config, tasks, rngs=nnx.Rngs(0)))
  graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  nnx.replace_by_pure_dict(params, weights['params'])
  nnx.replace_by_pure_dict(batch_stats, weights['batch_stats'])
  model = nnx.merge(graphdef, params, batch_stats, _concrete(rest))
  model.eval()
  return model, config, family


def _concrete(rest):
  """Non-parameter variables of an abstract model (RNG streams): real values (unused in eval)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda s: jax.random.key(0) if jax.dtypes.issubdtype(
      s.dtype, jax.dtypes.prng_key) else np.zeros(s.shape, s.dtype), rest)


def compare(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]
            ) -> list[tuple[str, float, float]]:
  """(key, max abs error, max abs error / max |want|) for every key of `got` also in `want`."""
  rows = []
  for key in sorted(got):
    if key not in want:
      continue
    a, b = np.asarray(got[key], np.float64), np.asarray(want[key], np.float64)
    if a.shape != b.shape:
      raise ValueError(f'{key}: shape {a.shape} != fixture shape {b.shape}')
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    rows.append((key, err, err / max(float(np.max(np.abs(b))), 1e-12)))
  return rows


def run(path: str, dtype: str = 'float32') -> list[tuple[str, float, float]]:
  arrays, sidecar = load_fixture(path)
  model, config, family = build_from_fixture(arrays, sidecar, dtype)
  got = family.reference_arrays(model, arrays['input'], config)
  rows = compare(got, arrays)
  if not rows:
    raise ValueError(f'{path}: no array of the fixture could be compared')
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('fixture', help='FIXTURE.npz (with FIXTURE.json beside it)')
  parser.add_argument('--tol', type=float, default=1e-5,
                      help='max error relative to each array\'s max magnitude (default 1e-5)')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='computation dtype of the model (config.model.dtype); bfloat16 '
                      'errors are a few 1e-2 (tests/test_perf.py), so raise --tol with it')
  args = parser.parse_args(argv)
  try:
    rows = run(args.fixture, args.dtype)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  width = max(len(k) for k, _, _ in rows)
  failed = [k for k, _, rel in rows if rel > args.tol]
  print(f'{"array":<{width}}  {"max abs err":>12}  {"max rel err":>12}')
  for key, err, rel in rows:
    print(f'{key:<{width}}  {err:12.3e}  {rel:12.3e}{"  FAIL" if rel > args.tol else ""}')
  print(f'{len(rows) - len(failed)}/{len(rows)} arrays within {args.tol:g} '
        f'(max rel err {max(r for _, _, r in rows):.3e})')
  return 1 if failed else 0


def cli():
  """Entry point of the console script (pyproject.toml) and of `python -m`."""
  sys.exit(main())


if __name__ == '__main__':
  cli()
