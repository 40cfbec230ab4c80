"""ProMLoRA, the user fork's method: shared LoRA + deep per-task prompts (docs/user_fork.md §2).

The backbone is the MTLoRA Swin (swin.py) with task-agnostic LoRA only (SHARED_MODE 'lora_only':
`mtlora.placement` gives no TS-LoRA) and, per task, T prompt tokens in front of the image tokens
of every block (VPT-deep, LOCATION 'prepend'):

* a shallow prompt P0_t (1, T, C_0) for stage 0 block 0 and deep prompts D_{t,s} (n_s, T, C_s)
  for every other block (n_0 = d_0 - 1, n_s = d_s); all U(-v, v), v = sqrt(6 / (3 p^2 + C_0));
* each block LayerNorms the prompts with norm1 and every window's queries attend to the T prompt
  keys / values as well as the window's own, with zero relative-position bias and zero shift mask
  on the prompt columns; the rest of the block is the plain Swin block on the image tokens;
* the heads get each task's stage maps (prompt tokens dropped) and the HRNet decoder of
  mtlora.py.

Exact simplification (docs/user_fork.md §2): the fork replaces the prompt tokens at every block
and image tokens only read them, so nothing computed *at* prompt positions (their queries,
window-averaged attention outputs, MLP, PatchMerging) reaches an output. Here the prompt keys /
values are computed once per block and prompt set, shared by all windows and images, and the
backbone runs once over a (prompt sets x batch) stack: `G` groups of the batch, group g with
prompt set g (one per task; one in all with `shared_prompt`, whose per-task passes the fork runs
but which are identical). tests/test_promlora.py checks this against the literal formulation.

Training-mode deviations (eval is exact): the fork's LoRA dropout draws an independent mask for
every window copy of the prompt tokens and its prompt dropout (PROMPT.DROPOUT, 0 in every user
config) one mask per image for the shallow prompt; here both draw one mask per prompt set and
block, shared by the windows and images of the group. Drop-path and the image tokens' LoRA
dropout draw per (task, image), as the fork's separate passes do.

Variants (config.model.promlora, the fork's MODEL.PROMPT.* names in brackets):
  tokens [NUM_TOKENS]: T.
  shared_prompt [SHARE_TASK_PROMPT]: one prompt set, key 'shared'.
  dynamic [DYNAMIC_PROMPT] with pool_sizes [DEEP_PROMPT_POOL_SIZES, or one value:
    DEEP_PROMPT_POOL_SIZE; 0 = T]: the fork's later version: per stage a pool (n_s, K_s, C_s) and
    gates (n_s, tasks, T, K_s) whose logits start one-hot at pool index (token + task) mod K_s;
    the prompt of task t, block b is sum_k softmax_k(gates[b, t, :, k]) pool[b, k]. The shallow
    prompt stays per task.
  dropout [DROPOUT]: dropout on the prompts before use (stream 'dropout').
  location [LOCATION] 'prepend', deep [DEEP] True, initiation [INITIATION] 'random', project
    [PROJECT] -1 are the only implemented values; others are a ConfigError.
  Prompt-only VPT-deep (the fork's vpt_deep_*): config.model.mtlora.rank = 0.
The fork's state dict holds a final `backbone.norm` its forward never uses and its recipe trains;
it is kept (`PromptedSwin.norm`) so checkpoints round-trip and parameter counts match.

Conversion of the fork's checkpoints: mtl_jax/convert/promlora.py.
"""

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtl_jax import ConfigError
from mtl_jax.models import backbone as backbone_lib
from mtl_jax.models import mtlora
from mtl_jax.models import swin
from mtl_jax.tasks import Task


def prompt_bound(patch_size: int, embed_dim: int) -> float:
  """v of the prompts' U(-v, v) init: sqrt(6 / (3 p^2 + C_0)) (the same for every stage)."""
  return math.sqrt(6.0 / (3 * patch_size ** 2 + embed_dim))


def prompt_blocks(depths: Sequence[int]) -> tuple[int, ...]:
  """Deep prompts per stage: stage 0 block 0 takes the shallow prompt."""
  return tuple(d - 1 if s == 0 else d for s, d in enumerate(depths))


