r"""A yacs yaml of the user's MTLoRA fork as an mtl_jax config (docs/fork_yaml.md).

  python launch.py \
      --config=FORK/configs/mtlora/tiny_448/mtlora_tiny_448_r64_scale4_pertask_maml.yaml \
      --workdir=runs/maml --config.dataset.data_dir=DATA_DIR --config.init_from=CONVERTED_SWIN_T
  python launch.py --workdir=runs/prom_nyud --config='configs/fork_yaml.py:dataset=nyud_v2,\
tasks=semseg+normals+depth,path=FORK/configs/mtlora/tiny_448/nyud/X.yaml'

launch.py turns `--config=X.yaml` into `--config=configs/fork_yaml.py:path=X.yaml`
(`--allow_unimplemented` adds that arg). The yaml is read as the fork's config.py reads it
(mtl_jax/fork_config.py: BASE files, both eras' keys, unknown keys and unimplemented settings
are errors) and mapped onto the recipe it names: ProMLoRA (MODEL.PROMPT.ENABLED,
configs/promlora_pascal.py), MTLoRA (MODEL.MTLORA.ENABLED, configs/mtlora_pascal.py) or the
plain Swin (configs/swin_pascal.py), with every value the yaml sets: Swin sizes, ranks, scales,
LoRA layers, prompts, the meta-learning mode (method maml | reptile | metasgd | taml with the
fork's LoRA-only trainable set), FREEZE_TS/TA_LORA and TRAIN.FREEZE_* (trainable set), TRAIN.*
(epochs, warmup, learning rates scaled by the global batch / 512, weight decay, clipping),
ENABLE_CONFLICT_RATIO, EVAL_FREQ / SAVE_FREQ (epochs), PRINT_FREQ, SEED, SKIP_INITIAL_EVAL and
AMP_ENABLE (bfloat16, else float32). DATA.BATCH_SIZE is per device, as the fork's per GPU:
config.batch_size_per_device, the global batch (and with it the learning rates and steps per
epoch) follows from the device count when the run starts. The mapping of every key:
docs/fork_yaml.md §2.

Runtime and expected metrics: those of the recipe the yaml maps onto (its config docstring).

Args, ','-separated, `path=` last (it takes the rest of the text, so a file name may contain
','): dataset ('pascal_context' | 'nyud_v2'; default from the file name: 'nyud' in it means
NYUD-v2, as the fork's `--nyud`), tasks ('+'-separated; default the fork README's tasks:
semseg+normals+sal+human_parts on PASCAL, semseg+normals+depth on NYUD), freeze_backbone (the
fork's `--freeze-backbone`: decoders only), allow_unimplemented (warnings instead of errors for
settings mtl_jax does not implement), smoke (the recipes' smoke model and schedule), path.
"""

import os

from configs import common
from configs import mtlora_pascal
from configs import promlora_pascal
from mtl_jax import ConfigError
from mtl_jax import fork_config
from mtl_jax.models import mtlora as mtlora_lib
from mtl_jax.models import promlora as promlora_lib

README_TASKS = {'pascal_context': 'semseg+normals+sal+human_parts',
                'nyud_v2': 'semseg+normals+depth'}
_VARIANTS = {'T': (96, (2, 2, 6, 2), (3, 6, 12, 24)), 'B': (128, (2, 2, 18, 2), (4, 8, 16, 32))}
_METHODS = (('METASGD_MODE', 'metasgd'), ('REPTILE_MODE', 'reptile'), ('TAML_MODE', 'taml'),
            ('MAML_MODE', 'maml'))


def get_config(arg=None):
  arg = arg or ''
  head, sep, path = arg.partition('path=')
  if not sep or not path:
    raise ConfigError("configs/fork_yaml.py needs path=FORK_YAML (the last arg), e.g. "
                      "--config=configs/fork_yaml.py:path=configs/mtlora/tiny_448/x.yaml")
  opts = common.parse_arg(head.rstrip(','), dataset='', tasks='', freeze_backbone=False,
                          allow_unimplemented=False, smoke=False)
  dataset = opts.dataset or ('nyud_v2' if 'nyud' in path.lower() else 'pascal_context')
  if dataset not in README_TASKS:
    raise ConfigError(f"dataset={dataset!r}; use 'pascal_context' or 'nyud_v2'")
  tasks = (opts.tasks or README_TASKS[dataset]).split('+')
  cfg = fork_config.load(path)
  fork_config.check_implemented(cfg, tasks, allow_unimplemented=opts.allow_unimplemented)
  return to_config(cfg, dataset=dataset, tasks=tasks, freeze_backbone=opts.freeze_backbone,
                   smoke=opts.smoke)


def _method(m: dict) -> str:
  for key, method in _METHODS:
    if m[key]:
      return method
  return 'mtl'


