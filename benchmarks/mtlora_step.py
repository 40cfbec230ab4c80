r"""Times one MTLoRA train step (Swin-T 448x448, TA-LoRA r64, 4 PASCAL tasks), compile excluded.

  python benchmarks/mtlora_step.py                     # MTLoRA r64, batch 2, fp32, median of 5
  python benchmarks/mtlora_step.py --rank=16 --plus    # MTLoRA+ r16
  python benchmarks/mtlora_step.py --swin              # then Swin-T full fine-tuning too

configs/mtlora_pascal.py (the recipe's model, trainable set, AdamW, clipping and losses) with
batch 2 in float32 (the recipe's bfloat16 is for accelerators), on one device. One batch of the
procedural dataset through the 'mtlora' chain (resized to 448x448; built into --data_dir if
missing) is reused, so the figure is the device step alone; it is timed with
benchmarks/train_step.py's `time_train_step` (first step = compile, then the median of --steps).
The reference's figures on the same setup are in docs/mtlora.md §11 and
benchmarks/reference_mtlora_step.py. Record results in benchmarks/RESULTS.md with the machine,
date and command.
"""

import os
import resource
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax

from benchmarks import train_step
from configs import mtlora_pascal
from configs import swin_pascal
from mtl_jax import input_pipeline
from mtl_jax import train
from mtl_jax import xla_cpu
from mtl_jax.tools import params

_RANK = flags.DEFINE_integer('rank', 64, 'TA-LoRA rank of configs/mtlora_pascal.py.')
_PLUS = flags.DEFINE_bool('plus', False, 'MTLoRA+ (TA-LoRA on the PatchMerging reductions).')
_BATCH = flags.DEFINE_integer('batch_size', 2, 'Global batch size.')
_SWIN = flags.DEFINE_bool('swin', False, 'Also time configs/swin_pascal.py (full fine-tuning).')
_DATA_DIR = flags.DEFINE_string('data_dir', os.path.join(tempfile.gettempdir(), 'mtl_jax_bench'),
                                'TFDS data dir for synthetic_scenes/tiny.')


def time_config(name: str, config) -> None:
  """Prints compile time, median and fastest step of `config` at --batch_size in fp32."""
  train_step.set_host_memory(config)
  config.batch_size = _BATCH.value
  config.model.dtype = 'float32'
  config.dataset.update(name='synthetic_scenes/tiny', data_dir=_DATA_DIR.value,
                        build_if_missing=True)
  counts = params.count(config)['<all>']
  trainer = train.Trainer(config, tempfile.mkdtemp(), jax.devices()[:1])
  batch = next(input_pipeline.make_train_iterator(config, trainer.tasks,
                                                  source=trainer.train_source))
  compile_s, med, fastest = train_step.time_train_step(trainer, batch, flags.FLAGS.steps)
  print(f'{name} 448x448 batch {_BATCH.value} fp32 ({counts["trainable"]:,} of '
        f'{counts["total"]:,} params trainable) | first step (compile) {compile_s:.1f} s | '
        f'median {med * 1e3:.0f} ms/step (min {fastest * 1e3:.0f}) | '
        f'{_BATCH.value / med:.3f} img/s | huge pages '
        f'{xla_cpu.host_huge_pages()} | peak RSS '
        f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB', flush=True)


def main(argv):
  del argv
  plus = ',plus' if _PLUS.value else ''
  time_config(f'MTLoRA{"+" if _PLUS.value else ""} r{_RANK.value} Swin-T',
        mtlora_pascal.get_config(f'rank={_RANK.value}{plus}'))
  if _SWIN.value:
    time_config('Swin-T full fine-tuning', swin_pascal.get_config())


if __name__ == '__main__':
  flags.FLAGS.set_default('steps', 5)
  app.run(main)
