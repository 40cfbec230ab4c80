r"""The demo: a tiny MLoRE learning all six tasks of the procedural `synthetic_scenes`.

No download: the dataset (64x80 renders, 2000 train / 250 validation) is built on first use into
the TFDS data dir (~40 s on 2 cores). Run from the repository root:

  python launch.py --config=configs/demo.py --workdir=runs/demo

Model (`model=mlore`, the default): configs/mlore_pascal.py's structure at toy size. ViT patch 8,
width 64, depth 4 (8x10 tokens; taps after blocks 1, 2, 3 + the final map), MLoRE decoder with
C = 32, 15 low-rank experts of ranks 1..8, top-9 routing, task LoRA rank 4, load-balancing
weight 1e-4, one ConvHead per task at 1/2 resolution; 789,195 parameters. AdamW 2e-3, warmup +
cosine, batch 8, 2500 steps.

Runtime on a 2-core CPU (the project's CI machine kind, 2026-11-21): dataset build ~30-40 s,
2500 steps at ~4 steps/s (~32 img/s) plus 6 evals: 12 min wall (11 min 57 s with the dataset
already built).

Eval on the validation split, step 0 -> step 2500 (deterministic on CPU; measured 2026-12-02 at
commit 399af09, which the methods seam reproduces bit for bit; README.md repeats these):
  semseg mIoU      0.51 -> 42.06   threshold >= 3x chance = 3 x 100/7 classes = 42.9 (missed)
  human_parts mIoU 0.43 -> 29.19   (only images with a figure count)
  sal maxF        23.50 -> 81.22
  normals mean    47.94 -> 16.17 deg threshold < 30 deg
  depth RMSE      3.98 -> 0.943 m  threshold < 0.5 x rmse_predict_mean (1.969 m) = 0.985 m
  edge loss      0.0701 -> 0.0594
Every task's final eval beats its step-0 eval; tests/test_train.py runs a shortened version.

`model=vit_baseline`: the ViT alone with a 1x1 fuse of the 4 maps to 32 channels, x2 upsample and
the heads at 1/4 resolution (282,323 parameters), batch 16: ~5 min on the same machine; step 0 ->
2500: semseg 5.10 -> 45.19, human_parts 1.35 -> 28.77, sal 23.50 -> 84.74, normals 94.9 ->
14.24 deg, depth 3.98 -> 0.890 m, edge 0.0701 -> 0.0590. The trainer-mechanics tests run it
(it compiles in seconds).

Training methods (docs/methods.md), `model=vit_baseline,method=M` for 300 steps
(`--config.total_steps=300 --config.eval_every_steps=300 --config.checkpoint_every_steps=300
--config.schedule.warmup_steps=20`; dwa `--config.dwa.period=25`, taml `--config.taml.lam=0.1`),
2-core CPU, 2026-12-03; wall time, then step-300 eval semseg / sal maxF / normals / depth
(step 0: 5.10 / 23.50 / 94.9 deg / 3.98 m; every method trains all parameters here):
  mtl          97 s   18.37 / 49.50 / 26.12 / 1.358  (wall time includes the dataset build)
  maml        205 s   17.07 / 45.09 / 27.79 / 1.512
  metasgd     409 s   12.81 / 41.92 / 61.59 / 1.786
  taml        223 s   17.07 / 45.09 / 27.79 / 1.512  (= maml: the spread is logged, not trained)
  reptile     218 s    7.34 / 23.50 / 85.89 / 3.902  (steps of lr * inner_lr * g, as the fork)
  uncertainty  68 s   18.12 / 48.81 / 26.20 / 1.380
  dwa          60 s   18.20 / 49.40 / 26.26 / 1.362
  pcgrad      159 s   18.76 / 52.28 / 25.26 / 1.339
  famo         76 s   19.01 / 52.13 / 26.18 / 1.352

Args (`--config=configs/demo.py:smoke,model=vit_baseline`): model ('mlore' | 'vit_baseline'),
method (`config.method`, docs/methods.md; default 'mtl'), smoke (shrinks model and schedule: 6
steps; tests and CPU checks).
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, model='mlore', method='mtl', smoke=False)
  c = common.get_config()
  c.method = arg.method  # mtl_jax/methods, docs/methods.md
  c.dataset.name = 'synthetic_scenes/small'
  c.dataset.build_if_missing = True
  c.tasks = 'semseg,human_parts,sal,normals,depth,edge'
  c.input.crop_size = (64, 80)  # the rendered size: crop and pad are no-ops, flips + colour jitter
  # No random rescaling: it makes monocular depth scale-ambiguous (depth / s with an unchanged
  # horizon), which a short run cannot learn around. The MLoRE configs use (0.5, 2.0).
  c.input.scale_range = (1.0, 1.0)
  c.loss_weights.semseg = 3.0  # MLoRE PASCAL weights otherwise (human_parts 2, sal 5, ...)

  # ViT patch 8 on 64x80: an 8x10 token grid, taps after blocks 1, 2, 3 + the final map.
  c.model.backbone = dict(name='', variant='', patch_size=8, embed_dim=64, depth=4, num_heads=2,
                          taps=(1, 2, 3), drop_path_rate=0.0, remat='none',
                          attention='auto')
  if arg.model == 'mlore':
    # MLoRE (configs/mlore_pascal.py's structure): 15 experts with ranks 1..8 (sum 64 = 2C, as
    # ViT-S's 540 ~ 2.8C), top-9 routing, task LoRA rank 4; heads at 1/2 resolution (x4 of the
    # token grid, as in the reference).
    c.model.name = 'mlore'
    c.model.mlore = dict(channels=32, rank_list=(1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8),
                         spe_rank=4, topk=9, pre_softmax=False, repara=False)
    c.load_balancing_weight = 1e-4
    c.batch_size = 8
  elif arg.model == 'vit_baseline':
    c.model.name = 'vit_baseline'
    c.model.decoder = dict(channels=32, upsample=2)  # heads at 1/4 resolution
    c.batch_size = 16
  else:
    raise ValueError(f"unknown model {arg.model!r}; use 'mlore' or 'vit_baseline'")

  c.total_steps = 2500
  c.eval_batch_size = 64
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  c.optimizer.update(name='adamw', learning_rate=2e-3, weight_decay=0.05, grad_clip_norm=1.0,
                     decay_1d=False)
  c.schedule.update(name='warmup_cosine', warmup_steps=100, warmup_lr=0.0, min_lr=1e-5)

  if arg.smoke:
    common.smoke_schedule(c, batch_size=8)
    c.schedule.warmup_steps = 2
    c.model.backbone.update(embed_dim=32, depth=2, taps=(1, 1, 1))
    if arg.model == 'mlore':
      c.model.mlore.update(channels=8, rank_list=(1, 2, 2, 3, 4), spe_rank=2, topk=3)
    else:
      c.model.decoder.channels = 16
  return c
