r"""MTLoRA (Swin-T, ImageNet-1k init) on PASCAL-Context, the official recipe (docs/mtlora.md §8).

  python launch.py --config=configs/mtlora_pascal.py --workdir=runs/mtlora_r64 \
      --config.dataset.data_dir=DATA_DIR --config.init_from=CONVERTED_SWIN_T_IMAGENET
  python launch.py --config=configs/mtlora_pascal.py:rank=16,plus --workdir=runs/mtlora_plus_r16

Two-stage training (the fork's `_stage1` / `_stage2`, docs/methods.md §6), one command per stage:

  python launch.py --config=configs/mtlora_pascal.py:recipe=freeze_ts_lora --workdir=runs/stage1 \
      --config.dataset.data_dir=DATA_DIR --config.init_from=CONVERTED_SWIN_T_IMAGENET
  python launch.py --config=configs/mtlora_pascal.py:recipe=freeze_ta_lora --workdir=runs/stage2 \
      --config.dataset.data_dir=DATA_DIR --config.init_from=runs/stage1 --config.init_opt_state=True

Without `init_opt_state` stage 2 takes the weights only; the schedule restarts at step 0 (the
fork's behaviour) unless `--config.init_schedule=continue` (total_steps then counts both stages).

The fork's meta-learning (`_pertask_maml` etc., docs/methods.md §2-§3): only the LoRA trains, the
decoders stay at their initialisation unless loaded (`recipe=mtlora` trains them too):

  python launch.py --config=configs/mtlora_pascal.py:method=maml,recipe=lora_only \
      --workdir=runs/maml --config.dataset.data_dir=DATA_DIR --config.init_from=CONVERTED_SWIN_T
  (method=reptile | metasgd | taml likewise; --config.maml.inner_lr=0.001
  --config.maml.inner_steps=1 --config.taml.lam=0.1; any config: method=uncertainty | dwa |
  pcgrad | famo)
  MAML runtime on the 2-core CPU (224², batch 4, 2026-12-07): compile 103 s, step 1.84x the
  default step, with the default `config.maml.loop=scan` (the unrolled loop: 1,165 s compile;
  benchmarks/RESULTS.md); Reptile: compile 131 s, step 3.44x the default step.

Gradient-conflict ratio every 50 steps (the fork's TRAIN.ENABLE_CONFLICT_RATIO, written to
WORKDIR/conflict_ratio.txt with this config's epochs): `--config.conflict.every_steps=50`.

Model: Swin-T 448x448 with MTLoRA (TA-LoRA rank `rank` on every qkv/proj/fc1/fc2, TS-LoRA rank
`task_rank` per task on proj/fc1/fc2 of the last block of each stage, scales 4.0, LoRA dropout
0.05; `plus`: MTLoRA+, TA-LoRA on the PatchMerging reductions too), per-task 1x1 downsamplers to
(18, 36, 72, 144) channels and HRNet heads. Trainable set = `recipe` (mtl_jax/models/mtlora.py
`frozen_patterns`): 'mtlora' trains LoRA, patch embedding, LayerNorms, relative position tables,
the reductions (not with `plus`) and the decoders. Counts (`python -m mtl_jax.tools.params
--config=...`): default r64 34,262,906 total / 8,344,634 trainable; `rank=16,plus` 30,935,930 /
3,469,370 (docs/mtlora.md §5).

Recipe: AdamW (0.9, 0.999, eps 1e-8), weight decay 0.05 except 1-D parameters (biases, norms;
the relative position tables are decayed, as in the reference); lr 5e-4 * batch / 512 after a
linear warmup from 5e-7 * batch / 512 over 20 epochs, then a per-step cosine to
5e-6 * batch / 512 at epoch 300; global-norm clipping 5.0; batch 32 (`--config.batch_size`
rescales the learning rates and the step counts). Steps are counted in epochs of the 4998
training images with drop_last: 156 steps per epoch, 46,800 in all, eval every 5 epochs (780
steps), checkpoint every 20 (3,120). Losses: semseg 1, human_parts 2, sal 5 (balanced BCE),
normals 10, edge 50 (w 0.95); convention 'mtlora' (1-channel saliency, saliency mIoU).
Augmentation 'mtlora': flip, rotation U(-20, 20) and scale U(0.75, 1.25), resize to 448x448;
eval at 448x448. bfloat16 compute replaces the reference's fp16 AMP.

The backbone must start from ImageNet-1k Swin-T (`config.init_from`, converted with
mtl_jax/tools/convert.py, docs/mtlora.md §7); LoRA B = 0 then makes the model start exactly at
the pretrained backbone.

Runtime: unmeasured on accelerators. On the 2-core CPU one fp32 train step of batch 2 takes
3.5 s with `host_huge_pages` after a ~55 s compile (2026-12-06, benchmarks/mtlora_step.py; the
official PyTorch code 5.3-5.5 s side by side, benchmarks/RESULTS.md); the full recipe is GPU/TPU
work.

Expected (docs/datasets_metrics.md §5.3, paper, MTLoRA r=64): semseg mIoU 67.90, human_parts
mIoU 59.84, saliency mIoU 65.40, normals mean 16.60 deg, Δm +2.55% (community reproduction:
68.38 / 59.58 / 63.85 / 16.76).

Args: rank (64), task_rank (4), plus (False), variant ('T' | 'S' | 'B'), recipe ('mtlora' |
'full' | 'freeze_backbone' | 'freeze_ta_lora' | 'freeze_ts_lora' | 'lora_only'), method
(`config.method`, default 'mtl'), tasks ('+'-separated, e.g.
`tasks=semseg+sal`), epochs (300), smoke (a two-stage Swin of width 8 on synthetic_scenes/tiny at
32x32, rank 4 / task rank 2, fp32, 6 steps of batch 4: tests and CPU checks; compiles in about
30 s on 2 CPU cores).
"""

