r"""Times one ProMLoRA train step (Swin-T 448x448, shared LoRA r32, 50 prompt tokens, 4 PASCAL
tasks), compile excluded.

  python benchmarks/promlora_step.py                        # r32 prom50, batch 2, fp32, median of 5
  python benchmarks/promlora_step.py --rank=64 --tokens=60

configs/promlora_pascal.py (the fork's model, trainable set, AdamW, clipping and losses) with
batch 2 in float32, on one device, timed as benchmarks/mtlora_step.py times MTLoRA (one batch of
the procedural dataset reused; first step = compile, then the median of --steps). The fork's
PyTorch figure on the same setup: benchmarks/reference_promlora_step.py. Record results in
benchmarks/RESULTS.md with the machine, date, load and command.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from benchmarks import mtlora_step  # defines --rank, --batch_size, --data_dir, --steps
from configs import promlora_pascal

_TOKENS = flags.DEFINE_integer('tokens', 50, 'Prompt tokens per block and task.')


def main(argv):
  del argv
  rank, tokens = flags.FLAGS.rank, _TOKENS.value
  mtlora_step.time_config(f'ProMLoRA r{rank} prom{tokens} Swin-T',
                          promlora_pascal.get_config(f'rank={rank},tokens={tokens}'))


if __name__ == '__main__':
  flags.FLAGS.set_default('steps', 5)
  flags.FLAGS.set_default('rank', 32)
  app.run(main)
