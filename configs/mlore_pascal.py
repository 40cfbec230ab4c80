r"""MLoRE (ViT + mixture of low-rank experts) on PASCAL-Context: the official recipe.

Recipe: docs/mlore.md §5.

  python -m mtl_jax.tools.convert --format=timm_vit --input=VIT_L16_AUGREG_384.npz \
      --config=configs/mlore_pascal.py --output=runs/vitL_imagenet
  python launch.py --config=configs/mlore_pascal.py --workdir=runs/mlore_pascal_vitL \
      --config.dataset.data_dir=DATA_DIR --config.init_from=runs/vitL_imagenet
  python launch.py --config=configs/mlore_pascal.py:vit=S --workdir=runs/mlore_pascal_vitS ...

Model (docs/mlore.md §1-3): ViT `vit` (S/16, B/16 or L/16; drop path 0.15) at 512x512 (32x32
tokens; the router's position-Linear locks the model to this size), MLoRE decoder with C channels,
15 low-rank experts per MoE block (ranks `rank_list`), a task LoRA of rank `spe_rank`, top-9
gates without renormalisation (`pre_softmax` False), one ConvHead per task. Per vit (C, ranks,
spe_rank, edge_w, load balancing; parameters, `python -m mtl_jax.tools.params --config=...`):
  S: 192, 8..64 step 4, 32, 0.95, 1e-4;   42,176,918
  B: 640, 16..128 step 8, 64, 0.95, 1e-4; 259,132,406 (the reference's 285,794,210 minus its
     26,661,804 parameters that never run: aux_heads, q_fuse, classify_route, §3.5)
  L: 452, 16..128 step 8, 72, 0.925, 3e-4; 407,690,406
The ViT starts from ImageNet AugReg weights (`config.init_from`, converted as above from timm's
`vit_{small,base,large}_patch16_384` .npz; §3.6), the decoder from its initialisation.

Recipe (§4, §5): Adam with coupled L2 weight decay 1e-6 on every parameter (torch.optim.Adam),
lr 2e-5, polynomial decay (power 0.9) to 0 over 40,000 iterations without warmup, global-norm
clipping 10, global batch 4 (SyncBatchNorm = BatchNorm over the global batch), fp32, seed 0.
Losses: semseg 1, human_parts 2, sal 5 (2-class CE with batch-adaptive weights), normals 10,
edge 50 (weighted BCE, edge_w), + load balancing x L_cv of the 8 gate sets. Augmentation 'mlore'
(§5.1): random scale U(0.5, 2.0), 512x512 crop (cat_max_ratio 0.75), flip, photometric
distortion; eval pads to 512x512. Convention 'mlore' (2-channel saliency, the reference's maxF
with its double sigmoid). Eval every 2,000 iterations and at the end (the last checkpoint counts).
With more than 4 devices raise `--config.batch_size` to a multiple of the device count (this
changes the recipe); `--config.model.dtype=bfloat16` speeds up accelerators (the reference is fp32).
`repara`: eval with the re-parameterised MoE (§3.4; same outputs, other FLOPs).

Runtime: unmeasured on accelerators. On the 2-core CPU one fp32 ViT-S train step of batch 2 at
512x512 takes 7.6-8.1 s with `host_huge_pages` (2026-12-07, benchmarks/mlore_step.py; the
official code 14.1-15.7 s side by side, 1.90x, benchmarks/RESULTS.md); the full recipe is
GPU/TPU work (the reference trains on 2 GPUs).

Expected (the reference README, §5; semseg mIoU / human_parts mIoU / sal maxF / normals mean deg
/ edge odsF): ViT-L 81.41 / 70.52 / 84.90 / 13.51 / 75.42; ViT-B 79.26 / 67.82 / 85.31 / 13.65 /
74.69; ViT-S: no published numbers. odsF comes from the boundary evaluation of saved edge maps
(mtl_jax/boundary.py; `--config.eval_boundary=True` in eval runs).

Args: vit ('S' | 'B' | 'L', default 'L'), repara (False), smoke (a tiny ViT + MLoRE on
synthetic_scenes/tiny at 32x32, 5 experts, 6 steps of batch 4: tests and CPU checks).
"""

from configs import common

