r"""Times one MLoRE train step with the experts fused and as the reference's per-expert loop.

  python benchmarks/mlore_step.py                      # ViT-S, 512x512, batch 2, fp32
  python benchmarks/mlore_step.py --vit=B --steps=3
  python benchmarks/mlore_step.py --noloop             # fused only (side_by_side.py's side A)

configs/mlore_pascal.py:vit=S (the recipe's model, Adam, 5 tasks, load balancing) on a batch of
the procedural dataset resized to 512x512 (the pipeline's crop; built into --data_dir if missing),
timed with benchmarks/train_step.py's `time_train_step`. The same model is then built with
`config.model.mlore.fused = False`: 15 expert convs and 15 1x1 convs per MoE block, as the reference
loops (docs/mlore.md §3.2). Prints img/s of both and the speedup. Record results in
benchmarks/RESULTS.md with the machine, date and command.
"""

import os
import resource
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from benchmarks import train_step
from configs import mlore_pascal
from mtl_jax import input_pipeline
from mtl_jax import train
from mtl_jax import xla_cpu

_VIT = flags.DEFINE_enum('vit', 'S', ['S', 'B', 'L'], 'ViT of configs/mlore_pascal.py.')
_DATA_DIR = flags.DEFINE_string('data_dir', os.path.join(tempfile.gettempdir(), 'mtl_jax_bench'),
                                'TFDS data dir for synthetic_scenes/tiny.')
_LOOP = flags.DEFINE_bool('loop', True, 'Also time the per-expert loop (prints a second median '
                          'line; side_by_side.py reads the last one, so pass --noloop there).')


def main(argv):
  del argv
  config = mlore_pascal.get_config(f'vit={_VIT.value}')
  train_step.set_host_memory(config)
  config.batch_size = 2
  config.dataset.update(name='synthetic_scenes/tiny', data_dir=_DATA_DIR.value,
                        build_if_missing=True)
  results = {}
  for fused in (True, False) if _LOOP.value else (True,):
    config.model.mlore.fused = fused
    trainer = train.Trainer(config, tempfile.mkdtemp())
    batch = next(input_pipeline.make_train_iterator(config, trainer.tasks,
                                                    source=trainer.train_source))
    compile_s, med, fastest = train_step.time_train_step(trainer, batch, flags.FLAGS.steps)
    name = 'fused experts' if fused else 'per-expert loop'
    results[fused] = med
    print(f'MLoRE ViT-{_VIT.value} 512x512 batch 2 fp32 | {name}: compile {compile_s:.1f} s | '
          f'median {med * 1e3:.0f} ms/step (min {fastest * 1e3:.0f}) | {2 / med:.3f} img/s | '
          f'huge pages {xla_cpu.host_huge_pages()} | '
          f'peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB',
          flush=True)
  if _LOOP.value:
    print(f'speedup of the fused experts over the loop: {results[False] / results[True]:.2f}x')


if __name__ == '__main__':
  app.run(main)
