"""Small layers shared by the models: torch-semantics BatchNorm, bilinear resize, inits, GELU.

Follows docs/mlore.md §3 (BatchNorm: eps 1e-5, momentum 0.1, unbiased running variance; exact
GELU; bilinear resize with align_corners=False) and §3.6 (PyTorch default conv init); weight
layouts of PyTorch checkpoints: mtl_jax/convert/keys.py. Activations are NHWC.

Modules stay plain (no sharding metadata, docs/stack.md §4): the trainer shards parameters by
regex rules over their paths. Batch statistics are plain means over the batch axis, so under
`jax.jit` with a data-sharded batch they are global-batch statistics (SyncBatchNorm) for free.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, as torch.nn.GELU() (docs/mlore.md §3.3): x / 2 * (1 + erf(x / sqrt 2)).

  Written as torch writes it; `jax.nn.gelu(approximate=False)` uses erfc(-x / sqrt 2) instead,
  the same function, whose XLA:CPU lowering made GELU's forward + backward 2x slower
  (docs/stack.md §12).
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.asarray(1.0 / math.sqrt(2.0), x.dtype)))


def trunc_normal(std: float = 0.02) -> nnx.Initializer:
  """timm's trunc_normal_(std=std): N(0, std^2) truncated at the absolute values -2 and 2."""
  return jax.nn.initializers.truncated_normal(std, lower=-2.0 / std, upper=2.0 / std)


