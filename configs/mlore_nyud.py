r"""MLoRE (ViT-L) on NYUD-v2, the official recipe (docs/mlore.md §1, §5).

  python -m mtl_jax.tools.convert --format=timm_vit --input=VIT_L16_AUGREG_384.npz \
      --config=configs/mlore_nyud.py --output=runs/vitL_imagenet_nyud
  python launch.py --config=configs/mlore_nyud.py --workdir=runs/mlore_nyud_vitL \
      --config.dataset.data_dir=DATA_DIR --config.init_from=runs/vitL_imagenet_nyud

Data: the `invpt` builder config of data_builders/nyud_v2 (InvPT's NYUDv2.tar.gz, the release
MLoRE trains on): 795 train / 654 validation images of 448x576.

Model: ViT-L/16 at 448x576 (28x36 tokens), MLoRE decoder with C = 768, 15 experts of ranks
16..240 (step 16), task LoRA rank 16, top-9 gates renormalised (`pre_softmax` True), one
ConvHead per task (semseg 40 classes, depth, normals, edge): 551,625,533 parameters
(`python -m mtl_jax.tools.params --config=configs/mlore_nyud.py`).

Recipe: as configs/mlore_pascal.py (Adam, coupled L2 1e-6 on everything, poly 0.9 without
warmup over 40,000 iterations, clip 10, global batch 4, fp32) with lr 1e-5, edge_w 0.88 and
load balancing 5e-4. Losses semseg 1, depth 1 (L1 on valid pixels), normals 10, edge 50.
Augmentation 'mlore': random scale U(0.5, 2.0) (depth divided by the scale), 448x576 crop,
flip, photometric distortion; eval pads to 448x576 (a no-op on this release). Depth RMSE over
0 < depth < 80 m, pooled over the validation set.

Runtime: unmeasured on accelerators (the reference trains on 2 GPUs); CPU figures for the
PASCAL ViT-S step are in benchmarks/RESULTS.md.

Expected (the reference README, §5): depth RMSE 0.5076, semseg mIoU 55.96, normals mean 18.33
deg, edge odsF 78.43 (odsF from the boundary evaluation, mtl_jax/boundary.py).

Args: repara (False: eval with the re-parameterised MoE, §3.4), smoke (a tiny ViT + MLoRE on
synthetic_scenes/tiny at 32x32 with the four NYUD tasks, 6 steps of batch 4).
"""

from configs import common
from configs import mlore_pascal

NYUD_TASKS = 'semseg,depth,normals,edge'  # docs/mlore.md §1 order


def get_config(arg=None):
  arg = common.parse_arg(arg, repara=False, smoke=False)
  arg.vit = 'L'
  c = mlore_pascal.experiment(arg, dataset='nyud_v2/invpt', tasks=NYUD_TASKS,
                              crop_size=(448, 576), learning_rate=1e-5, pre_softmax=True)
  c.model.mlore.update(channels=768, rank_list=tuple(range(16, 241, 16)), spe_rank=16)
  c.edge_w = 0.88
  c.load_balancing_weight = 5e-4
  if arg.smoke:
    mlore_pascal.shrink(c, synthetic_tasks=NYUD_TASKS)
  return c
