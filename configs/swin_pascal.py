r"""Swin baselines on PASCAL-Context: multi-task (or single-task) fine-tuning, or decoders only.

  python launch.py --config=configs/swin_pascal.py --workdir=runs/swin_mtl \
      --config.dataset.data_dir=DATA_DIR --config.init_from=CONVERTED_SWIN_T_IMAGENET
  python launch.py --config=configs/swin_pascal.py:tasks=semseg --workdir=runs/swin_st_semseg
  python launch.py --config=configs/swin_pascal.py:recipe=freeze_backbone --workdir=runs/swin_dec

Model: Swin-T 448x448 (`variant=B`: Swin-B, drop path 0.3, docs/user_fork.md §5) with per-task
1x1 downsamplers to (18, 36, 72, 144) channels and HRNet heads (docs/mtlora.md §3), i.e. the
MTLoRA repo's `swin_tiny_patch4_window7_448` config: 29,464,442 parameters for the four tasks,
all trainable (`recipe=full`); `recipe=freeze_backbone` trains only the decoders (1,946,624).
Optimizer, schedule, losses and augmentation: as configs/mtlora_pascal.py (AdamW wd 0.05, lr
5e-4 * batch / 512, 20 warmup epochs, cosine to epoch 300, clip 5, batch 32, 46,800 steps).

Runtime: unmeasured on accelerators (CPU step time: benchmarks/RESULTS.md).

Expected (docs/datasets_metrics.md §5.3, paper rows, Swin-T 448², semseg mIoU / human_parts
mIoU / saliency mIoU / normals mean deg): multi-task full fine-tuning 67.56 / 60.24 / 65.21 /
16.64 (Δm +2.23%); single-task full fine-tuning, one run per `tasks=` (the Δm baseline): 67.21 /
61.93 / 62.35 / 17.97; decoders only [unconfirmed]: 65.09 / 53.48 / 57.46 / 20.69.

Args: variant ('T' | 'S' | 'B'), recipe ('full' | 'freeze_backbone'), tasks ('+'-separated, e.g.
`tasks=semseg` for a single-task baseline), epochs (300), smoke (tiny Swin, synthetic data).
"""

from configs import common
from configs import mtlora_pascal


def get_config(arg=None):
  arg = common.parse_arg(arg, variant='T', recipe='full', tasks=mtlora_pascal.PASCAL_TASKS,
                         epochs=300, smoke=False)
  return mtlora_pascal.experiment(arg, model='swin', dataset='pascal_context')