def to_config(cfg: dict, *, dataset: str, tasks, freeze_backbone=False, smoke=False):
  """The mtl_jax config of the fork config tree `cfg` (fork_config.load)."""
  model_cfg, train = cfg['MODEL'], cfg['TRAIN']
  m, p = model_cfg['MTLORA'], model_cfg['PROMPT']
  model = 'promlora' if p['ENABLED'] else 'mtlora' if m['ENABLED'] else 'swin'
  method = _method(m) if model == 'mtlora' else 'mtl'
  s = model_cfg['SWIN']
  dims = (s['EMBED_DIM'], tuple(s['DEPTHS']), tuple(s['NUM_HEADS']))
  variant = next((v for v, d in _VARIANTS.items()
                  if d == dims and s['WINDOW_SIZE'] == 7 and s['PATCH_SIZE'] == 4), '')
  arg = common.parse_arg(None, **dict(promlora_pascal.DEFAULTS, task_rank=0, plus=False,
                                      recipe='full', method=method, tasks='+'.join(tasks)))
  arg.update(variant=variant or 'T', epochs=int(train['EPOCHS']))  # the rest is set below
  if model == 'promlora':
    c = promlora_pascal.experiment(arg, dataset=dataset)
  else:
    c = mtlora_pascal.experiment(arg, model=model, dataset=dataset)

  # The backbone.
  if not variant:
    c.model.backbone.update(variant='', patch_size=s['PATCH_SIZE'], embed_dim=s['EMBED_DIM'],
                            depths=dims[1], num_heads=dims[2], window_size=s['WINDOW_SIZE'])
  c.model.backbone.update(mlp_ratio=float(s['MLP_RATIO']),
                          drop_path_rate=float(model_cfg['DROP_PATH_RATE']),
                          remat='full' if train['USE_CHECKPOINT'] else 'none')
  c.input.crop_size = tuple(cfg['DATA']['IMG_SIZE'])
  c.model.decoder.channels = (tuple(model_cfg['DECODER_CHANNELS'])
                              if model_cfg['DECODER_DOWNSAMPLER'] else ())
  c.model.dtype = 'bfloat16' if cfg['AMP_ENABLE'] else 'float32'

  # LoRA and prompts (docs/mtlora.md §2.1: R_PER_TASK.shared overrides R; TASK_SCALE is unused,
  # the task multiplier is SCALE_PER_TASK, default SHARED_SCALE).
  if model != 'swin':
    layers = tuple(n for n in ('qkv', 'proj', 'fc1', 'fc2') if m[f'{n.upper()}_ENABLED'])
    if m['DOWNSAMPLER_ENABLED']:
      layers += ('reduction',)
    rank = fork_config.per_stage(m['R_PER_TASK'].get('shared', m['R']),
                                  'MODEL.MTLORA.R_PER_TASK.shared')
    c.model.mtlora.update(
        rank=rank, shared_scale=fork_config.per_stage(m['SHARED_SCALE'], 'SHARED_SCALE'),
        dropout=fork_config.per_stage(m['DROPOUT'], 'DROPOUT'),
        shared_mode=m['SHARED_MODE'], layers=layers)
    if model == 'mtlora':
      c.model.mtlora.update(
          task_rank=fork_config.task_values(cfg, tasks, 'R_PER_TASK', 'R'),
          task_scale=fork_config.task_values(cfg, tasks, 'SCALE_PER_TASK', 'SHARED_SCALE'))
    else:
      if not m['ENABLED']:  # prompts only (vpt_deep_*)
        c.model.mtlora.rank = (0,)
      pools = list(p['DEEP_PROMPT_POOL_SIZES']) or (
          [p['DEEP_PROMPT_POOL_SIZE']] if p['DEEP_PROMPT_POOL_SIZE'] else [])
      c.model.promlora.update(
          tokens=int(p['NUM_TOKENS']), shared_prompt=bool(p['SHARE_TASK_PROMPT']),
          dynamic=bool(p['DYNAMIC_PROMPT']), pool_sizes=tuple(int(k) for k in pools),
          dropout=float(p['DROPOUT']), location=p['LOCATION'], deep=bool(p['DEEP']),
          initiation=p['INITIATION'], project=int(p['PROJECT']))
  c.frozen = _frozen(cfg, model, method, freeze_backbone)

  # Method keys (Era A), conflict ratio (Era B).
  c.maml.update(inner_steps=max(1, int(m['MAML_INNER_STEPS'])),
                inner_lr=float(m['MAML_INNER_LR']))
  c.metasgd.init = float(m['METASGD_INIT'])
  c.taml.lam = float(m['TAML_LAMBDA'])
  if train['ENABLE_CONFLICT_RATIO']:
    c.conflict.every_steps = int(train['CONFLICT_RATIO_PERIOD'])

  # Schedule and optimizer in epochs of the global batch (the recipe's references).
  batch = c.get_ref('batch_size')
  steps_per_epoch = mtlora_pascal.TRAIN_IMAGES[dataset] // batch
  c.batch_size_per_device = int(cfg['DATA']['BATCH_SIZE'])
  c.steps_per_epoch = steps_per_epoch
  c.eval_every_steps = steps_per_epoch * max(1, int(cfg['EVAL_FREQ']))
  c.checkpoint_every_steps = steps_per_epoch * max(1, int(cfg['SAVE_FREQ']))
  c.log_every_steps = max(1, int(cfg['PRINT_FREQ']))
  c.eval_at_start = not cfg['SKIP_INITIAL_EVAL']
  c.seed = int(cfg['SEED'])
  c.schedule.warmup_steps = steps_per_epoch * int(train['WARMUP_EPOCHS'])
  c.optimizer.learning_rate = batch.to_float() * (float(train['BASE_LR']) / 512)
  c.schedule.warmup_lr = batch.to_float() * (float(train['WARMUP_LR']) / 512)
  c.schedule.min_lr = batch.to_float() * (float(train['MIN_LR']) / 512)
  b1, b2 = (float(b) for b in train['OPTIMIZER']['BETAS'])
  c.optimizer.update(weight_decay=float(train['WEIGHT_DECAY']), b1=b1, b2=b2,
                     eps=float(train['OPTIMIZER']['EPS']),
                     grad_clip_norm=float(train['CLIP_GRAD'] or 0.0))
  if smoke:
    mtlora_pascal.shrink(c)
    if model == 'promlora':
      c.model.mtlora.rank = (min(c.model.mtlora.rank[0], 4),)
      c.model.promlora.update(tokens=3, pool_sizes=())
    c.batch_size_per_device = 0
  # The fork's outputs: log_rank0.txt under MODEL.NAME, and every checkpoint kept.
  c.fork_log = cfg['MODEL']['NAME']
  c.keep_period = c.get_ref('checkpoint_every_steps')
  return c


