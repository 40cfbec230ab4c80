"""The backbone contract: what every backbone gives the decoders (docs/extending.md).

A backbone is an `nnx.Module` built by its family's `build(config, tasks, *, rngs)` (vit.py,
swin.py) with two static attributes, known before any forward:

  stage_dims:  (C_0, ..., C_{S-1}) channels of the S feature maps it returns;
  stage_grids: ((h_0, w_0), ...) their spatial sizes for the configured input size;

and `__call__(images (B, H, W, 3)) -> Features`. Decoders are built from `stage_dims` /
`stage_grids` alone and read `Features` alone, so a decoder runs on any backbone whose stages
it accepts (MLoRE on Swin, say) without knowing which backbone it is.
"""

from collections.abc import Mapping, Sequence

import flax
from flax import nnx
import jax

from mtl_jax import ConfigError


@flax.struct.dataclass
class Features:
  """Multi-scale output of a backbone.

  maps: S shared maps, NHWC, (B, h_s, w_s, C_s), in stage order.
  task_maps: per stage, {task: task-specific map of the same shape} for the tasks that have
    their own stream at that stage (MTLoRA's TS-LoRA); empty dicts when there are none.
  """
  maps: tuple[jax.Array, ...]
  task_maps: tuple[dict[str, jax.Array], ...] = ()

  # A sequence of the shared maps: len(f), f[s], iteration.
  def __len__(self) -> int:
    return len(self.maps)

  def __getitem__(self, stage):
    return self.maps[stage]

  def __iter__(self):
    return iter(self.maps)

  def for_task(self, task: str) -> tuple[jax.Array, ...]:
    """The S maps task `task` sees: its own stream where it has one, else the shared map."""
    streams = self.task_maps or ({},) * len(self.maps)
    return tuple(s.get(task, m) for m, s in zip(self.maps, streams))


def variant_arch(cfg, variants: Mapping[str, Mapping], explicit: Sequence[str],
                 family: str) -> dict:
  """Constructor sizes of `config.model.backbone`: the `variants[cfg.variant]` entry, or, when
  `variant` is empty, the keys `explicit` of `cfg`. ConfigError for an unknown variant."""
  variant = cfg.get('variant')
  if variant:
    if variant not in variants:
      raise ConfigError(f'unknown config.model.backbone.variant {variant!r} for {family}; known: '
                        f'{", ".join(variants)} (or leave it empty and set '
                        f'{", ".join(explicit)})')
    return dict(variants[variant])
  return {k: cfg[k] for k in explicit}


# config.model.backbone.remat: how the backbone's blocks are rematerialised in the backward pass.
REMAT_POLICIES = {
    'none': None,  # autodiff keeps whatever XLA needs
    # Each block under jax.checkpoint, saving the outputs of its weight matmuls (maxtext's
    # 'minimal'): LayerNorm, GELU, softmax, dropout and the attention matrices are recomputed.
    'blocks': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Each block under jax.checkpoint, saving only its input: the whole block is recomputed.
    'full': jax.checkpoint_policies.nothing_saveable,
}


def block_caller(remat: str):
  """`call(block, *args) -> block(*args)` under the `remat` policy (REMAT_POLICIES): the same
  function, traded memory for recomputation. ConfigError for an unknown policy."""
  if remat not in REMAT_POLICIES:
    raise ConfigError(f'unknown config.model.backbone.remat {remat!r}; known: '
                      f'{", ".join(REMAT_POLICIES)}')
  call = lambda block, *args: block(*args)  # noqa: E731
  if remat == 'none':
    return call
  return nnx.remat(call, policy=REMAT_POLICIES[remat])
