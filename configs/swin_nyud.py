r"""Swin baselines on NYUD-v2: multi-task (or single-task) full fine-tuning, or decoders only.

  python launch.py --config=configs/swin_nyud.py --workdir=runs/swin_nyud \
      --config.dataset.data_dir=DATA_DIR --config.init_from=CONVERTED_SWIN_T_IMAGENET
  python launch.py --config=configs/swin_nyud.py:tasks=depth --workdir=runs/swin_nyud_depth

As configs/swin_pascal.py (same args) on semseg, normals, depth, edge with the NYUD recipe of
configs/mtlora_nyud.py (the user's `swin_tiny_patch4_window7_448_nyud_alltask` configs,
docs/user_fork.md §6).

Runtime: unmeasured. Expected: the user's single-task baselines (docs/user_fork.md §6) semseg
mIoU 40.65, normals mean 22.97 deg, depth RMSE 0.64 (units unresolved there).
"""

from configs import common
from configs import mtlora_nyud
from configs import mtlora_pascal


def get_config(arg=None):
  arg = common.parse_arg(arg, variant='T', recipe='full', tasks=mtlora_nyud.NYUD_TASKS,
                         epochs=300, smoke=False)
  return mtlora_pascal.experiment(arg, model='swin', dataset='nyud_v2')
