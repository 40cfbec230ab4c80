r"""Step time of training methods and of the conflict-ratio measurement vs the default step.

  python benchmarks/method_step.py                       # MTLoRA r64 Swin-T 224^2, batch 4
  python benchmarks/method_step.py --methods=mtl,maml,pcgrad --crop=448 --batch_size=2
  python benchmarks/method_step.py --methods=mtl,maml,maml:unroll --conflict=false

`maml:unroll` is `method=maml` with `config.maml.loop=unroll` (the default is `scan`).

One trainer per method on configs/mtlora_pascal.py (`--recipe`, default the fork's MAML trainable
set `lora_only`, so every method trains the same leaves) in fp32 on one device, one batch of the
procedural dataset reused; each is compiled once, then the methods (and `conflict`: the trainer's
conflict step, diagnostics only) are timed in turn for --rounds rounds of --steps steps
(A B C A B C) so machine load hits all alike; the load average is printed. Prints the median
ms/step of each and its ratio to 'mtl'. Record results in benchmarks/RESULTS.md.
"""

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax

from configs import mtlora_pascal
from mtl_jax import input_pipeline
from mtl_jax import sharding
from mtl_jax import train

_METHODS = flags.DEFINE_list('methods', ['mtl', 'maml'], 'config.method values to time.')
_CONFLICT = flags.DEFINE_bool('conflict', True, "Also time the conflict-ratio step ('conflict').")
_RECIPE = flags.DEFINE_string('recipe', 'lora_only', 'Trainable-set recipe of the config.')
_CROP = flags.DEFINE_integer('crop', 224, 'Input size (the recipe: 448).')
_BATCH = flags.DEFINE_integer('batch_size', 4, 'Global batch size (MAML splits it in halves).')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps per round.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Rounds over all methods.')
_DATA_DIR = flags.DEFINE_string('data_dir', os.path.join(tempfile.gettempdir(), 'mtl_jax_bench'),
                                'TFDS data dir for synthetic_scenes/tiny.')


def _config(name: str):
  method, _, loop = name.partition(':')
  c = mtlora_pascal.get_config(f'recipe={_RECIPE.value}')
  c.update(method=method, batch_size=_BATCH.value)
  if loop:
    c.maml.loop = loop
  c.model.dtype = 'float32'
  c.input.crop_size = (_CROP.value, _CROP.value)
  c.dataset.update(name='synthetic_scenes/tiny', data_dir=_DATA_DIR.value, build_if_missing=True)
  return c


def main(argv):
  del argv
  steps, batch = {}, None
  for method in _METHODS.value:
    trainer = train.Trainer(_config(method), tempfile.mkdtemp(), jax.devices()[:1])
    if batch is None:
      batch = sharding.global_batch(next(input_pipeline.make_train_iterator(
          trainer.config, trainer.tasks, source=trainer.train_source)), trainer.mesh)
    box = {'state': trainer.init_state()}

    def step(trainer=trainer, box=box):
      box['state'], scalars = trainer.train_step(box['state'], trainer.rest, batch)
      jax.block_until_ready(scalars)
    steps[method] = step
    if _CONFLICT.value and method == 'mtl':
      steps['conflict'] = lambda trainer=trainer, box=box: jax.block_until_ready(
          trainer.conflict_step(box['state'], trainer.rest, batch))
  for name, step in steps.items():
    t0 = time.perf_counter()
    step()
    print(f'{name}: first call (compile) {time.perf_counter() - t0:.1f} s', flush=True)
  times = {name: [] for name in steps}
  for _ in range(_ROUNDS.value):
    for name, step in steps.items():
      for _ in range(_STEPS.value):
        t0 = time.perf_counter()
        step()
        times[name].append(time.perf_counter() - t0)
  print(f'MTLoRA r64 Swin-T {_CROP.value}^2 batch {_BATCH.value} fp32 recipe={_RECIPE.value}, '
        f'load average {os.getloadavg()[0]:.2f}')
  base = statistics.median(times['mtl']) if 'mtl' in times else None
  for name, ts in times.items():
    med = statistics.median(ts)
    ratio = f' = {med / base:.2f}x mtl' if base else ''
    print(f'  {name:>12}: median {med * 1e3:,.0f} ms (min {min(ts) * 1e3:,.0f}, max '
          f'{max(ts) * 1e3:,.0f}){ratio}', flush=True)


if __name__ == '__main__':
  app.run(main)
