r"""ProMLoRA (the user fork's method, Swin-T/B) on PASCAL-Context (docs/user_fork.md §2).

  python launch.py --config=configs/promlora_pascal.py --workdir=runs/promlora_r32_prom50 \
      --config.dataset.data_dir=DATA_DIR --config.init_from=CONVERTED_SWIN_T_IMAGENET

One line per fork yaml the user runs (configs/mtlora/...; the fork's `--resume-backbone` is
`--config.init_from` of the Swin ImageNet checkpoint converted with
`python -m mtl_jax.tools.convert --format=swin_imagenet`, prompts and LoRA keep their init):
  tiny_448/pascal/promlora_tiny_448_r32_prom50_scale4_pertask (also the README's top-level path):
    configs/promlora_pascal.py:rank=32,tokens=50            32,610,170 total / 6,691,898 trainable
  tiny_448/pascal/promlora_shared_prompt_tiny_448_r64_prom50_scale4_pertask:
    configs/promlora_pascal.py:rank=64,tokens=50,shared_prompt    34,208,762 / 8,290,490
  tiny_448/pascal/promlora_dynamic_tiny_448_r64_prom50_multi-pool[20,20,20,20]_scale4_pertask:
    configs/promlora_pascal.py:rank=64,tokens=50,dynamic,pools=20+20+20+20  34,137,562 / 8,219,290
  base_448/pascal/promlora_base_448_r64_prom60_scale4_pertask (init from Swin-B 224):
    configs/promlora_pascal.py:variant=B,rank=64,tokens=60  104,142,520 / 20,279,224
  tiny_448/vpt_deep_TASK_tiny_448_prom50_scale4_pertask (prompts only, no LoRA):
    configs/promlora_pascal.py:rank=0,tokens=50
Counts: `python -m mtl_jax.tools.params --config=...` (last line), equal to the fork's model
built from the yaml (tests/test_promlora.py); they include the fork's unused final
`backbone.norm` (mtl_jax/models/promlora.py).

Model: Swin-T (or `variant=B`) 448x448, shared LoRA (SHARED_MODE lora_only) of rank `rank` on
every qkv / proj / fc1 / fc2, scale 4.0, LoRA dropout 0.05; per task `tokens` deep prepended
prompt tokens in every block (`shared_prompt`: one set for all tasks; `dynamic`: per-stage pools
of sizes `pools` mixed by learned per-task gates, '' = `tokens` in every stage); per-task 1x1
downsamplers to (18, 36, 72, 144) and HRNet heads. Trainable set (promlora.frozen_patterns): LoRA,
prompts, patch embedding, LayerNorms, relative position tables, PatchMerging reductions and the
decoders, unless the fork's TRAIN.FREEZE_* flags (`freeze_patch_embed`, `freeze_layer_norm`,
`freeze_downsample_reduction`, `freeze_relative_position_bias`) say otherwise.

Recipe: that of configs/mtlora_pascal.py (AdamW wd 0.05 with prompts and LoRA matrices decayed,
1-D parameters not; lr 5e-4 * batch / 512, 20 warmup epochs, cosine to epoch 300, clip 5; batch
32 — the fork's README runs 12 per GPU for Tiny, 16 for Base: `--config.batch_size` rescales lr
and steps; the fork's `--batch-size` is per GPU).

Runtime: the backbone runs once per task (4 passes over a (tasks x batch) stack); on the 2-core
CPU one fp32 train step of batch 2 takes 10.3-11.0 s with `host_huge_pages` (2026-12-06;
compile ~70 s; benchmarks/promlora_step.py; the fork's PyTorch model: 16.7-18.6 s side by side,
benchmarks/RESULTS.md); the full recipe is GPU/TPU work. `smoke`: 3 train steps in about 40 s.

Expected: no published ProMLoRA numbers; the user's notes give none for these yamls.

Args: variant ('T' | 'B'), rank (32; 0 = prompt-only VPT-deep), tokens (50), shared_prompt,
dynamic, pools ('+'-separated per-stage pool sizes, e.g. 20+20+20+20; one value = every stage),
tasks ('+'-separated), epochs (300), the four freeze_* flags, smoke (a two-stage Swin of width 8
with 3 prompt tokens on synthetic_scenes/tiny at 32x32, 6 steps of batch 4).
"""

from configs import common
from configs import mtlora_pascal
from mtl_jax.models import promlora

DEFAULTS = dict(variant='T', rank=32, tokens=50, shared_prompt=False, dynamic=False, pools='',
                epochs=300, freeze_patch_embed=False, freeze_layer_norm=False,
                freeze_downsample_reduction=False, freeze_relative_position_bias=False,
                smoke=False)


def get_config(arg=None):
  arg = common.parse_arg(arg, tasks=mtlora_pascal.PASCAL_TASKS, **DEFAULTS)
  return experiment(arg, dataset='pascal_context')


def experiment(arg, *, dataset: str):
  """The fork's ProMLoRA recipe on `dataset` (shared with configs/promlora_nyud.py)."""
  arg.recipe = 'full'  # the Swin recipe's trainable set, replaced below
  c = mtlora_pascal.experiment(arg, model='swin', dataset=dataset)
  c.model.name = 'promlora'
  c.model.mtlora = dict(rank=(arg.rank,), task_rank=(0,), shared_scale=(4.0,), task_scale=(4.0,),
                        dropout=(0.05,), shared_mode='lora_only',
                        layers=('qkv', 'proj', 'fc1', 'fc2'))
  c.model.promlora = dict(
      tokens=arg.tokens, shared_prompt=arg.shared_prompt, dynamic=arg.dynamic,
      pool_sizes=tuple(int(k) for k in filter(None, arg.pools.split('+'))), dropout=0.0,
      location='prepend', deep=True, initiation='random', project=-1)
  c.frozen = promlora.frozen_patterns(
      freeze_patch_embed=arg.freeze_patch_embed, freeze_layer_norm=arg.freeze_layer_norm,
      freeze_downsample_reduction=arg.freeze_downsample_reduction,
      freeze_relative_position_bias=arg.freeze_relative_position_bias)
  if arg.smoke:
    c.model.mtlora.rank = (min(arg.rank, 4),)
    c.model.promlora.tokens = 3
  return c