from configs import common
from mtl_jax.models import mtlora

TRAIN_IMAGES = {'pascal_context': 4998, 'nyud_v2': 795}  # docs/datasets_metrics.md §1.1, §2.2
PASCAL_TASKS = 'semseg+normals+sal+human_parts'


def get_config(arg=None):
  arg = common.parse_arg(arg, rank=64, task_rank=4, plus=False, variant='T', recipe='mtlora',
                         method='mtl', tasks=PASCAL_TASKS, epochs=300, smoke=False)
  return experiment(arg, model='mtlora', dataset='pascal_context')


def experiment(arg, *, model: str, dataset: str):
  """The MTLoRA-repo recipe for `model` ('mtlora' | 'swin') on `dataset` (shared by
  configs/{mtlora,swin}_{pascal,nyud}.py). `arg` has variant, recipe, tasks, epochs, smoke and,
  for 'mtlora', rank, task_rank and plus."""
  c = common.get_config()
  c.method = arg.get('method', 'mtl')
  c.dataset.name = dataset
  c.tasks = arg.tasks.replace('+', ',')  # ',' separates config args, '+' tasks
  c.convention = 'mtlora'
  c.edge_w = 0.95  # loss weights: the common defaults (semseg 1, parts 2, sal 5, normals 10, ...)

  c.input.augment = 'mtlora'
  c.input.crop_size = (448, 448)
  c.input.flip = True
  if dataset == 'nyud_v2':  # docs/user_fork.md §6: scales {1, 1.2, 1.5}, no rotation
    c.input.rotation_range = (0.0, 0.0)
    c.input.scale_choices = (1.0, 1.2, 1.5)
  else:
    c.input.rotation_range = (-20.0, 20.0)
    c.input.scale_range = (0.75, 1.25)

  c.model.name = model
  c.model.dtype = 'bfloat16'
  c.model.backbone = dict(name='', variant=arg.variant, patch_size=0, embed_dim=0, depths=(),
                          num_heads=(), window_size=0, mlp_ratio=4.0,
                          drop_path_rate=0.3 if arg.variant == 'B' else 0.2, remat='none')
  c.model.decoder = dict(channels=(18, 36, 72, 144))
  lora_reduction = False
  if model == 'mtlora':
    lora_reduction = arg.plus
    c.model.mtlora = dict(
        rank=(arg.rank,), task_rank=(arg.task_rank,), shared_scale=(4.0,), task_scale=(4.0,),
        dropout=(0.05,), shared_mode='matrix',
        layers=('qkv', 'proj', 'fc1', 'fc2') + (('reduction',) if arg.plus else ()))
  c.frozen = mtlora.frozen_patterns(arg.recipe, lora_reduction=lora_reduction)

  c.batch_size = 32
  batch = c.get_ref('batch_size')
  steps_per_epoch = TRAIN_IMAGES[dataset] // batch  # drop_last
  c.total_steps = steps_per_epoch * arg.epochs
  c.log_every_steps = 50
  c.eval_every_steps = steps_per_epoch * 5
  c.steps_per_epoch = steps_per_epoch
  c.checkpoint_every_steps = steps_per_epoch * 20
  c.optimizer.update(name='adamw', b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
                     grad_clip_norm=5.0, decay_1d=False, no_decay=())
  c.optimizer.learning_rate = batch.to_float() * (5e-4 / 512)
  c.schedule.update(name='warmup_cosine')
  c.schedule.warmup_steps = steps_per_epoch * 20
  c.schedule.warmup_lr = batch.to_float() * (5e-7 / 512)
  c.schedule.min_lr = batch.to_float() * (5e-6 / 512)
  c.host_huge_pages = not arg.smoke  # configs/common.py

  if arg.smoke:
    shrink(c)
  return c


def shrink(c) -> None:
  """The `smoke` arg of the Swin recipes (also configs/fork_yaml.py): a two-stage Swin of width
  8 on synthetic_scenes/tiny at 32x32, fp32, 6 steps of batch 4."""
  c.dataset.update(name='synthetic_scenes/tiny', build_if_missing=True)
  c.input.crop_size = (32, 32)
  c.model.dtype = 'float32'
  # Two stages keep every structural feature (shifted windows with masks in both, PatchMerging
  # of every stream, task streams per stage) at a fraction of the compile time.
  c.model.backbone.update(variant='', patch_size=2, embed_dim=8, depths=(2, 2),
                          num_heads=(1, 2), window_size=4, drop_path_rate=0.1)
  c.model.decoder.channels = (4, 8)
  if c.model.name == 'mtlora':
    c.model.mtlora.update(rank=(4,), task_rank=(2,))
  common.smoke_schedule(c, batch_size=4)
  c.schedule.warmup_steps = 2