def _frozen(cfg: dict, model: str, method: str, freeze_backbone: bool) -> tuple[str, ...]:
  """config.frozen of the fork's trainable set (docs/fork_yaml.md §2 "Trainable set")."""
  m, train = cfg['MODEL']['MTLORA'], cfg['TRAIN']
  if freeze_backbone:
    if model != 'swin':
      raise ConfigError('--freeze-backbone trains the decoders of the plain Swin; the fork '
                        'needs MODEL.MTLORA.ENABLED False with it (docs/user_fork.md §9)')
    return mtlora_lib.frozen_patterns('freeze_backbone')
  if model == 'swin':
    return ()
  flags = {k: bool(train[f'FREEZE_{k.upper()}']) for k in (
      'patch_embed', 'layer_norm', 'downsample_reduction', 'relative_position_bias')}
  extra = ((r'^backbone/.*/lora_tasks_',) if m['FREEZE_TS_LORA'] else ()) + (
      (r'^backbone/.*/lora_shared_',) if m['FREEZE_TA_LORA'] else ())
  if method != 'mtl':  # the fork's meta-learning trains the LoRA only (docs/user_fork.md §3)
    return mtlora_lib.frozen_patterns('lora_only') + extra
  lora_reduction = bool(m['DOWNSAMPLER_ENABLED'])
  if model == 'mtlora' and not any(flags.values()):  # the recipes, as mtlora_pascal writes them
    recipe = {(False, False): 'mtlora', (True, False): 'freeze_ts_lora',
              (False, True): 'freeze_ta_lora'}.get((m['FREEZE_TS_LORA'], m['FREEZE_TA_LORA']))
    if recipe:
      return mtlora_lib.frozen_patterns(recipe, lora_reduction=lora_reduction)
  return promlora_lib.frozen_patterns(**{f'freeze_{k}': v for k, v in flags.items()},
                                      lora_reduction=lora_reduction) + extra


FORK_YAML = os.path.abspath(__file__)


def launch_argv(argv: list[str]) -> list[str]:
  """`--config=X.yaml` -> `--config=configs/fork_yaml.py:path=X.yaml` (with the
  allow_unimplemented arg when --allow_unimplemented is given); other argv unchanged."""
  allow = any(a in ('--allow_unimplemented', '--allow_unimplemented=true',
                    '--allow_unimplemented=True') for a in argv)
  out = []
  for a in argv:
    if a.startswith('--config=') and a.lower().endswith(('.yaml', '.yml')):
      a = f'--config={FORK_YAML}:{"allow_unimplemented," if allow else ""}path={a[9:]}'
    out.append(a)
  return out
