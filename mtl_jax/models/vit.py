"""The MLoRE ViT backbone: timm-style ViT without class token, 4 NHWC taps (docs/mlore.md §2).

- Patch embedding: p x p conv, stride p, with bias; tokens row-major (index y * w + x).
- `pos_embed` has N + 1 rows (row 0 is a vestigial class-token slot kept for weight loading);
  the forward adds rows 1..N. There is no class token in the sequence.
- Pre-norm blocks: x += DropPath(Attn(LN1(x))); x += DropPath(MLP(LN2(x))); LayerNorm eps 1e-6;
  one qkv Linear split (3, heads, head_dim); exact GELU MLP with ratio 4; drop-path rate of
  block i = drop_path_rate * i / (depth - 1).
- Taps: the raw residual stream after the blocks in `taps` (1-indexed, not normed) plus the final
  output after the final LayerNorm, each as a (B, h, w, D) map. Shipped configs tap 3 distinct
  blocks; a block listed twice is returned twice (lets tiny test configs keep 4 maps).

`dtype` is the computation dtype; parameters are always float32. `attention` picks how the
global attention is computed (ATTENTION_IMPLEMENTATIONS; docs/accelerators.md §3).
"""

import contextlib
import contextvars
from collections.abc import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl_jax import ConfigError
from mtl_jax.models import backbone
from mtl_jax.models import layers

# docs/mlore.md §2. 'tiny/16' is the reduced ViT of the golden fixtures (§10), for tests/demos.
VARIANTS = {
    'tiny/16': dict(patch_size=16, embed_dim=48, depth=8, num_heads=3, taps=(2, 4, 6)),
    'S/16': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, taps=(3, 6, 9)),
    'B/16': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, taps=(3, 6, 9)),
    'L/16': dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, taps=(6, 12, 18)),
}


def _linear(din: int, dout: int, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  """nn.Linear with timm ViT init: trunc_normal(.02) weight, zero bias (docs/mlore.md §3.6)."""
  return layers.linear(din, dout, kernel_init=layers.trunc_normal(0.02), dtype=dtype, rngs=rngs)


def _layer_norm(dim: int, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs)


# config.model.backbone.attention (docs/accelerators.md §3): 'auto' is the CPU form on the CPU
# backend, cuDNN's fused kernel on GPU for bf16/fp16 (head_dim a multiple of 8, at most 128), and
# XLA's composition of jax.nn.dot_product_attention otherwise; 'xla' and 'cudnn' force one.
ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'cudnn')
_FORCED = contextvars.ContextVar('mtl_jax_vit_attention', default=None)


def _requested(implementation: str) -> str:
  return _FORCED.get() or implementation


@contextlib.contextmanager
def attention_implementation(name: str):
  """Traces every ViT attention inside the block with `name`, whatever the model was built with
  (perf.py counts a GPU step's FLOPs on the 'xla' form: XLA counts none in a cuDNN call)."""
  token = _FORCED.set(name)
  try:
    yield
  finally:
    _FORCED.reset(token)


