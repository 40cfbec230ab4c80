r"""MTLoRA (Swin-T) on NYUD-v2: the PASCAL recipe on the four NYUD tasks (docs/user_fork.md §6).

  python launch.py --config=configs/mtlora_nyud.py --workdir=runs/mtlora_nyud \
      --config.dataset.data_dir=DATA_DIR --config.init_from=CONVERTED_SWIN_T_IMAGENET

As configs/mtlora_pascal.py (same args, model, optimizer and schedule; see its docstring) with
tasks semseg (40 classes), normals, depth, edge (weights 1, 10, 1, 50); augmentation flip and a
scale from {1.0, 1.2, 1.5} without rotation, resize to 448x448 (aspect ratio not kept), eval at
448x448. 795 training images: 24 steps per epoch of batch 32, 7,200 steps in 300 epochs,
warmup 480 steps.

Runtime: unmeasured. Expected: no published MTLoRA NYUD numbers; the user's single-task Swin-T
baselines (docs/user_fork.md §6) are semseg mIoU 40.65, normals mean 22.97 deg, depth RMSE 0.64.
"""

from configs import common
from configs import mtlora_pascal

NYUD_TASKS = 'semseg+normals+depth+edge'


def get_config(arg=None):
  arg = common.parse_arg(arg, rank=64, task_rank=4, plus=False, variant='T', recipe='mtlora',
                         method='mtl', tasks=NYUD_TASKS, epochs=300, smoke=False)
  return mtlora_pascal.experiment(arg, model='mtlora', dataset='nyud_v2')
