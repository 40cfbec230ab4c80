"""Swin Transformer backbone as used by MTLoRA (docs/mtlora.md §1; Swin-B: docs/user_fork.md §5).

- Patch embedding: p x p conv, stride p, with bias, then LayerNorm; tokens row-major. No absolute
  position embedding, no final LayerNorm, no classifier.
- Pre-norm blocks on (B, H, W, C) maps: x += DropPath(W-MSA(LN1(x))); x += DropPath(MLP(LN2(x))).
  Odd blocks of a stage shift by window // 2: roll by (-s, -s) before the window partition and by
  (+s, +s) after the reverse, and add the -100 mask of the 9 regions (`shift_mask`, recomputed
  from geometry). Windows are (B, nW, N, C) with window id = row-block * (W / ws) + col-block.
  A stage whose grid is at most the window uses one window of the grid size and no shift.
- Attention: qkv channels [q | k | v], head-major; q scaled by head_dim^-0.5 before q k^T; the
  relative position bias table[(dr + ws - 1) * (2 ws - 1) + (dc + ws - 1), head].
- PatchMerging: concat x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2] on channels,
  LayerNorm(4C), Linear(4C -> 2C) without bias. It ends stages 0..n-2.
- Output: per stage, the map after that stage's PatchMerging: dims [2C, 4C, 8C, 8C].
- LayerNorm eps 1e-5, exact GELU, drop-path rates linspace(0, rate, sum(depths)) (stream
  'dropout').

The Linear layers are made by a factory `make_linear(name, in, out, *, stage, block, use_bias,
dtype, rngs)` (name in 'qkv', 'proj', 'fc1', 'fc2', 'reduction'; block None for 'reduction');
`plain_linear` gives the plain Swin, mtlora.py places `lora.MTLoRALinear`s. When a block's
`attn.proj` returns task outputs, the block also returns task streams (docs/mtlora.md §2.2): each
task's proj output gets the same residual, LN2 and MLP (fc1/fc2 called with the task inputs),
and the stage's PatchMerging maps every stream. Every stage returns (shared map, {task: map});
the task streams are those of fc2 in the stage's last block (none if fc2 gives none).

Parameter paths mirror the torch names (`layers/0/blocks/1/attn/qkv/...`); `dtype` is the
computation dtype, parameters are float32.
"""

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl_jax import ConfigError
from mtl_jax.models import backbone
from mtl_jax.models import layers
from mtl_jax.models import lora

# Swin-T/S/B (patch 4, window 7, MLP ratio 4); 'tiny' = the reduced structure of the golden
# fixtures (docs/mtlora.md §10: patch 2 keeps the real 4-stage token grids at 224).
VARIANTS = {
    'T': dict(patch_size=4, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
              window_size=7),
    'S': dict(patch_size=4, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24),
              window_size=7),
    'B': dict(patch_size=4, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
              window_size=7),
    'tiny': dict(patch_size=2, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16),
                 window_size=7),
}

Streams = tuple[jax.Array, dict[str, jax.Array]]  # (shared, {task: task stream})


def plain_linear(name: str, in_features: int, out_features: int, *, stage: int,
                 block: int | None, use_bias: bool = True, dtype=jnp.float32,
                 rngs: nnx.Rngs) -> nnx.Linear:
  """The `make_linear` of the plain Swin: an nn.Linear everywhere."""
  del name, stage, block
  return lora.base_linear(in_features, out_features, use_bias=use_bias, dtype=dtype, rngs=rngs)