def resolve_attention(implementation: str, dtype, head_dim: int, backend: str | None = None) -> str:
  """'cpu', 'xla' or 'cudnn': what `implementation` (or a forced one) means for these operands."""
  implementation = _requested(implementation)
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ConfigError(f'unknown config.model.backbone.attention {implementation!r}; known: '
                      f'{", ".join(ATTENTION_IMPLEMENTATIONS)}')
  if implementation != 'auto':
    return implementation
  backend = backend or jax.default_backend()
  if backend == 'cpu':
    return 'cpu'
  fused_ok = (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
              and head_dim % 8 == 0 and head_dim <= 128)
  return 'cudnn' if backend == 'gpu' and fused_ok else 'xla'


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection (docs/mlore.md §2)."""

  def __init__(self, dim: int, num_heads: int, *, dtype, attention: str = 'auto',
               rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f'embed_dim {dim} is not divisible by num_heads {num_heads}')
    self.num_heads = num_heads
    self.attention = attention
    self.qkv = _linear(dim, 3 * dim, dtype, rngs)
    self.proj = _linear(dim, dim, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, heads, head_dim) each
    out = dot_product_attention(q, k, v, self.attention)  # softmax(q k^T / sqrt(hd)) v
    return self.proj(out.reshape(b, n, d))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          implementation: str = 'auto') -> jax.Array:
  """softmax(q k^T / sqrt(d)) v for (B, N, heads, d) q, k, v, as `jax.nn.dot_product_attention`.

  `implementation` as `resolve_attention`: 'cudnn' is that function's cuDNN fused kernel (GPU,
  docs/accelerators.md §3), 'xla' its XLA composition. 'cpu' computes the same function in
  fewer passes over the (N, N) logits (docs/stack.md §14): the scale multiplies q (exact for
  the power-of-two scales of head_dim 64 / 16 / 256), the row maximum is a constant under
  differentiation (softmax does not depend on it), and the normalisation divides the (N, d)
  output instead of the (N, N) probabilities, so the backward pass needs no reduction over the
  keys. Logits, exponentials and sums are float32, as in jax.
  """
  how = resolve_attention(implementation, q.dtype, q.shape[-1])
  if how == 'cudnn':
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')
    except (NotImplementedError, RuntimeError, ValueError) as e:  # checked while tracing
      if _requested(implementation) == 'cudnn':
        raise
      logging.log_first_n(logging.WARNING, 'cuDNN attention unavailable (%s); using XLA', 1, e)
      how = 'xla'
  if how == 'xla':
    return jax.nn.dot_product_attention(q, k, v, implementation='xla')
  f32 = jnp.float32
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum('bqhd,bkhd->bhqk', q * scale, k, preferred_element_type=f32)
  p = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  out = jnp.einsum('bhqk,bkhd->bqhd', p.astype(v.dtype), v, preferred_element_type=f32)
  return (out / jnp.sum(p, axis=-1).transpose(0, 2, 1)[..., None]).astype(v.dtype)


class Mlp(nnx.Module):
  """Linear D -> hidden, exact GELU, Linear hidden -> D."""

  def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
    self.fc1 = _linear(dim, hidden, dtype, rngs)
    self.fc2 = _linear(hidden, dim, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(layers.gelu(self.fc1(x)))


class Block(nnx.Module):
  """Pre-norm transformer block with per-sample stochastic depth (timm DropPath)."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, *, dtype,
               attention: str = 'auto', rngs: nnx.Rngs):
    self.norm1 = _layer_norm(dim, dtype, rngs)
    self.attn = Attention(dim, num_heads, dtype=dtype, attention=attention, rngs=rngs)
    self.norm2 = _layer_norm(dim, dtype, rngs)
    self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    # One mask per sample (broadcast over tokens and channels), kept samples scaled by 1/keep.
    self.drop_path = layers.DropPath(drop_path, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.drop_path(self.attn(self.norm1(x)))
    return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nnx.Module):
  """ViT returning `Features` of len(taps) + 1 maps (B, H/p, W/p, D) (docs/mlore.md §2).

  Build a shipped variant with `ViT(img_size, **VARIANTS['L/16'], rngs=rngs)`, or the configured
  one with `build(config, tasks, rngs=rngs)`.
  """

  task_symmetric = True  # models/multitask.py: no per-task leaves

  def __init__(self, img_size: tuple[int, int], patch_size: int, embed_dim: int, depth: int,
               num_heads: int, mlp_ratio: float = 4, taps: Sequence[int] = (3, 6, 9),
               drop_path_rate: float = 0.15, dtype=jnp.float32, remat: str = 'none',
               attention: str = 'auto', *, rngs: nnx.Rngs):
    img_h, img_w = img_size
    backbone.block_caller(remat)  # ConfigError for an unknown policy
    resolve_attention(attention, dtype, embed_dim // num_heads)  # ConfigError for an unknown one
    if img_h % patch_size or img_w % patch_size:
      raise ValueError(f'img_size {tuple(img_size)} is not divisible by patch_size {patch_size}; '
                       'set config.input.crop_size to a multiple of it')
    taps = tuple(taps)
    if list(taps) != sorted(taps) or not all(1 <= t < depth for t in taps):
      raise ValueError(f'taps {taps} must be non-decreasing block numbers in [1, {depth - 1}] '
                       '(1-indexed; the final block is always tapped after the final norm)')
    self.grid = (img_h // patch_size, img_w // patch_size)
    self.embed_dim = embed_dim
    self.taps = taps
    self.dtype = dtype
    self.remat = remat
    self.patch_embed = layers.conv(3, embed_dim, patch_size, stride=patch_size, dtype=dtype,
                                   rngs=rngs)
    num_patches = self.grid[0] * self.grid[1]
    self.pos_embed = nnx.Param(
        layers.trunc_normal(0.02)(rngs.params(), (1, num_patches + 1, embed_dim)))
    self.blocks = nnx.List([
        Block(embed_dim, num_heads, mlp_ratio, float(rate), dtype=dtype, attention=attention,
              rngs=rngs)
        for rate in np.linspace(0.0, drop_path_rate, depth)])
    self.norm = _layer_norm(embed_dim, dtype, rngs)
    self.stage_dims = (embed_dim,) * (len(taps) + 1)  # the backbone contract (backbone.py)
    self.stage_grids = (self.grid,) * (len(taps) + 1)

  def __call__(self, images: jax.Array) -> backbone.Features:
    """images (B, H, W, 3) -> maps [taps..., final normed], each (B, h, w, D)."""
    x = self.patch_embed(images.astype(self.dtype))
    b, h, w, d = x.shape
    if (h, w) != self.grid:
      raise ValueError(f'input {images.shape[1:3]} gives a {h}x{w} token grid, but the model was '
                       f'built for {self.grid} (pos_embed size); resize or pad the input')
    x = x.reshape(b, h * w, d) + self.pos_embed[:, 1:].astype(self.dtype)
    features, call = [], backbone.block_caller(self.remat)
    for i, block in enumerate(self.blocks, start=1):
      x = call(block, x)
      features += [x] * self.taps.count(i)  # a repeated tap (tiny smoke configs) repeats x
    features.append(self.norm(x))
    return backbone.Features(tuple(f.reshape(b, h, w, d) for f in features))


_EXPLICIT = ('patch_size', 'embed_dim', 'depth', 'num_heads', 'taps')


def arch(cfg) -> dict:
  """ViT sizes of `config.model.backbone`: VARIANTS[cfg.variant], or the explicit keys."""
  return backbone.variant_arch(cfg, VARIANTS, _EXPLICIT, 'the ViT')


def build(config, tasks=None, *, rngs: nnx.Rngs) -> ViT:
  """The ViT of `config.model.backbone` (variant or explicit sizes, drop_path_rate, remat,
  attention) for `config.input.crop_size` and `config.model.dtype`; `tasks` is unused."""
  del tasks
  return ViT(tuple(config.input.crop_size), **arch(config.model.backbone),
             drop_path_rate=config.model.backbone.drop_path_rate,
             remat=config.model.backbone.get('remat', 'none'),
             attention=config.model.backbone.get('attention', 'auto'),
             dtype=jnp.dtype(config.model.dtype), rngs=rngs)
