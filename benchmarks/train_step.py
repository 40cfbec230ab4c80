r"""Times the jitted train step of a config: compile time, ms/step, img/s (no assertions).

  python benchmarks/train_step.py --config=configs/demo.py --steps=20
  python benchmarks/train_step.py --config=configs/demo.py --config.batch_size=64

The batch is drawn once from the configured input pipeline and reused, so the figure is the
device step alone (host input is measured separately by `--input_only`). Record results in
benchmarks/RESULTS.md with the machine, date and command.
"""

import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from mtl_jax import input_pipeline
from mtl_jax import sharding
from mtl_jax import train
from mtl_jax import xla_cpu

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Config file.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps (after one warm-up step).')
_INPUT_ONLY = flags.DEFINE_bool('input_only', False, 'Time the host input pipeline instead.')
_HUGE_PAGES = flags.DEFINE_bool('host_huge_pages', None,
                                'Overrides config.host_huge_pages (docs/stack.md §13).')


def set_host_memory(config) -> None:
  """--host_huge_pages into `config`, then applied (may restart the process; before any jax
  computation)."""
  if _HUGE_PAGES.value is not None:
    config.host_huge_pages = _HUGE_PAGES.value
  xla_cpu.set_host_memory(config)


def time_train_step(trainer, local_batch, steps: int) -> tuple[float, float, float]:
  """(first step incl. compile, median, min) seconds of `trainer.train_step` on one batch."""
  batch = sharding.global_batch(local_batch, trainer.mesh)
  state = trainer.init_state()
  t0 = time.perf_counter()
  state, scalars = trainer.train_step(state, trainer.rest, batch)
  jax.block_until_ready(scalars)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, scalars = trainer.train_step(state, trainer.rest, batch)
    jax.block_until_ready(scalars)
    times.append(time.perf_counter() - t0)
  return compile_s, float(np.median(times)), min(times)


def main(argv):
  del argv
  config = _CONFIG.value
  set_host_memory(config)
  trainer = train.Trainer(config, '/tmp/unused_workdir')
  it = input_pipeline.make_train_iterator(config, trainer.tasks, source=trainer.train_source)
  if _INPUT_ONLY.value:
    next(it)
    t0 = time.perf_counter()
    for _ in range(_STEPS.value):
      next(it)
    dt = (time.perf_counter() - t0) / _STEPS.value
    print(f'input pipeline: {dt * 1e3:.1f} ms/batch, {config.batch_size / dt:.1f} img/s')
    return
  compile_s, med, fastest = time_train_step(trainer, next(it), _STEPS.value)
  print(f'{jax.devices()[0].device_kind} x{jax.device_count()} | batch {config.batch_size} | '
        f'first step (compile) {compile_s:.1f} s | median {med * 1e3:.1f} ms/step '
        f'(min {fastest * 1e3:.1f}) | {config.batch_size / med:.1f} img/s')


if __name__ == '__main__':
  app.run(main)