def torch_kernel_init() -> nnx.Initializer:
  """PyTorch's default Conv/Linear weight init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))."""
  return jax.nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_bias_init(fan_in: int) -> nnx.Initializer:
  """PyTorch's default Conv/Linear bias init, U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def matmul(x: jax.Array, w: jax.Array, **kwargs) -> jax.Array:
  """`x @ w` over x's last axis as one 2-D matmul: (..., K) -> (prod ..., K) @ (K, N) -> (..., N).

  The same products and sums as `x @ w`; only the leading axes are merged first. On XLA:CPU a dot
  whose lhs has more than two axes gets its weight gradient (a contraction over all leading axes)
  lowered through a transposed copy of the incoming gradient inside an elementwise fusion, which
  made a Swin-T Linear's forward + backward 3.5x slower than this 2-D form (docs/stack.md §12;
  benchmarks/RESULTS.md, "MTLoRA step on XLA:CPU"). Accelerators canonicalise dots to 2-D anyway.
  `kwargs` go to `jnp.dot` (precision, preferred_element_type).
  """
  if x.ndim <= 2 or w.ndim != 2:
    return jnp.dot(x, w, **kwargs)
  y = jnp.dot(x.reshape(-1, x.shape[-1]), w, **kwargs)
  return y.reshape(*x.shape[:-1], w.shape[-1])


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                **kwargs) -> jax.Array:
  """`jax.lax.dot_general` for nnx.Linear / nnx.Einsum: lhs (..., K) x rhs (K, N) as `matmul`.

  Any other contraction goes to `jax.lax.dot_general` unchanged.
  """
  (lhs_contract, rhs_contract), batch = dimension_numbers
  if kwargs.get('out_sharding') is None:
    kwargs.pop('out_sharding', None)
  if (tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
      and rhs.ndim == 2 and not any(batch) and not kwargs):
    return matmul(lhs, rhs, precision=precision, preferred_element_type=preferred_element_type)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type, **kwargs)


def linear(in_features: int, out_features: int, *, kernel_init: nnx.Initializer,
           bias_init: nnx.Initializer = nnx.initializers.zeros, use_bias: bool = True,
           dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
  """nnx.Linear computed with `dot_general` (a 2-D matmul over the flattened leading axes)."""
  return nnx.Linear(in_features, out_features, use_bias=use_bias, kernel_init=kernel_init,
                    bias_init=bias_init, dtype=dtype, dot_general=dot_general, rngs=rngs)


def conv(in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1,
         kernel_init: nnx.Initializer | None = None, bias_init: nnx.Initializer | None = None,
         use_bias: bool = True, matmul: bool = False, dtype=jnp.float32,
         rngs: nnx.Rngs) -> nnx.Conv:
  """nn.Conv2d(in_ch, out_ch, k, stride) with PyTorch's default init (unless overridden).

  Stride-1 convs pad k // 2 on each side ("same" for odd k); strided convs (the patch
  embedding) are unpadded. 1x1 convs, patch embeddings (kernel = stride) and, on CPU, every
  stride-1 conv run as matmuls (`conv_general`); `matmul=True` computes the conv as
  `conv_as_matmul` does on every backend: for convs with per-task kernels run under `jax.vmap`,
  which XLA would otherwise lower to grouped convs.
  """
  pad = kernel_size // 2 if stride == 1 else 0
  fan_in = in_ch * kernel_size * kernel_size
  return nnx.Conv(
      in_ch, out_ch, (kernel_size, kernel_size), strides=stride, padding=[(pad, pad)] * 2,
      kernel_init=kernel_init or torch_kernel_init(), use_bias=use_bias,
      bias_init=bias_init or torch_bias_init(fan_in), dtype=dtype, rngs=rngs,
      conv_general_dilated=conv_as_matmul if matmul else conv_general)


def _conv_fallback(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                   dimension_numbers, feature_group_count, precision, preferred_element_type,
                   out_sharding) -> jax.Array:
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, precision=precision, preferred_element_type=preferred_element_type,
      out_sharding=out_sharding)


def _plain_nhwc(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                feature_group_count) -> bool:
  """An NHWC x HWIO conv (dimension numbers given) without dilation or groups, explicit padding."""
  nhwc = dimension_numbers == ('NHWC', 'HWIO', 'NHWC') or (
      getattr(dimension_numbers, 'lhs_spec', None) == (0, 3, 1, 2)
      and dimension_numbers.rhs_spec == (3, 2, 0, 1) and dimension_numbers.out_spec == (0, 3, 1, 2))
  return (nhwc and feature_group_count == 1 and lhs.ndim == 4 and rhs.ndim == 4
          and not isinstance(padding, str) and all(d == 1 for d in (lhs_dilation or ()))
          and all(d == 1 for d in (rhs_dilation or ())))


def conv_general(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, precision=None,
                 preferred_element_type=None, out_sharding=None) -> jax.Array:
  """`jax.lax.conv_general_dilated`, with the convs XLA:CPU runs badly as matmuls.

  - a stride-1 unpadded 1x1 conv is `matmul(x, kernel)`;
  - a conv whose stride equals its kernel size, unpadded (a patch embedding), is a matmul of the
    non-overlapping (kh, kw, C) patches with the kernel reshaped to (kh * kw * C, O) (a trailing
    remainder that the conv would skip is cropped);
  - on the CPU backend, any other stride-1 conv is im2col (`conv_as_matmul`).
  The same function (the same products; sums in another order). On XLA:CPU the HRNet head's 1x1
  convs ran 6-8x and MLoRE's 3x3 convs 1.8-2.7x faster so (docs/stack.md §12); on GPU/TPU the 3x3
  convs stay convs (cuDNN / the TPU conv units). Everything else goes to the conv.
  """
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
          feature_group_count, precision, preferred_element_type, out_sharding)
  if not _plain_nhwc(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count):
    return _conv_fallback(*args)
  kh, kw, cin, out_ch = rhs.shape
  kwargs = dict(precision=precision, preferred_element_type=preferred_element_type)
  unpadded = all(tuple(p) == (0, 0) for p in padding)
  stride_1 = all(s == 1 for s in window_strides)
  if (kh, kw) == (1, 1) and stride_1 and unpadded:
    return matmul(lhs, rhs.reshape(cin, out_ch), **kwargs)
  if tuple(window_strides) == (kh, kw) and unpadded:
    n, h, w = lhs.shape[0], lhs.shape[1] // kh, lhs.shape[2] // kw
    patches = lhs[:, :h * kh, :w * kw].reshape(n, h, kh, w, kw, cin)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, h, w, kh * kw * cin)
    return matmul(patches, rhs.reshape(-1, out_ch), **kwargs)
  if stride_1 and jax.default_backend() == 'cpu':
    return _im2col(lhs, rhs, padding, **kwargs)
  return _conv_fallback(*args)


def im2col(x: jax.Array, kh: int, kw: int, padding) -> jax.Array:
  """(N, H, W, C) -> the (N, h, w, kh * kw * C) patches of a stride-1 conv with `padding`
  ((top, bottom), (left, right)), taps in HWI order: `patches @ kernel.reshape(-1, O)` is the
  conv with the HWIO kernel."""
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  return jnp.concatenate([x[:, i:i + h, j:j + w] for i in range(kh) for j in range(kw)], axis=-1)


def _im2col(lhs, rhs, padding, **kwargs) -> jax.Array:
  kh, kw, _, out_ch = rhs.shape
  return matmul(im2col(lhs, kh, kw, padding), rhs.reshape(-1, out_ch), **kwargs)


def conv_as_matmul(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None,
                   preferred_element_type=None, out_sharding=None) -> jax.Array:
  """`jax.lax.conv_general_dilated` for NHWC x HWIO stride-1 convs as patches @ kernel, on
  every backend.

  The kh * kw shifted views of the padded input are concatenated on the channel axis in HWI
  order (a 1x1 conv is a plain matmul) and contracted with the kernel reshaped to
  (kh * kw * I, O): the same sum in another order. Under `jax.vmap` over the kernel this is one
  batched matmul, where the conv becomes a grouped conv that XLA:CPU runs 10-30x slower
  (benchmarks/RESULTS.md, "MLoRE per-task convs"). Anything else (strides, dilation, groups)
  goes to `conv_general`. Signature as nnx.Conv calls it (`conv_general_dilated=`).
  """
  if (not _plain_nhwc(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                      feature_group_count) or any(s != 1 for s in window_strides)):
    return conv_general(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                        dimension_numbers, feature_group_count, precision, preferred_element_type,
                        out_sharding)
  return _im2col(lhs, rhs, padding, precision=precision,
                 preferred_element_type=preferred_element_type)


class Dropout(nnx.Dropout):
  """nnx.Dropout (stream 'dropout') whose mask is computed once per call.

  The same key, mask bits and `select(mask, x / keep, 0)` as `nnx.Dropout(rate, broadcast_dims)`.
  Only the mask passes through an exact `sqrt` of its 0/1 values first: XLA counts sqrt as
  expensive and neither duplicates an expensive producer into several consumers nor fuses it into
  one that reuses its elements (a broadcast), so the mask's threefry hash runs once. Without it
  XLA:CPU fused the hash into every consumer of the mask: into the elementwise loop over the whole
  activation for a per-sample drop-path mask (~0.6 s of a 7 s Swin-T train step), and into the
  forward select, the backward select and the LoRA-A weight-gradient operand of each LoRA dropout
  (~2.6 times per mask; `optimization_barrier` does not help: XLA:CPU removes it before fusion;
  docs/stack.md §12). The price is one float32 mask kept for the backward, so on GPU/TPU (integer
  hashing is cheap there, memory is not) a full-size mask stays nnx.Dropout's 1-byte one.
  """

  def _mask_shape(self, inputs: jax.Array) -> tuple[int, ...]:
    return tuple(1 if d in self.broadcast_dims else n for d, n in enumerate(inputs.shape))

  def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None,
               rngs=None) -> jax.Array:
    off = self.deterministic if deterministic is None else deterministic
    if off or self.rate == 0.0:
      return inputs
    shape = self._mask_shape(inputs)
    if math.prod(shape) == inputs.size and jax.default_backend() != 'cpu':
      return super().__call__(inputs, deterministic=False, rngs=rngs)
    ones = jnp.ones(shape, jnp.float32)
    mask = jnp.sqrt(super().__call__(ones, deterministic=False, rngs=rngs)) > 0
    return jax.lax.select(jnp.broadcast_to(mask, inputs.shape), inputs / (1.0 - self.rate),
                          jnp.zeros_like(inputs))


class DropPath(Dropout):
  """Stochastic depth (timm DropPath): `Dropout` with one draw per sample, i.e. the masks of
  `nnx.Dropout(rate, broadcast_dims=<all but the batch axis>)`."""

  def __init__(self, rate: float, *, rngs: nnx.Rngs):
    super().__init__(rate, rngs=rngs)

  def _mask_shape(self, inputs: jax.Array) -> tuple[int, ...]:
    return (inputs.shape[0],) + (1,) * (inputs.ndim - 1)


class BatchNorm(nnx.Module):
  """torch.nn.BatchNorm2d over the last (channel) axis of an NHWC map (docs/mlore.md §3.3).

  Training (`use_running_average=False`, set by `model.train()`): normalises with the biased
  batch variance and updates running = (1 - momentum) * running + momentum * batch, using the
  unbiased (n / (n - 1)) batch variance for `var`. Eval (`model.eval()`): running statistics.
  Statistics are computed in float32 whatever the input dtype; the output has the input dtype.
  """

  def __init__(self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5,
               use_running_average: bool = False):
    self.num_features = num_features
    self.momentum = momentum
    self.epsilon = epsilon
    self.use_running_average = use_running_average
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      axes = tuple(range(x.ndim - 1))
      n = math.prod(x.shape[:-1])
      if n < 2:
        raise ValueError(f'BatchNorm in training mode needs more than 1 value per channel, got '
                         f'input shape {x.shape}; use a larger batch or call model.eval()')
      mean = jnp.mean(xf, axis=axes)
      var = jnp.mean(jnp.square(xf - mean), axis=axes)
      m = self.momentum
      self.mean[...] = (1.0 - m) * self.mean[...] + m * mean
      self.var[...] = (1.0 - m) * self.var[...] + m * var * (n / (n - 1))
    mul = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
    return ((xf - mean) * mul + self.bias[...]).astype(x.dtype)


def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights of torch's align_corners=False linear resampling along one axis."""
  src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = src - i0
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.arange(out_size), i0), 1.0 - w1)
  np.add.at(matrix, (np.arange(out_size), i1), w1)
  return matrix.astype(np.float32)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """F.interpolate(x, size, mode='bilinear', align_corners=False) for NHWC `x`.

  Half-pixel centres, negative source coordinates clamped to 0, no antialiasing (also when
  downsampling), exactly as torch. Integer upsampling factors (scale_factor=s) give the same
  sampling positions as size=(s*h, s*w). Computed as two small matmuls (as jax.image.resize
  does), which suits TPUs better than gathers.
  """
  out_h, out_w = size
  if x.shape[1:3] == (out_h, out_w):
    return x
  mh = jnp.asarray(_bilinear_matrix(x.shape[1], out_h), x.dtype)
  mw = jnp.asarray(_bilinear_matrix(x.shape[2], out_w), x.dtype)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum('bhwc,Hh->bHwc', x, mh, precision=hi)
  return jnp.einsum('bhwc,Ww->bhWc', x, mw, precision=hi)