def apply_linear(layer: nnx.Module, x: jax.Array, x_tasks: Mapping[str, jax.Array] | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(y, {task: y_task}) of an MTLoRALinear, (y, {}) of a plain Linear."""
  if isinstance(layer, lora.MTLoRALinear):
    return layer(x, x_tasks)
  return layer(x), {}


def layer_norm(dim: int, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, dtype=dtype, rngs=rngs)


# -- window geometry -------------------------------------------------------------------------------

def window_partition(x, ws: int):
  """(B, H, W, C) -> (B, H/ws * W/ws, ws * ws, C); windows in row-major block order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // ws) * (w // ws), ws * ws, c)


def window_reverse(windows, ws: int, h: int, w: int):
  """Inverse of `window_partition`: (B, nW, ws * ws, C) -> (B, H, W, C)."""
  b, _, _, c = windows.shape
  x = windows.reshape(b, h // ws, w // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


@functools.cache
def relative_position_index(ws: int) -> np.ndarray:
  """(N, N) int index into the (2 ws - 1)^2-row bias table; N = ws * ws (mtlora.md §1.3)."""
  coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing='ij')).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :]
  index = (rel[0] + ws - 1) * (2 * ws - 1) + (rel[1] + ws - 1)
  index.flags.writeable = False
  return index


@functools.cache
def shift_mask(h: int, w: int, ws: int, shift: int) -> np.ndarray:
  """(nW, N, N) float32 mask of shifted windows: 0 within a region, -100 across (§1.3)."""
  def regions(n):  # [0, n - ws) -> 0, [n - ws, n - shift) -> 1, [n - shift, n) -> 2
    r = np.zeros(n, np.int64)
    r[n - ws:n - shift] = 1
    r[n - shift:] = 2
    return r

  label = 3 * regions(h)[:, None] + regions(w)[None, :]
  label = window_partition(label[None, :, :, None], ws)[0, :, :, 0]  # (nW, N)
  mask = np.where(label[:, :, None] == label[:, None, :], 0.0, -100.0).astype(np.float32)
  mask.flags.writeable = False
  return mask


def block_window(resolution: tuple[int, int], window_size: int, shift: int) -> tuple[int, int]:
  """(window, shift) of a block: a grid of at most the window gets one unshifted window."""
  if min(resolution) <= window_size:
    return min(resolution), 0
  return window_size, shift


