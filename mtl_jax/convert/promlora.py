"""The user fork's ProMLoRA checkpoints <-> mtl_jax (docs/user_fork.md §2).

The fork's `MultiTaskSwin` with a `PromptedSwinTransformer` backbone names its tensors as the
MTLoRA family does (mtlora.py `torch_key`: `backbone.layers.<s>.blocks.<b>.attn.qkv.linear.weight`,
`...qkv.lora_shared_A` (r, in), `downsampler.<task>.downsample_<i>`, `decoders.decoders.<task>.
last_layer.<i>`) plus the prompts, kept in their torch shapes:

  backbone.prompt_embeddings.<key>             (1, T, C_0)   shallow prompt, key = task | 'shared'
  backbone.deep_prompt_embeddings.<s>.<key>    (n_s, T, C_s) deep prompts of stage s
  backbone.deep_prompt_pools.<s>               (n_s, K_s, C_s) dynamic prompts (later fork version)
  backbone.deep_prompt_gates.<s>               (n_s, tasks, T, K_s)

and the unused final `backbone.norm` (kept). `attn_mask` and `num_batches_tracked` buffers are
dropped, `relative_position_index` checked (mtlora.py). `--format=promlora` converts a fork
checkpoint (`ckpt_epoch_N.pth`, key `model`); the fork's `--resume-backbone` from Microsoft's
Swin-T/B ImageNet weights is `--format=swin_imagenet` with a ProMLoRA config (prompts and LoRA
keep their initialisation, the final norm is loaded).
"""

from collections.abc import Mapping

import ml_collections
import numpy as np

from mtl_jax import ConfigError
from mtl_jax.convert import mtlora
from mtl_jax.models import promlora as promlora_model


def _check_model(config) -> None:
  if config.model.name != 'promlora':
    raise ConfigError(f'--format=promlora needs a ProMLoRA config (config.model.name promlora, '
                      f'e.g. configs/promlora_pascal.py), not {config.model.name!r}')


def from_torch(state_dict: Mapping[str, np.ndarray], config) -> dict[str, dict]:
  """The fork's ProMLoRA state dict -> {'params', 'batch_stats'} of the config's model (one
  ConfigError lists every missing, unexpected and mismatched key)."""
  _check_model(config)
  return mtlora.from_torch(state_dict, config)


def to_torch(weights: Mapping[str, Mapping], config) -> dict[str, np.ndarray]:
  """Inverse of `from_torch`: the fork's state dict (with relative_position_index buffers)."""
  _check_model(config)
  return mtlora.to_torch(weights, config)


def _convert(state_dict, config):
  weights = from_torch(state_dict, config)
  return weights['params'], weights['batch_stats'], {
      'dropped': sum(bool(mtlora.IGNORED.fullmatch(k)) for k in state_dict)}


FORMATS = {'promlora': _convert}


# -- parity (mtl_jax/tools/parity.py) --------------------------------------------------------------

def config_from_reference(config, sidecar: Mapping) -> ml_collections.ConfigDict:
  """The mtl_jax config of a ProMLoRA fixture sidecar (the MTLoRA family's, plus `prompt`)."""
  prompt = sidecar['prompt']
  errors = []
  for key, want in (('ENABLED', True), ('LOCATION', 'prepend'), ('DEEP', True),
                    ('INITIATION', 'random'), ('PROJECT', -1)):
    if prompt.get(key, want) != want:
      errors.append(f'prompt.{key}={prompt[key]!r} (only {want!r} is implemented)')
  if errors:
    raise ConfigError('fixture config not supported: ' + '; '.join(errors))
  config = mtlora.config_from_reference(config, {**sidecar, 'kind': 'mtlora'})
  config.model.name = 'promlora'
  dynamic = bool(prompt.get('DYNAMIC_PROMPT', False))
  pools = prompt.get('resolved_pool_sizes') or prompt.get('DEEP_PROMPT_POOL_SIZES') or [
      prompt.get('DEEP_PROMPT_POOL_SIZE', 0)]
  config.model.promlora = ml_collections.ConfigDict(dict(
      tokens=int(prompt['NUM_TOKENS']), shared_prompt=bool(prompt.get('SHARE_TASK_PROMPT')),
      dynamic=dynamic, pool_sizes=tuple(int(k) for k in pools) if dynamic else (),
      dropout=float(prompt.get('DROPOUT', 0.0)), location='prepend', deep=True,
      initiation='random', project=-1))
  config.frozen = promlora_model.frozen_patterns(
      lora_reduction='reduction' in config.model.mtlora.layers)
  return config


def reference_arrays(model, images_nchw: np.ndarray, config) -> dict[str, np.ndarray]:
  """`out/<task>` (B, K, H, W) and `feat/<task>/stage<i>` (B, h*w, C) of every task."""
  arrays = mtlora.reference_arrays(model, images_nchw, config)
  return {k: v for k, v in arrays.items() if not k.startswith('feat/shared/')}
