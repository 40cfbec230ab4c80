r"""ProMLoRA (Swin-T/B) on NYUD-v2: the PASCAL recipe on the NYUD tasks (docs/user_fork.md §2, §6).

  python launch.py --config=configs/promlora_nyud.py:rank=64,tokens=60 --workdir=runs/prom_nyud \
      --config.dataset.data_dir=DATA_DIR --config.init_from=CONVERTED_SWIN_T_IMAGENET

The fork's yamls (configs/mtlora/tiny_448/nyud/...; the user's runs use three tasks):
  promlora_tiny_448_r64_prom60_scale4_pertask_nyud:
    configs/promlora_nyud.py:rank=64,tokens=60,tasks=semseg+normals+depth
    34,317,806 total / 8,399,534 trainable (`python -m mtl_jax.tools.params`, last line)
  promlora_tiny_448_r64_prom50_scale4_pertask_nyud:
    configs/promlora_nyud.py:rank=64,tokens=50,tasks=semseg+normals+depth

As configs/promlora_pascal.py (same args, model, trainable set, optimizer, schedule; see its
docstring) with the NYUD tasks (semseg 40 classes, normals, depth, edge by default; weights 1,
10, 1, 50), augmentation flip and a scale from {1.0, 1.2, 1.5} without rotation, resize to
448x448, eval at 448x448; 795 training images: 24 steps per epoch of batch 32.

Runtime: unmeasured on accelerators. Expected: no published ProMLoRA NYUD numbers; the user's
single-task Swin-T baselines (docs/user_fork.md §6) are semseg mIoU 40.65, normals mean 22.97
deg, depth RMSE 0.64.
"""

from configs import common
from configs import mtlora_nyud
from configs import promlora_pascal


def get_config(arg=None):
  arg = common.parse_arg(arg, tasks=mtlora_nyud.NYUD_TASKS, **promlora_pascal.DEFAULTS)
  return promlora_pascal.experiment(arg, dataset='nyud_v2')