def gate_init(blocks: int, num_tasks: int, tokens: int, pool: int) -> jax.Array:
  """(blocks, tasks, T, K) gate logits, one-hot at pool index (token + task) mod K."""
  index = (jnp.arange(tokens)[None, :] + jnp.arange(num_tasks)[:, None]) % pool
  return jnp.broadcast_to(jax.nn.one_hot(index, pool), (blocks, num_tasks, tokens, pool))


class PromptedSwin(swin.SwinTransformer):
  """The ProMLoRA backbone: images (B, H, W, 3) -> `Features` with every task's stage maps in
  `task_maps` (with `shared_prompt`: the one pass in `maps`, no task maps); without a shared
  pass, `maps` holds the first task's maps (their shapes are every task's)."""

  def __init__(self, img_size: tuple[int, int], *, tasks: Sequence[str], tokens: int,
               shared_prompt: bool = False, pool_sizes: Sequence[int] | None = None,
               dropout: float = 0.0, rngs: nnx.Rngs, **swin_kwargs):
    if tokens < 1:
      raise ConfigError(f'config.model.promlora.tokens={tokens}: ProMLoRA needs at least one '
                        'prompt token')
    super().__init__(img_size, rngs=rngs, **swin_kwargs)
    patch_size = swin_kwargs.get('patch_size', 4)
    embed_dim = swin_kwargs.get('embed_dim', 96)
    depths = tuple(swin_kwargs.get('depths', (2, 2, 6, 2)))
    self.tasks = tuple(tasks)
    self.keys = ('shared',) if shared_prompt else self.tasks
    self.num_tokens = tokens
    bound = prompt_bound(patch_size, embed_dim)
    init = lambda shape: jax.random.uniform(rngs.params(), shape, minval=-bound, maxval=bound)
    dims = [embed_dim * 2 ** s for s in range(len(depths))]
    blocks = prompt_blocks(depths)
    self.prompt_embeddings = nnx.Dict({k: nnx.Param(init((1, tokens, embed_dim)))
                                       for k in self.keys})
    self.dynamic = pool_sizes is not None
    # The gates stack every task on one axis, so a task's map is not its name's (multitask.py).
    self.task_symmetric = not self.dynamic
    if self.dynamic:
      self.deep_prompt_pools = nnx.List([nnx.Param(init((n, k, d)))
                                         for n, k, d in zip(blocks, pool_sizes, dims)])
      self.deep_prompt_gates = nnx.List([nnx.Param(gate_init(n, len(self.tasks), tokens, k))
                                         for n, k in zip(blocks, pool_sizes)])
    else:
      self.deep_prompt_embeddings = nnx.List([
          nnx.Dict({k: nnx.Param(init((n, tokens, d))) for k in self.keys})
          for n, d in zip(blocks, dims)])
    self.prompt_dropout = nnx.Dropout(dropout, rngs=rngs)
    # The fork's unused final LayerNorm (kept for checkpoints and counts, module docstring).
    self.norm = swin.layer_norm(dims[-1], self.dtype, rngs)

  def deep_prompts(self, stage: int) -> jax.Array:
    """(G, n_s, T, C_s): the deep prompts of `stage` for every prompt set."""
    if self.dynamic:
      gates = jax.nn.softmax(self.deep_prompt_gates[stage][...], axis=-1)
      return jnp.einsum('btpk,bkd->tbpd', gates, self.deep_prompt_pools[stage][...])
    return jnp.stack([self.deep_prompt_embeddings[stage][k][...] for k in self.keys])

  def __call__(self, images: jax.Array) -> backbone_lib.Features:
    if tuple(images.shape[1:3]) != self.img_size:
      raise ValueError(f'input size {tuple(images.shape[1:3])} does not match the model '
                       f'({self.img_size}); resize the input or rebuild for that size')
    x = self.patch_embed(images.astype(self.dtype))
    b, g = x.shape[0], len(self.keys)
    x = jnp.broadcast_to(x[None], (g, *x.shape)).reshape(g * b, *x.shape[1:])
    shallow = jnp.concatenate([self.prompt_embeddings[k][...] for k in self.keys])  # (G, T, C0)
    maps = []
    for s, stage in enumerate(self.layers):
      deep = self.prompt_dropout(self.deep_prompts(s).astype(self.dtype))
      prompts = [deep[:, j] for j in range(deep.shape[1])]
      if s == 0:
        prompts.insert(0, self.prompt_dropout(shallow.astype(self.dtype)))
      x, _ = stage(x, prompts)
      maps.append(x.reshape(g, b, *x.shape[1:]))
    if self.keys == ('shared',):
      return backbone_lib.Features(tuple(m[0] for m in maps), tuple({} for _ in maps))
    return backbone_lib.Features(tuple(m[0] for m in maps),
                                 tuple({t: m[i] for i, t in enumerate(self.tasks)} for m in maps))


