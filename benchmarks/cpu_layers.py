r"""Forward + backward of single layers, in the lowering mtl_jax uses and the one it replaced.

  python benchmarks/cpu_layers.py            # Swin-T / MLoRE ViT-S shapes, batch 2, fp32
  python benchmarks/cpu_layers.py --repeats=3

The figures behind docs/stack.md §12 (XLA:CPU): each row jits value_and_grad of
sum(sin(layer(x))) in both forms, checks that they agree, times them A B A B (`--repeats` calls
per turn) and prints the median of each; the load average is printed before and after.
  - Linear + rank-4 LoRA on a 4-D activation: `x @ w` (jnp) vs `layers.matmul` (2-D view)
  - 1x1 conv 270 -> 1080 (the HRNet head): lax conv vs `layers.conv_general` (a matmul)
  - 3x3 conv 192 -> 192 at 128x128 (MLoRE): lax conv vs `layers.conv_general` (im2col on CPU)
  - exact GELU: jax.nn.gelu's erfc form vs `layers.gelu` (torch's erf form)
and the figures behind docs/stack.md §14 (the same function with fewer products or passes):
  - x4 bilinear upsampling + 3x3 conv 192 -> 192 (an MLoRE head): `resize_bilinear` then the conv
    vs `layers.conv_of_upsampled`
  - MLoRE ViT-S's 15 experts (C 192, R 540) on (2, 32, 32): factorised vs the dense per-sample
    kernel (`LowRankExperts.dense_mixture` False / True; gradients of x, gates and parameters)
  - ViT-S global attention (2, 1024, 6, 64): jax.nn.dot_product_attention vs
    `vit.dot_product_attention` (its CPU form)
Run alone on an idle machine; record results in benchmarks/RESULTS.md with the load average.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from flax import nnx
from mtl_jax.models import layers
from mtl_jax.models import mlore
from mtl_jax.models import vit

_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per form (after one compile call).')
_SMALL = flags.DEFINE_bool('small', False, 'Tiny shapes (tests: checks the script runs).')


def _times_ms(fn, *args) -> list[float]:
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return times


def _load() -> str:
  with open('/proc/loadavg') as f:
    return f.read().split()[0]


def _rows(small: bool):
  """(name, old form, new form, args) per layer."""
  key = iter(jax.random.split(jax.random.key(0), 16))
  rand = lambda *shape: jax.random.normal(next(key), shape) * 0.05
  s = (lambda full, tiny: tiny if small else full)
  x = rand(2, *s((112, 112), (8, 8)), 96)
  w, a, b = rand(96, 384), rand(96, 4), rand(4, 384)
  lora_old = lambda x, w, a, b: x @ w + (x @ a) @ b * 4.0
  lora_new = lambda x, w, a, b: (layers.matmul(x, w)
                                 + layers.matmul(layers.matmul(x, a), b) * 4.0)
  yield 'Linear 96->384 + LoRA r4, (2,112,112,96)', lora_old, lora_new, (x, w, a, b)
  dn = ('NHWC', 'HWIO', 'NHWC')
  h, k1 = rand(2, *s((56, 56), (8, 8)), 270), rand(1, 1, 270, 1080)
  conv = lambda pad: (lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), [(pad, pad)] * 2,
                                                                dimension_numbers=dn))
  general = lambda pad: (lambda x, k: layers.conv_general(x, k, (1, 1), [(pad, pad)] * 2,
                                                          dimension_numbers=dn))
  yield '1x1 conv 270->1080, (2,56,56,270)', conv(0), general(0), (h, k1)
  h3, k3 = rand(2, *s((128, 128), (8, 8)), 192), rand(3, 3, 192, 192)
  yield '3x3 conv 192->192, (2,128,128,192)', conv(1), general(1), (h3, k3)
  g = rand(2, *s((112, 112), (8, 8)), 384) * 40
  yield 'GELU, (2,112,112,384)', lambda x: jax.nn.gelu(x, approximate=False), layers.gelu, (g,)
  low, factor = rand(2, *s((32, 32), (4, 4)), 192), 4
  resized = lambda x, k: conv(1)(layers.resize_bilinear(x, (factor * x.shape[1],
                                                              factor * x.shape[2])), k)
  yield 'x4 upsample + 3x3 conv 192, (2,32,32,192)', resized, (
      lambda x, k: layers.conv_of_upsampled(x, k, factor)), (low, k3)
  experts = mlore.LowRankExperts(192, s(tuple(range(8, 65, 4)), (8, 16, 24)), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(experts)

  def mixture(dense):
    def apply(x, gates, state):
      module = nnx.merge(graphdef, state)
      module.dense_mixture = dense
      return module(x, gates)
    return apply

  gates = jax.nn.softmax(rand(2, len(experts.ranks)) * 20, axis=-1)
  yield '15 experts C 192, R 540, (2,32,32,192)', mixture(False), mixture(True), (
      low, gates, state)
  qkv = [rand(2, s(1024, 16), 6, 64) * 20 for _ in range(3)]
  yield 'attention (2,1024,6,64)', jax.nn.dot_product_attention, vit.dot_product_attention, qkv


def main(argv):
  del argv
  print(f'load average {_load()}')
  print(f'{"layer (forward + backward)":<44} {"old ms":>9} {"new ms":>9} {"speedup":>8}')
  for name, old, new, args in _rows(_SMALL.value):
    argnums = tuple(range(len(args)))
    grad = lambda f: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums))
    old, new = grad(old), grad(new)
    out_old, out_new = jax.block_until_ready((old(*args), new(*args)))  # compile both
    times_old, times_new = [], []
    for _ in range(2):  # A B A B
      times_old += _times_ms(old, *args)
      times_new += _times_ms(new, *args)
    t_old, t_new = float(np.median(times_old)), float(np.median(times_new))
    for p, q in zip(jax.tree.leaves(out_new), jax.tree.leaves(out_old)):
      scale = float(jnp.max(jnp.abs(q))) or 1.0
      if float(jnp.max(jnp.abs(p - q))) > 1e-4 * scale:
        sys.exit(f'error: the two forms of {name} disagree (max abs diff '
                 f'{float(jnp.max(jnp.abs(p - q))):.3g}); fix the new form before timing it')
    print(f'{name:<44} {t_old:9.1f} {t_new:9.1f} {t_old / t_new:7.2f}x', flush=True)
  print(f'load average {_load()}')


if __name__ == '__main__':
  app.run(main)
