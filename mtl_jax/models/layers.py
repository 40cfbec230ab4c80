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
  """Exact (erf) GELU, as torch.nn.GELU() (docs/mlore.md §3.3)."""
  return jax.nn.gelu(x, approximate=False)


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


def conv(in_ch: int, out_ch: int, kernel_size: int, *, stride: int = 1,
         kernel_init: nnx.Initializer | None = None, bias_init: nnx.Initializer | None = None,
         matmul: bool = False, dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
  """nn.Conv2d(in_ch, out_ch, k, stride) with PyTorch's default init (unless overridden).

  Stride-1 convs pad k // 2 on each side ("same" for odd k); strided convs (the patch
  embedding) are unpadded. `matmul=True` computes the conv as `conv_as_matmul` does: for convs
  with per-task kernels run under `jax.vmap`, which XLA would otherwise lower to grouped convs.
  """
  pad = kernel_size // 2 if stride == 1 else 0
  fan_in = in_ch * kernel_size * kernel_size
  return nnx.Conv(
      in_ch, out_ch, (kernel_size, kernel_size), strides=stride, padding=[(pad, pad)] * 2,
      kernel_init=kernel_init or torch_kernel_init(),
      bias_init=bias_init or torch_bias_init(fan_in), dtype=dtype, rngs=rngs,
      conv_general_dilated=conv_as_matmul if matmul else jax.lax.conv_general_dilated)


def conv_as_matmul(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None,
                   preferred_element_type=None, out_sharding=None) -> jax.Array:
  """`jax.lax.conv_general_dilated` for NHWC x HWIO stride-1 convs as patches @ kernel.

  The kh * kw shifted views of the padded input are concatenated on the channel axis in HWI
  order (a 1x1 conv is a plain matmul) and contracted with the kernel reshaped to
  (kh * kw * I, O): the same sum in another order. Under `jax.vmap` over the kernel this is one
  batched matmul, where the conv becomes a grouped conv that XLA:CPU runs 10-30x slower
  (benchmarks/RESULTS.md, "MLoRE per-task convs"). Anything else (strides, dilation, groups)
  goes to the conv itself. Signature as nnx.Conv calls it (`conv_general_dilated=`).
  """
  simple = (all(s == 1 for s in window_strides) and feature_group_count == 1
            and all(d == 1 for d in (lhs_dilation or ())) and not isinstance(padding, str)
            and all(d == 1 for d in (rhs_dilation or ())) and lhs.ndim == 4)
  if not simple:
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, precision=precision, preferred_element_type=preferred_element_type,
        out_sharding=out_sharding)
  kh, kw, _, out_ch = rhs.shape
  x = jnp.pad(lhs, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  cols = jnp.concatenate([x[:, i:i + h, j:j + w] for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.dot(cols, rhs.reshape(-1, out_ch), precision=precision,
                 preferred_element_type=preferred_element_type)


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