def _check_geometry(img_size: tuple[int, int], patch_size: int, window_size: int,
                    num_stages: int) -> list[tuple[int, int]]:
  """Token grid of every stage; ConfigError unless patches, merges and windows tile exactly."""
  unit = patch_size * 2 ** (num_stages - 1)
  if img_size[0] % unit or img_size[1] % unit:
    raise ConfigError(f'input size {img_size} is not divisible by patch_size * 2^{num_stages - 1}'
                      f' = {unit} (the patch embedding and {num_stages - 1} PatchMergings); set '
                      'config.input.crop_size to a multiple of it')
  grids = [(img_size[0] // unit * 2 ** (num_stages - 1 - i),
            img_size[1] // unit * 2 ** (num_stages - 1 - i)) for i in range(num_stages)]
  for i, (h, w) in enumerate(grids):
    ws, _ = block_window((h, w), window_size, 0)
    if h % ws or w % ws:
      raise ConfigError(f'input size {img_size} gives a {h}x{w} token grid at stage {i}, not a '
                        f'multiple of the window {ws}; set config.input.crop_size so that every '
                        'stage grid is a multiple of the window (or at most the window)')
  return grids


# -- modules ---------------------------------------------------------------------------------------

class PatchEmbed(nnx.Module):
  """p x p conv (stride p, bias) -> LayerNorm; torch `patch_embed.{proj,norm}`."""

  def __init__(self, patch_size: int, embed_dim: int, *, dtype, rngs: nnx.Rngs):
    self.proj = layers.conv(3, embed_dim, patch_size, stride=patch_size, dtype=dtype, rngs=rngs)
    self.norm = layer_norm(embed_dim, dtype, rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.norm(self.proj(images))


class WindowAttention(nnx.Module):
  """W-MSA with relative position bias (and the shift mask) on (B, nW, N, C) windows."""

  def __init__(self, dim: int, num_heads: int, window_size: int, *, qkv: nnx.Module,
               proj: nnx.Module, dtype, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f'dim {dim} is not divisible by num_heads {num_heads}')
    self.num_heads = num_heads
    self.window_size = window_size
    self.dtype = dtype
    self.relative_position_bias_table = nnx.Param(
        layers.trunc_normal(0.02)(rngs.params(), ((2 * window_size - 1) ** 2, num_heads)))
    self.qkv = qkv
    self.proj = proj

  def prompt_kv(self, prompts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values (G, T, heads, hd) of (already normed) prompt tokens (G, T, C)."""
    g, t, c = prompts.shape
    qkv, _ = apply_linear(self.qkv, prompts)
    qkv = qkv.reshape(g, t, 3, self.num_heads, c // self.num_heads)
    return qkv[:, :, 1], qkv[:, :, 2]

  def __call__(self, windows: jax.Array, mask: np.ndarray | None = None,
               prompt_kv: tuple[jax.Array, jax.Array] | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`prompt_kv` (ProMLoRA, promlora.py): (k, v) of G prompt sets (`prompt_kv`); the batch is
    G groups of B / G images and every window of group g also attends to group g's T prompt
    keys, with zero bias and zero mask (docs/user_fork.md §2)."""
    b, nw, n, c = windows.shape
    qkv, _ = apply_linear(self.qkv, windows)
    qkv = qkv.reshape(b, nw, n, 3, self.num_heads, c // self.num_heads)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # (B, nW, N, heads, hd)
    q = q * (c // self.num_heads) ** -0.5
    logits = jnp.einsum('bwqhd,bwkhd->bwhqk', q, k)
    index = relative_position_index(self.window_size).reshape(-1)
    bias = self.relative_position_bias_table[...][index].reshape(n, n, self.num_heads)
    logits = logits + bias.transpose(2, 0, 1).astype(logits.dtype)
    if mask is not None:
      logits = logits + jnp.asarray(mask, logits.dtype)[:, None]
    if prompt_kv is None:
      attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
      out = jnp.einsum('bwhqk,bwkhd->bwqhd', attn, v)
    else:
      k_p, v_p = prompt_kv
      g, t = k_p.shape[:2]
      q = q.reshape(g, b // g, nw, n, self.num_heads, c // self.num_heads)
      logits_p = jnp.einsum('gbwqhd,gkhd->gbwhqk', q, k_p).reshape(b, nw, self.num_heads, n, t)
      attn = jax.nn.softmax(jnp.concatenate([logits_p, logits], -1).astype(jnp.float32),
                            axis=-1).astype(v.dtype)
      attn_p = attn[..., :t].reshape(g, b // g, nw, self.num_heads, n, t)
      out_p = jnp.einsum('gbwhqk,gkhd->gbwqhd', attn_p, v_p).reshape(v.shape)
      out = out_p + jnp.einsum('bwhqk,bwkhd->bwqhd', attn[..., t:], v)
    return apply_linear(self.proj, out.reshape(b, nw, n, c))


class Mlp(nnx.Module):
  """fc1 -> exact GELU -> fc2, on the shared stream and (if given) the task streams."""

  def __init__(self, fc1: nnx.Module, fc2: nnx.Module):
    self.fc1 = fc1
    self.fc2 = fc2

  def __call__(self, x: jax.Array, x_tasks: Mapping[str, jax.Array] | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    h, h_tasks = apply_linear(self.fc1, x, x_tasks)
    h_tasks = {t: layers.gelu(v) for t, v in h_tasks.items()}
    return apply_linear(self.fc2, layers.gelu(h), h_tasks or None)


class SwinBlock(nnx.Module):
  """Swin block on (B, H, W, C); returns (shared, {task: stream}) (mtlora.md §1.3, §2.2)."""

  def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, window_size: int,
               shift: int, mlp_ratio: float, drop_path: float, *,
               linear: Callable[..., nnx.Module], dtype, rngs: nnx.Rngs):
    self.resolution = tuple(resolution)
    self.window_size, self.shift = block_window(self.resolution, window_size, shift)
    hidden = int(dim * mlp_ratio)
    self.norm1 = layer_norm(dim, dtype, rngs)
    self.attn = WindowAttention(dim, num_heads, self.window_size, qkv=linear('qkv', dim, 3 * dim),
                                proj=linear('proj', dim, dim), dtype=dtype, rngs=rngs)
    self.norm2 = layer_norm(dim, dtype, rngs)
    self.mlp = Mlp(linear('fc1', dim, hidden), linear('fc2', hidden, dim))
    # timm DropPath: one mask per sample, kept samples scaled by 1 / keep; a fresh mask per call.
    self.drop_path = layers.DropPath(drop_path, rngs=rngs)

  def __call__(self, x: jax.Array, prompts: jax.Array | None = None) -> Streams:
    """`prompts` (G, T, C): ProMLoRA's deep prompts of this block for G groups of the batch
    (WindowAttention); they are LayerNorm'd with norm1 like the image tokens."""
    (h, w), ws, s = self.resolution, self.window_size, self.shift
    y = self.norm1(x)
    if s:
      y = jnp.roll(y, (-s, -s), axis=(1, 2))
    prompt_kv = None if prompts is None else self.attn.prompt_kv(self.norm1(prompts))
    out, out_tasks = self.attn(window_partition(y, ws), shift_mask(h, w, ws, s) if s else None,
                               prompt_kv)

    def to_map(windows):
      windows = window_reverse(windows, ws, h, w)
      return jnp.roll(windows, (s, s), axis=(1, 2)) if s else windows

    a = x + self.drop_path(to_map(out))
    a_tasks = {t: x + self.drop_path(to_map(o)) for t, o in out_tasks.items()}
    m, m_tasks = self.mlp(self.norm2(a), {t: self.norm2(v) for t, v in a_tasks.items()} or None)
    # Without proj task streams (proj has no TS-LoRA) the reference emits fc2's task outputs
    # without a residual (MTLoRA repo: swin_transformer_mtlora.py SwinTransformerBlock.forward).
    return a + self.drop_path(m), {t: a_tasks.get(t, 0.0) + self.drop_path(v)
                                   for t, v in m_tasks.items()}


class PatchMerging(nnx.Module):
  """2x2 neighbourhood concat (x0, x1, x2, x3) -> LayerNorm(4C) -> reduction 4C -> 2C."""

  def __init__(self, dim: int, *, reduction: nnx.Module, dtype, rngs: nnx.Rngs):
    self.norm = layer_norm(4 * dim, dtype, rngs)
    self.reduction = reduction

  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                        axis=-1)
    return apply_linear(self.reduction, self.norm(x))[0]


class SwinStage(nnx.Module):
  """`depth` blocks (shift on odd ones), then PatchMerging on every stream (torch BasicLayer)."""

  def __init__(self, dim: int, resolution: tuple[int, int], depth: int, num_heads: int,
               window_size: int, mlp_ratio: float, drop_path: tuple[float, ...],
               merge: bool, *, stage: int, make_linear: Callable[..., nnx.Module], dtype,
               remat: str = 'none', rngs: nnx.Rngs):
    self.remat = remat
    self.blocks = nnx.List([
        SwinBlock(dim, resolution, num_heads, window_size, 0 if j % 2 == 0 else window_size // 2,
                  mlp_ratio, drop_path[j],
                  linear=functools.partial(make_linear, stage=stage, block=j, dtype=dtype,
                                           rngs=rngs),
                  dtype=dtype, rngs=rngs)
        for j in range(depth)])
    self.downsample = PatchMerging(
        dim, reduction=make_linear('reduction', 4 * dim, 2 * dim, stage=stage, block=None,
                                   use_bias=False, dtype=dtype, rngs=rngs),
        dtype=dtype, rngs=rngs) if merge else None

  def __call__(self, x: jax.Array, prompts: Sequence[jax.Array] | None = None) -> Streams:
    """`prompts`: one (G, T, C) prompt set per block (ProMLoRA) or None."""
    call = backbone.block_caller(self.remat)
    for j, block in enumerate(self.blocks):  # only the last block's task streams are kept
      x, x_tasks = call(block, x, None if prompts is None else prompts[j])  # (mtlora.md §2.2)
    if self.downsample is not None:
      x = self.downsample(x)
      x_tasks = {t: self.downsample(v) for t, v in x_tasks.items()}
    return x, x_tasks


class SwinTransformer(nnx.Module):
  """Swin backbone: images (B, H, W, 3) -> `Features`: per stage the shared (B, h, w, C) map and
  {task: map} of the task streams (backbone.py).

  Build a shipped variant with `SwinTransformer(img_size, **VARIANTS['T'], rngs=rngs)`. The
  input size is fixed at construction (the reference asserts it; masks depend on it).
  """

  task_symmetric = True  # models/multitask.py: TS-LoRA leaves are keyed by task

  def __init__(self, img_size: tuple[int, int], *, patch_size: int = 4, embed_dim: int = 96,
               depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size: int = 7,
               mlp_ratio: float = 4.0, drop_path_rate: float = 0.2,
               make_linear: Callable[..., nnx.Module] = plain_linear, dtype=jnp.float32,
               remat: str = 'none', rngs: nnx.Rngs):
    backbone.block_caller(remat)  # ConfigError for an unknown policy
    if len(depths) != len(num_heads):
      raise ValueError(f'depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length')
    self.img_size = tuple(img_size)
    self.dtype = dtype
    n = len(depths)
    grids = _check_geometry(self.img_size, patch_size, window_size, n)
    self.patch_embed = PatchEmbed(patch_size, embed_dim, dtype=dtype, rngs=rngs)
    rates = [float(r) for r in np.linspace(0.0, drop_path_rate, sum(depths))]
    self.layers = nnx.List([
        SwinStage(embed_dim * 2 ** i, grids[i], depth, heads, window_size, mlp_ratio,
                  tuple(rates[sum(depths[:i]):sum(depths[:i + 1])]), i < n - 1, stage=i,
                  make_linear=make_linear, dtype=dtype, remat=remat, rngs=rngs)
        for i, (depth, heads) in enumerate(zip(depths, num_heads))])
    self.dims = tuple(embed_dim * 2 ** min(i + 1, n - 1) for i in range(n))
    self.stage_dims = self.dims  # the backbone contract (backbone.py): after each PatchMerging
    self.stage_grids = tuple(grids[min(i + 1, n - 1)] for i in range(n))

  def __call__(self, images: jax.Array) -> backbone.Features:
    if tuple(images.shape[1:3]) != self.img_size:
      raise ValueError(f'input size {tuple(images.shape[1:3])} does not match the model '
                       f'({self.img_size}); resize the input or rebuild for that size')
    x = self.patch_embed(images.astype(self.dtype))
    maps, task_maps = [], []
    for stage in self.layers:
      x, x_tasks = stage(x)
      maps.append(x)
      task_maps.append(x_tasks)
    return backbone.Features(tuple(maps), tuple(task_maps))


_EXPLICIT = ('patch_size', 'embed_dim', 'depths', 'num_heads', 'window_size')


def arch(cfg) -> dict:
  """SwinTransformer kwargs of `config.model.backbone`: a variant or explicit sizes, plus
  mlp_ratio, drop_path_rate and remat (backbone.REMAT_POLICIES)."""
  out = backbone.variant_arch(cfg, VARIANTS, _EXPLICIT, 'Swin')
  out.update(depths=tuple(out['depths']), num_heads=tuple(out['num_heads']),
             mlp_ratio=cfg.mlp_ratio, drop_path_rate=cfg.drop_path_rate,
             remat=cfg.get('remat', 'none'))
  return out


def build(config, tasks=None, *, rngs: nnx.Rngs,
          make_linear: Callable[..., nnx.Module] = plain_linear) -> SwinTransformer:
  """The Swin of `config.model.backbone` for `config.input.crop_size`; `make_linear` places
  the Linears (mtlora.placement for MTLoRA). `tasks` is unused here: the task streams come from
  `make_linear`."""
  del tasks
  return SwinTransformer(tuple(config.input.crop_size), **arch(config.model.backbone),
                         make_linear=make_linear, dtype=jnp.dtype(config.model.dtype), rngs=rngs)