_IMPLEMENTED = {'location': 'prepend', 'deep': True, 'initiation': 'random', 'project': -1}


def pool_sizes(cfg, depths: Sequence[int]) -> tuple[int, ...] | None:
  """Per-stage pool sizes K_s of config.model.promlora (None: static prompts)."""
  if not cfg.dynamic:
    return None
  if cfg.shared_prompt:
    raise ConfigError('config.model.promlora.dynamic needs per-task prompts (the fork rejects '
                      'DYNAMIC_PROMPT with SHARE_TASK_PROMPT); unset shared_prompt')
  sizes = tuple(int(k) for k in cfg.pool_sizes) or (0,)
  if len(sizes) == 1:
    sizes *= len(depths)
  if len(sizes) != len(depths) or min(sizes) < 0:
    raise ConfigError(f'config.model.promlora.pool_sizes={tuple(cfg.pool_sizes)} needs 1 or '
                      f'{len(depths)} (one per stage) sizes >= 0 (0 = tokens)')
  return tuple(k or int(cfg.tokens) for k in sizes)


def build_backbone(config, tasks: Mapping[str, Task], *, rngs: nnx.Rngs) -> PromptedSwin:
  """The ProMLoRA backbone of config.model.{backbone, mtlora, promlora}; ConfigError names an
  unimplemented option."""
  cfg = config.model.promlora
  for key, value in _IMPLEMENTED.items():
    if cfg[key] != value:
      raise ConfigError(f'config.model.promlora.{key}={cfg[key]!r} is not implemented (only '
                        f'{value!r}, the fork\'s deep prepended prompts); set it to {value!r}')
  if config.model.mtlora.shared_mode != 'lora_only':
    raise ConfigError(f'config.model.mtlora.shared_mode={config.model.mtlora.shared_mode!r}: '
                      "ProMLoRA is implemented with 'lora_only' (prompts + TS-LoRA, the fork's "
                      "mtlora_vpt_*, is not); set it to 'lora_only'")
  arch = swin.arch(config.model.backbone)
  return PromptedSwin(
      tuple(config.input.crop_size), tasks=list(tasks), tokens=int(cfg.tokens),
      shared_prompt=bool(cfg.shared_prompt), pool_sizes=pool_sizes(cfg, arch['depths']),
      dropout=float(cfg.dropout), make_linear=mtlora.placement(config, list(tasks),
                                                               arch['depths']),
      dtype=jnp.dtype(config.model.dtype), rngs=rngs, **arch)


PROMPT_NAMES = ('prompt_embeddings', 'deep_prompt_embeddings', 'deep_prompt_pools',
                'deep_prompt_gates')


def frozen_patterns(*, freeze_patch_embed: bool = False, freeze_layer_norm: bool = False,
                    freeze_downsample_reduction: bool = False,
                    freeze_relative_position_bias: bool = False,
                    lora_reduction: bool = False) -> tuple[str, ...]:
  """`config.frozen` of the fork's ProMLoRA recipe (docs/user_fork.md §2 "Trainable set").

  A backbone parameter trains if its path contains `lora_`, a prompt name (`PROMPT_NAMES`),
  `patch_embed` (unless TRAIN.FREEZE_PATCH_EMBED), `norm` (every LayerNorm, unless
  TRAIN.FREEZE_LAYER_NORM), `downsample/reduction` (unless TRAIN.FREEZE_DOWNSAMPLE_REDUCTION or
  LoRA on the reductions) or `relative_position_bias_table` (unless
  TRAIN.FREEZE_RELATIVE_POSITION_BIAS); the pretrained qkv / proj / fc1 / fc2 stay frozen. The
  per-task downsamplers and heads train.
  """
  keep = ['lora_', *PROMPT_NAMES]
  for name, frozen in (('patch_embed', freeze_patch_embed), ('norm', freeze_layer_norm),
                       ('downsample/reduction', freeze_downsample_reduction or lora_reduction),
                       ('relative_position_bias_table', freeze_relative_position_bias)):
    if not frozen:
      keep.append(name)
  return (rf'^backbone/(?!.*({"|".join(keep)}))',)