def _shifted_bilinear(in_size: int, factor: int, taps: int) -> np.ndarray:
  """(taps, factor * in_size, in_size): row Y of slice i is the bilinear row that a 'same' conv
  tap i reads for output Y (upsampled row Y + i - taps // 2), zero where that row is padding."""
  out_size = factor * in_size
  matrix = _bilinear_matrix(in_size, out_size)
  shifted = np.zeros((taps, out_size, in_size), np.float32)
  for i in range(taps):
    lo, hi = max(0, taps // 2 - i), min(out_size, out_size + taps // 2 - i)
    shifted[i, lo:hi] = matrix[lo + i - taps // 2:hi + i - taps // 2]
  return shifted


def conv_of_upsampled(x: jax.Array, kernel: jax.Array, factor: int) -> jax.Array:
  """A stride-1 'same' conv (HWIO `kernel`, odd size, no bias) of `resize_bilinear(x, factor x)`,
  without the upsampled map: (B, h, w, C) -> (B, factor h, factor w, O).

  Bilinear resampling acts on the spatial axes, the kernel's channel contraction on the channel
  axis, so they commute: conv(up(x))[Y, X] = sum_ij A_i[Y, :] (x @ K_ij) A_j[X, :]^T, with A_i
  the bilinear matrix shifted by tap i (`_shifted_bilinear`, zero rows for the conv's padding).
  The kh * kw channel contractions run at the low resolution (factor² fewer products: 16x for
  MLoRE's x4 heads), the resampling as two matmuls over (tap, position) (docs/stack.md §14).
  The same function as the conv of the resized map, summed in another order.
  """
  kh, kw, cin, out_ch = kernel.shape
  b, h, w, _ = x.shape
  hi = jax.lax.Precision.HIGHEST
  a_h = jnp.asarray(_shifted_bilinear(h, factor, kh), x.dtype)  # (kh, H, h)
  a_w = jnp.asarray(_shifted_bilinear(w, factor, kw), x.dtype)  # (kw, W, w)
  z = matmul(x, kernel.transpose(2, 0, 1, 3).reshape(cin, kh * kw * out_ch))
  z = z.reshape(b, h, w, kh, kw, out_ch)
  # Columns: contract (tap j, column w) -> X; then rows: contract (tap i, row h) -> Y.
  z = z.transpose(0, 1, 3, 5, 4, 2).reshape(b * h * kh * out_ch, kw * w)
  z = jnp.dot(z, a_w.transpose(0, 2, 1).reshape(kw * w, -1), precision=hi)
  z = z.reshape(b, h, kh, out_ch, factor * w).transpose(0, 4, 3, 2, 1)  # (b, X, O, i, h)
  z = jnp.dot(z.reshape(-1, kh * h), a_h.transpose(0, 2, 1).reshape(kh * h, -1), precision=hi)
  return z.reshape(b, factor * w, out_ch, factor * h).transpose(0, 3, 1, 2)
