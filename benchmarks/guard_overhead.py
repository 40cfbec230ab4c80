r"""Cost of the train step's non-finite guard (docs/faults.md §1): guarded vs the bare step.

  python benchmarks/guard_overhead.py --config=configs/mtlora_pascal.py \
      --config.input.crop_size='(224, 224)' --config.batch_size=2 --rounds=2 --steps=3

Both steps are compiled with the trainer's shardings and donation; printed are XLA's cost
analysis (FLOPs, bytes accessed) of each and the median step time of A B A B rounds on one
batch. Record results in benchmarks/RESULTS.md with the machine, date, command and load.
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

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Config file.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'A B rounds.')


def main(argv):
  del argv
  config = _CONFIG.value
  trainer = train.Trainer(config, '/tmp/unused_workdir')
  it = input_pipeline.make_train_iterator(config, trainer.tasks, source=trainer.train_source)
  batch = sharding.global_batch(next(it), trainer.mesh)
  repl, batch_sh = sharding.replicated(trainer.mesh), sharding.batch_sharding(trainer.mesh)
  bare = jax.jit(trainer.method.train_step, in_shardings=(trainer.state_sharding, repl, batch_sh),
                 out_shardings=(trainer.state_sharding, repl), donate_argnums=(0,))
  steps, states = {}, {}
  for name, fn in (('bare', bare), ('guarded', trainer.train_step)):
    states[name] = trainer.init_state()
    steps[name] = fn.lower(states[name], trainer.rest, batch).compile()
    cost = steps[name].cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(f'{name}: {cost.get("flops", 0) / 1e9:.2f} GFLOP, '
          f'{cost.get("bytes accessed", 0) / 2 ** 30:.3f} GiB accessed')
  times = {name: [] for name in steps}
  for _ in range(_ROUNDS.value):
    for name, step in steps.items():
      state = states[name]
      for _ in range(_STEPS.value):
        t0 = time.perf_counter()
        state, scalars = step(state, trainer.rest, batch)
        jax.block_until_ready(scalars)
        times[name].append(time.perf_counter() - t0)
      states[name] = state
  med = {name: float(np.median(t)) for name, t in times.items()}
  print(f'load {os.getloadavg()[0]:.2f} | bare {med["bare"] * 1e3:.0f} ms | guarded '
        f'{med["guarded"] * 1e3:.0f} ms | guarded / bare {med["guarded"] / med["bare"]:.3f}')


if __name__ == '__main__':
  app.run(main)
