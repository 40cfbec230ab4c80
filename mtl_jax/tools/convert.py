r"""Converts reference / ImageNet checkpoints into mtl_jax weights checkpoints (`config.init_from`).

  python -m mtl_jax.tools.convert --format=FORMAT --input=FILE --config=configs/X.py[:args] \
      --output=DIR [--key=model]

Formats (the model is built from `--config`, and every converted array is checked against it):

* `timm_vit`: an ImageNet ViT, as Google's AugReg `.npz` or a timm state dict (`.pth`,
  `.safetensors`) -> only the ViT backbone (`backbone/...` of mtl_jax/models/vit.py): AugReg names
  mapped like timm's `_load_weights` (q/k/v kernels fused into qkv), the pos-embed grid resized to
  the config's grid with torch's bicubic (a = -0.75, align_corners=False, clamped borders; slot 0
  copied), class token / head / pre_logits dropped (docs/mlore.md §2). The decoder keeps its
  initialisation when `launch.py --config.init_from=DIR` loads it.
* `mlore`: an official MLoRE checkpoint `.pth` (`checkpoint['model']`): `module.` prefixes
  stripped, `num_batches_tracked`, the ViT-B variant's unused keys and `virt_conv` dropped
  (docs/mlore.md §3.5, §8; `mtl_jax.convert.mlore.IGNORED`) -> all weights, for
  `launch.py --mode=eval --config.init_from=DIR`.
* `swin_imagenet`: Microsoft's Swin ImageNet `.pth` -> the Swin backbone of the swin / MTLoRA
  configs (docs/mtlora.md §7).
* `mtlora`: a full MTLoRA checkpoint `ckpt_epoch_N.pth` (`model` key; its pickled yacs config is
  read inertly and skipped) -> all weights.
* `promlora`: a ProMLoRA checkpoint of the user's fork -> all weights.

For `mtlora` and `promlora` a `.pth` with an `optimizer` entry also gives its AdamW moments,
mapped by parameter order (mtl_jax/convert/adamw.py), as `adamw.npz` in the output; a run with
`--config.init_from=DIR --config.init_opt_state` starts from them (the fork's `--resume`). An
optimizer entry that does not fit that layout is reported (a warning and `adamw_skipped` in the
metadata) and the weights are converted without it.

The conversion is the mtl_jax.convert package (one module per family); this is its CLI. `.pth`
files are read by `mtl_jax.convert.torch_pickle` (no torch, no pickled code runs). The nested
checkpoint dict is reduced to one state dict: `--key` (dotted path), else `model` or
`state_dict` when present, else the whole file. The output directory is written under a temporary
name and renamed when complete; its metadata records the source path and sha256, the format and
the key counts. Bad input prints one `error:` line (missing / unexpected / mismatched keys are
listed) and exits with status 1.
"""

import hashlib
import os
import shutil
import sys
import tempfile
from typing import Any

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mtl_jax import ConfigError
from mtl_jax import convert
from mtl_jax.convert import adamw
from mtl_jax.convert import keys
from mtl_jax.tools import tool_args

FORMATS = tuple(convert.FORMATS)
OPTIMIZER_FORMATS = ('mtlora', 'promlora')  # full training checkpoints of the references

_FORMAT = flags.DEFINE_enum('format', None, FORMATS, 'Kind of the input checkpoint.')
_INPUT = flags.DEFINE_string('input', None, 'Checkpoint file (.pth, .npz or .safetensors).')
_OUTPUT = flags.DEFINE_string('output', None, 'New directory for the weights checkpoint.')
_KEY = flags.DEFINE_string('key', '', 'Dotted path of the state dict inside a .pth file '
                           '(default: "model" or "state_dict" when present, else the file).')
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:args]) '
                                          'of the model the weights are for.', lock_config=True)
flags.mark_flags_as_required(['format', 'input', 'output', 'config'])


def sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 24), b''):
      digest.update(block)
  return digest.hexdigest()


# -- writing ------------------------------------------------------------------------------------

def run(fmt: str, input_path: str, output: str, config, key: str = '') -> dict[str, Any]:
  """Reads, converts and writes `output` (complete or not at all); returns the metadata."""
  from mtl_jax import checkpoint  # pylint: disable=g-import-not-at-top
  output = os.path.abspath(output)
  if os.path.exists(output):
    raise ConfigError(f'--output {output} exists; remove it or choose another directory')
  parent = os.path.dirname(output)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ConfigError(f'--output {output}: {parent} is a file; choose another directory')
  state_dict, info = convert.read_state_dict(input_path, key)
  params, batch_stats, conv_info = convert.convert_state_dict(state_dict, fmt, config)
  metadata = {
      'format': fmt, 'source': input_path, 'source_sha256': sha256(input_path),
      'model': config.model.name, 'source_arrays': len(state_dict), **info, **conv_info,
      'params_arrays': len(keys.flatten(params)),
      'batch_stats_arrays': len(keys.flatten(batch_stats))}
  moments = None
  if fmt in OPTIMIZER_FORMATS and input_path.endswith('.pth'):
    try:
      moments = adamw.read(input_path, state_dict, convert.FORMATS[fmt], config)
    except ConfigError as e:  # the weights are still good: converted without the moments
      logging.warning('Optimizer state not converted: %s', e)
      metadata['adamw_skipped'] = str(e)
    metadata['adamw_entries'] = moments['entries'] if moments else 0
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(output)}.tmp-', dir=parent)
  try:
    checkpoint.save_weights(tmp, params, batch_stats, metadata)
    if moments:
      adamw.save(os.path.join(tmp, adamw.FILE), moments)
    os.rename(tmp, output)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return metadata


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


def cli():
  """Entry point of the console script (pyproject.toml) and of `python -m`."""
  # A config file that failed to load raises when read: one error line too.
  app.run(main, flags_parser=lambda argv: tool_args.parse_absl_flags(
      argv, check=lambda: flags.FLAGS.config.model))


if __name__ == '__main__':
  cli()