PASCAL_TASKS = 'semseg,human_parts,sal,normals,edge'  # docs/mlore.md §1 order
# vit -> (C = final_embed_dim, rank_list, spe_rank, edge_w, load-balancing weight), §1 table.
PASCAL = {
    'S': (192, tuple(range(8, 65, 4)), 32, 0.95, 1e-4),
    'B': (640, tuple(range(16, 129, 8)), 64, 0.95, 1e-4),
    'L': (452, tuple(range(16, 129, 8)), 72, 0.925, 3e-4),
}


def get_config(arg=None):
  arg = common.parse_arg(arg, vit='L', repara=False, smoke=False)
  if arg.vit not in PASCAL:
    raise ValueError(f'unknown vit {arg.vit!r}; use one of {", ".join(PASCAL)}')
  channels, ranks, spe_rank, edge_w, lb = PASCAL[arg.vit]
  c = experiment(arg, dataset='pascal_context', tasks=PASCAL_TASKS, crop_size=(512, 512),
                 learning_rate=2e-5, pre_softmax=False)
  c.model.mlore.update(channels=channels, rank_list=ranks, spe_rank=spe_rank)
  c.edge_w = edge_w
  c.load_balancing_weight = lb
  if arg.smoke:
    shrink(c, synthetic_tasks=PASCAL_TASKS)
  return c


def experiment(arg, *, dataset: str, tasks: str, crop_size: tuple[int, int],
               learning_rate: float, pre_softmax: bool):
  """The MLoRE-repo recipe shared by configs/mlore_{pascal,nyud}.py (§5); the caller sets the
  decoder size, edge_w and the load-balancing weight. `arg` has vit and repara."""
  c = common.get_config()
  c.dataset.name = dataset
  c.tasks = tasks
  c.convention = 'mlore'
  # Loss weights: the common defaults are MLoRE's (semseg 1, human_parts 2, sal 5, normals 10,
  # edge 50, depth 1; §4).

  c.input.augment = 'mlore'
  c.input.crop_size = crop_size
  c.input.scale_range = (0.5, 2.0)
  c.input.cat_max_ratio = 0.75
  c.input.flip = True
  c.input.photometric = True

  c.model.name = 'mlore'
  c.model.dtype = 'float32'
  c.model.backbone = dict(name='', variant=f'{arg.vit}/16', patch_size=0, embed_dim=0, depth=0,
                          num_heads=0, taps=(), drop_path_rate=0.15, remat='none',
                          attention='auto')
  c.model.mlore = dict(channels=0, rank_list=(), spe_rank=0, topk=9, pre_softmax=pre_softmax,
                       repara=arg.repara)

  c.seed = 0
  c.total_steps = 40_000
  c.batch_size = 4
  c.eval_batch_size = 4
  c.log_every_steps = 50
  c.eval_every_steps = 2_000
  c.checkpoint_every_steps = 2_000
  c.optimizer.update(name='adam', learning_rate=learning_rate, b1=0.9, b2=0.999, eps=1e-8,
                     weight_decay=1e-6, grad_clip_norm=10.0, decay_1d=True, no_decay=())
  c.schedule.update(name='poly', power=0.9, warmup_steps=0, warmup_lr=0.0, min_lr=0.0)
  c.host_huge_pages = not arg.smoke  # configs/common.py
  if arg.vit == 'L':  # FSDP: parameters and Adam moments split over the data axis (README)
    c.param_sharding = (('.*', 'fsdp:data'),)
  return c


def shrink(c, *, synthetic_tasks: str):
  """`smoke`: a tiny ViT + MLoRE on synthetic_scenes/tiny at 32x32, 6 steps of batch 4 (CPU)."""
  c.dataset.update(name='synthetic_scenes/tiny', build_if_missing=True)
  c.tasks = synthetic_tasks
  c.input.crop_size = (32, 32)
  c.model.backbone.update(variant='', patch_size=8, embed_dim=16, depth=4, num_heads=2,
                          taps=(1, 2, 3), drop_path_rate=0.1)
  c.model.mlore.update(channels=8, rank_list=(1, 2, 2, 3, 4), spe_rank=2, topk=3)
  common.smoke_schedule(c, batch_size=4)
