r"""Forward + backward of single layers, in the lowering mtl_jax uses and the one it replaced.

  python benchmarks/cpu_layers.py            # Swin-T / MLoRE ViT-S shapes, batch 2, fp32
  python benchmarks/cpu_layers.py --repeats=3

The figures behind docs/stack.md §12 (XLA:CPU): each row jits value_and_grad of
sum(sin(layer(x))) in both forms, checks that they agree, and prints the median time of each.
  - Linear + rank-4 LoRA on a 4-D activation: `x @ w` (jnp) vs `layers.matmul` (2-D view)
  - 1x1 conv 270 -> 1080 (the HRNet head): lax conv vs `layers.conv_general` (a matmul)
  - 3x3 conv 192 -> 192 at 128x128 (MLoRE): lax conv vs `layers.conv_general` (im2col on CPU)
  - exact GELU: jax.nn.gelu's erfc form vs `layers.gelu` (torch's erf form)
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

from mtl_jax.models import layers

_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per form (after one compile call).')
_SMALL = flags.DEFINE_bool('small', False, 'Tiny shapes (tests: checks the script runs).')


def _median_ms(fn, *args) -> tuple[float, object]:
  out = jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3, out


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


def main(argv):
  del argv
  print(f'{"layer (forward + backward)":<44} {"old ms":>9} {"new ms":>9} {"speedup":>8}')
  for name, old, new, args in _rows(_SMALL.value):
    argnums = tuple(range(len(args)))
    grad = lambda f: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums))
    t_old, out_old = _median_ms(grad(old), *args)
    t_new, out_new = _median_ms(grad(new), *args)
    for p, q in zip(jax.tree.leaves(out_new), jax.tree.leaves(out_old)):
      scale = float(jnp.max(jnp.abs(q))) or 1.0
      if float(jnp.max(jnp.abs(p - q))) > 1e-4 * scale:
        sys.exit(f'error: the two forms of {name} disagree (max abs diff '
                 f'{float(jnp.max(jnp.abs(p - q))):.3g}); fix the new form before timing it')
    print(f'{name:<44} {t_old:9.1f} {t_new:9.1f} {t_old / t_new:7.2f}x', flush=True)


if __name__ == '__main__':
  app.run(main)
