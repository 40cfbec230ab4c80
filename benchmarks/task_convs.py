r"""Times per-task convs under `jax.vmap` (MLoRE's task branches): grouped conv vs patches @ kernel.

  python benchmarks/task_convs.py                       # the demo's shapes: 6 tasks, batch 16
  python benchmarks/task_convs.py --tasks=5 --batch=4 --grid=32 --channels=192   # ViT-S 512²

A conv whose kernel differs per task, vmapped over the tasks, is lowered by XLA to one grouped
conv (feature_group_count = tasks); `layers.conv_as_matmul` computes it as one batched matmul of
3x3 patches (mtl_jax/models/mlore.py's TaskBranch and task LoRA use it). Prints forward+backward
ms of both and their ratio, for the 1x1 convs (conv1 / conv3) and the 3x3 task-LoRA down conv.
Record results in benchmarks/RESULTS.md with the machine, date and command.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax

from mtl_jax.models import layers

_TASKS = flags.DEFINE_integer('tasks', 6, 'Tasks (the vmapped axis).')
_BATCH = flags.DEFINE_integer('batch', 16, 'Batch size.')
_GRID = flags.DEFINE_integer('grid', 8, 'Token grid (grid x 1.25 grid).')
_CHANNELS = flags.DEFINE_integer('channels', 32, 'MLoRE C.')
_RANK = flags.DEFINE_integer('rank', 4, 'Task LoRA rank (spe_rank).')
_REPEATS = flags.DEFINE_integer('repeats', 20, 'Timed calls (median).')


def _time(conv, x, kernel) -> float:
  """Median seconds of jit(grad(sum(vmap(conv)(x, kernel)))) w.r.t. both."""
  dims = ('NHWC', 'HWIO', 'NHWC')
  pad = kernel.shape[1] // 2
  f = lambda x, k: conv(x, k, (1, 1), [(pad, pad)] * 2, dimension_numbers=dims)
  step = jax.jit(jax.grad(lambda x, k: jax.vmap(f)(x, k).sum(), argnums=(0, 1)))
  jax.block_until_ready(step(x, kernel))
  times = []
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    jax.block_until_ready(step(x, kernel))
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2]


def main(argv):
  del argv
  t, b, c = _TASKS.value, _BATCH.value, _CHANNELS.value
  h, w = _GRID.value, _GRID.value * 5 // 4
  x = jax.random.normal(jax.random.key(0), (t, b, h, w, c))
  print(f'{jax.devices()[0].platform} | {t} tasks x batch {b} x {h}x{w} x C {c} | fwd+bwd, '
        f'median of {_REPEATS.value}')
  for name, shape in (('1x1 C->C (conv1/conv3)', (t, 1, 1, c, c)),
                      (f'3x3 C->{_RANK.value} (task LoRA)', (t, 3, 3, c, _RANK.value))):
    kernel = jax.random.normal(jax.random.key(1), shape)
    grouped = _time(jax.lax.conv_general_dilated, x, kernel)
    matmul = _time(layers.conv_as_matmul, x, kernel)
    print(f'{name:26s} grouped conv {grouped * 1e3:8.2f} ms | patches @ kernel '
          f'{matmul * 1e3:8.2f} ms | {grouped / matmul:5.1f}x', flush=True)


if __name__ == '__main__':
  app.run(main)
