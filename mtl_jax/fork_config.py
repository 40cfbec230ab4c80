"""The user fork's yacs yaml configs as mtl_jax configs (docs/fork_yaml.md).

  python launch.py --config=path/to/fork.yaml --workdir=runs/x        # launch.py rewrites it to
  python launch.py --config=configs/fork_yaml.py:path=path/to/fork.yaml --workdir=runs/x

`load` reads a yaml as the fork's `config.py` does (BASE files first, relative to the file; an
int DATA.IMG_SIZE becomes [H, W]) against `DEFAULTS`, the union of the keys of both eras of the
fork's config.py (docs/user_fork.md §1.2): an unknown key or a value of the wrong type is a
ConfigError naming the key. `unimplemented` lists the settings mtl_jax understands but does not
implement (pruning, constrained MTL, adaptive ranks, the RL agent, ...): each a ConfigError
unless `allow_unimplemented`, then a warning. `to_config` builds the mtl_jax config from the
recipes in configs/ (mtlora_pascal.experiment, promlora_pascal.experiment) and the yaml's values.
"""

import ast
import copy
import os

from absl import logging
import yaml

from mtl_jax import ConfigError

ANY = object()  # a key seen only in the fork's yamls, its config.py default not known

# The fork's config tree with its defaults: upstream MTLoRA, Era A and Era B (docs/user_fork.md
# §1.2, docs/mtlora.md §6). Keys of OPEN nodes are free (yacs `new_allowed`).
_SWIN = dict(PATCH_SIZE=4, IN_CHANS=3, EMBED_DIM=96, DEPTHS=[2, 2, 6, 2], NUM_HEADS=[3, 6, 12, 24],
             WINDOW_SIZE=7, MLP_RATIO=4.0, QKV_BIAS=True, QK_SCALE=None, APE=False,
             PATCH_NORM=True)
DEFAULTS = {
    'BASE': [''],
    'DATA': dict(BATCH_SIZE=128, DATA_PATH='', DATASET='nyud', IMG_SIZE=224,
                 INTERPOLATION='bicubic', ZIP_MODE=False, CACHE_MODE='part', PIN_MEMORY=True,
                 NUM_WORKERS=4, MASK_PATCH_SIZE=32, MASK_RATIO=0.6, DBNAME=ANY, PASCAL=ANY,
                 NYUD=ANY),
    'MODEL': dict(
        TYPE='swin', NAME='swin_tiny_patch4_window7_224', PRETRAINED='', RESUME='',
        NUM_CLASSES=1000, DROP_RATE=0.0, DROP_PATH_RATE=0.1, LABEL_SMOOTHING=0.1,
        SWIN=dict(_SWIN, DECODER_DIM=256, DECODER_PATCH_RES=[7, 7, 14, 28]),
        SWINV2=ANY, SWIN_MOE=ANY, SWIN_MLP=ANY, SIMMIM=ANY,  # other model types: ignored
        DECODER_HEAD=dict(semseg='hrnet', normals='hrnet', sal='hrnet', human_parts='hrnet',
                          edge='hrnet', depth='hrnet'),
        DECODER_CHANNELS=[18, 36, 72, 144], SEGFORMER_CHANNELS=256, DECODER_DOWNSAMPLER=True,
        PER_TASK_DOWNSAMPLER=True, UPDATE_RELATIVE_POSITION=False, FREEZE_BACKBONE=False,
        RESUME_BACKBONE='', MTI=ANY,
        MTLORA=dict(
            ENABLED=False, BIAS='none', R=[8, 8, 8, 8], SHARED_SCALE=[2.0, 2.0, 2.0, 2.0],
            TASK_SCALE=[2.0, 2.0, 2.0, 2.0], DROPOUT=[0.05, 0.05, 0.05, 0.05],
            TRAINABLE_SCALE_SHARED=False, TRAINABLE_SCALE_PER_TASK=False,
            INTERMEDIATE_SPECIALIZATION=False, FREEZE_PRETRAINED=True, SPLIT_QKV=False,
            R_PER_TASK={}, SCALE_PER_TASK={}, SHARED_MODE='matrix', QKV_ENABLED=True,
            PROJ_ENABLED=True, FC1_ENABLED=True, FC2_ENABLED=True, DOWNSAMPLER_ENABLED=False,
            # Era A
            MAML_MODE=False, MAML_INNER_STEPS=1, MAML_INNER_LR=0.001, REPTILE_MODE=False,
            METASGD_MODE=False, METASGD_INIT=0.001, TAML_MODE=False, TAML_LAMBDA=0.0,
            FREEZE_TS_LORA=False, FREEZE_TA_LORA=False, DYNAMIC_TS_LORA=False, TS_LORA_NUM=0,
            TS_ADAPTER=False,
            # Era B, version 092e079 (adaptive-rank LoRA)
            ADAPTIVE=False, ADAPTIVE_START_RANK=ANY, ADAPTIVE_END_AVG_RANK=ANY,
            ADAPTIVE_START_PRUNE_STEP_RATIO=ANY, ADAPTIVE_END_PRUNE_STEP_RATIO=ANY,
            ADAPTIVE_PRUNE_INTERVAL_STEP=ANY, ADAPTIVE_SENSITIVITY_BETA=ANY, ADAPTIVE_EPS=ANY,
            REGULARIZATION_LOSS_ALPHA=ANY,
            # keys seen only in yamls
            ENABLE_TS_SHARED_COMPLEMENT=False, TS_SHARED_COMPLEMENT_GRAD_MODE=ANY,
            TS_SHARED_COMPLEMENT_EPS=ANY, ENABLE_PRINCIPAL_ANGLE_REG=False,
            PRINCIPAL_ANGLE_MODE=ANY, PRINCIPAL_ANGLE_LAMBDA=ANY, PRINCIPAL_ANGLE_W_COL=ANY,
            PRINCIPAL_ANGLE_W_ROW=ANY, PRINCIPAL_ANGLE_START_EPOCH=ANY,
            PRINCIPAL_ANGLE_WARMUP_EPOCHS=ANY, PRINCIPAL_ANGLE_EPS=ANY,
            PRINCIPAL_ANGLE_REDUCTION=ANY,
            EMA_GATE=dict(ENABLED=False, GRANULARITY=ANY, EMA_DECAY=ANY, ALPHA_SHARED_INIT=ANY,
                          ALPHA_SPECIFIC_INIT=ANY, ALPHA_MIN=ANY, ALPHA_MAX=ANY,
                          UPDATE_EVERY_EPOCH=ANY, LOG_HISTORY=ANY),
            USE_OURS=False, OURS_MAX_GROUPS=ANY, OURS_DELTA_THRESHOLD=ANY, OURS_WARMUP_RATIO=ANY,
            OURS_INTERVAL_EPOCHS=ANY, OURS_COOLDOWN_EPOCHS=ANY, OURS_STOP_SPLIT_RATIO=ANY,
            OURS_PROBE_RATIO=ANY, OURS_SYM_BREAK_BATCHES=ANY, OURS_SPLIT_LR_SCALE=ANY,
            ADALORA=dict(ENABLED=False, INIT_RANK=ANY, TARGET_RANK=ANY, MIN_RANK=ANY,
                         ORTHO_REG=ANY, SCHEDULE_STEP=ANY, SCHEDULE_MODE=ANY, IMPORTANCE=ANY,
                         MODE=ANY),
            TASK_LORA_BLOCKS=[], QKV_TASK_LORA=False),  # block-masked TS-LoRA (tsmove)
        CONV_ADAPTER=dict(ENABLED=False),  # Era A; its other keys: ANY below
        PROMPT=dict(  # Era B
            ENABLED=False, NUM_TOKENS=0, DEEP=False, DROPOUT=0.0, LOCATION='prepend', PROJECT=-1,
            INITIATION='random', DYNAMIC_PROMPT=False, SHARE_TASK_PROMPT=False,
            DEEP_PROMPT_POOL_SIZE=0, DEEP_PROMPT_POOL_SIZES=[]),
    ),
    'TRAIN': dict(
        START_EPOCH=0, EPOCHS=300, WARMUP_EPOCHS=20, WEIGHT_DECAY=0.05, BASE_LR=5e-4,
        WARMUP_LR=5e-7, MIN_LR=5e-6, CLIP_GRAD=5.0, AUTO_RESUME=False, ACCUMULATION_STEPS=1,
        USE_CHECKPOINT=False,
        LR_SCHEDULER=dict(NAME='cosine', DECAY_EPOCHS=30, DECAY_RATE=0.1, WARMUP_PREFIX=True,
                          GAMMA=0.1, MULTISTEPS=[]),
        SKIP_DECODER_CKPT=False, FREEZE_PATCH_EMBED=False, FREEZE_LAYER_NORM=False,
        FREEZE_RELATIVE_POSITION_BIAS=False, FREEZE_DOWNSAMPLE_REDUCTION=False,
        OPTIMIZER=dict(NAME='adamw', EPS=1e-8, BETAS=[0.9, 0.999], MOMENTUM=0.9),
        LAYER_DECAY=1.0, MOE=dict(SAVE_MASTER=False),
        ENABLE_CONFLICT_RATIO=False, CONFLICT_RATIO_PERIOD=50,  # Era B
        CONSTRAINED_MTL=dict(
            ENABLED=False, PROTECTED_TASKS=[], OBJECTIVE='avg_unconstrained',
            REF_MODE='warmup_loss', REF_EPOCH_START=0, REF_EPOCH_END=0, WARMUP_EPOCHS=20,
            USE_RELATIVE_LOSS=True, EPS_RELAX={}, REF_LOSSES={}, DUAL_UPDATE_FREQ='epoch',
            DUAL_LR=0.05, DUAL_CLAMP_MAX=10.0, ALM_RHO=1.0, ALM_RHO_GROWTH=1.5,
            ALM_RHO_PATIENCE=5, VIOLATION_EMA=0.9)),
    'PRUNING': dict(
        ENABLED=False, EXPERIMENT_NAME='', OUTPUT_SUBDIR='pruning', COMPUTE_IMPORTANCE=False,
        APPLY_PRUNING=False, RUN_RECOVERY=False, EVALUATE_AFTER_PRUNING=True,
        EVALUATE_AFTER_RECOVERY=True,
        IMPORTANCE=dict(TYPE='base', SOURCE='val', NUM_BATCHES=8, LOAD_PATH='', GA_EPS=1e-6,
                        STAGE3_IMPORTANCE_BETA=ANY, STAGE3_IMPORTANCE_EPS=ANY,
                        STAGE3_IMPORTANCE_USE_TA_REPLACEMENT=ANY),
        PRUNER=dict(RATIO=0.1, MIN_TOKENS_PER_LAYER=1, LOAD_MASK='', LOAD_PRUNED_CHECKPOINT='',
                    TASK_RATIOS={}),
        RECOVERY=dict(EPOCHS=5, TEACHER_CHECKPOINT='', STUDENT_CHECKPOINT='',
                      FREEZE_BACKBONE=True, FREEZE_GALORA=True, TRAIN_TA_PROMPT=True,
                      TRAIN_TASK_HEADS=True, UNFREEZE_GALORA_LAST_N=0, DISTILL_TASKS=ANY,
                      HEAD_TASKS=ANY, LOSS_TASKS=ANY, PROMPT_TASKS=ANY),
        GREEDY=ANY,
        DISTILL=dict(LOGIT_WEIGHT=0.0, FEATURE_WEIGHT=0.0)),
    'RL': dict(ENABLED=False, HIDDEN_DIM=64, LR=1e-3),  # Era A
    'COTODROP': dict(ENABLED=False, INITIAL_P=ANY, FINAL_P=ANY, STAGE1_RATIO=ANY),
    'AUG': ANY, 'TEST': ANY,  # classification augmentation / test crops: ignored
    'ENABLE_AMP': False, 'AMP_ENABLE': True, 'AMP_OPT_LEVEL': '', 'OUTPUT': '', 'TAG': 'default',
    'SAVE_FREQ': 1, 'PRINT_FREQ': 10, 'SEED': 0, 'EVAL_MODE': False, 'THROUGHPUT_MODE': False,
    'LOCAL_RANK': 0, 'FUSED_WINDOW_PROCESS': False, 'FUSED_LAYERNORM': False,
    'SKIP_INITIAL_EVAL': False, 'EVAL_FREQ': 1, 'DETERMINISTIC': False, 'DEBUG_REPRO_STEPS': 0,
    'TASKS': ANY, 'MTL': ANY, 'TASKS_CONFIG': ANY, 'EVAL_TRAINING': ANY,  # set by main.py's flags
}
OPEN = ('MODEL.MTLORA.R_PER_TASK', 'MODEL.MTLORA.SCALE_PER_TASK', 'MODEL.DECODER_HEAD',
        'MODEL.CONV_ADAPTER', 'TRAIN.CONSTRAINED_MTL.EPS_RELAX', 'TRAIN.CONSTRAINED_MTL.REF_LOSSES',
        'PRUNING.PRUNER.TASK_RATIOS')


def _alias(path: str) -> str | None:
  """The other location of a yaml moved at the fork's reorganisation (docs/fork_yaml.md §1):
  configs/mtlora/tiny_448/X.yaml <-> configs/mtlora/tiny_448/pascal/X.yaml."""
  head, name = os.path.split(path)
  if os.path.basename(head) == 'pascal':
    return os.path.join(os.path.dirname(head), name)
  return os.path.join(head, 'pascal', name)


def _read(path: str) -> tuple[str, dict]:
  if not os.path.isfile(path):
    other = _alias(path)
    if not os.path.isfile(other):
      raise ConfigError(f'fork config {path!r} not found (nor {other!r}); give the path of a '
                        'yaml of the fork\'s configs/ directory')
    logging.info('Fork config %s not found; reading %s (the same file before/after the fork '
                 'moved its PASCAL configs into pascal/)', path, other)
    path = other
  try:
    with open(path) as f:
      data = yaml.safe_load(f)
  except yaml.YAMLError as e:
    raise ConfigError(f'{path}: not valid YAML ({str(e).splitlines()[0]})') from e
  if data is None:
    data = {}
  if not isinstance(data, dict):
    raise ConfigError(f'{path}: a fork config is a mapping of KEYS, got {type(data).__name__}')
  return path, _decode(data)


def _decode(value):
  """yacs' value decoding: strings that are Python literals become them (YAML 1.1 reads `5e-4`,
  without a dot, as the string '5e-4'; yacs turns it into 0.0005)."""
  if isinstance(value, dict):
    return {k: _decode(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_decode(v) for v in value]
  if isinstance(value, str):
    try:
      return ast.literal_eval(value)
    except (ValueError, SyntaxError):
      return value
  return value


def _check(node: dict, defaults, prefix: str, path: str) -> None:
  """Raises ConfigError for a key the fork's config.py does not define or a value of the wrong
  type (as yacs' merge_from_file would)."""
  if defaults is ANY or prefix.rstrip('.') in OPEN:  # free keys
    return
  for key, value in node.items():
    dotted = f'{prefix}{key}'
    if key not in defaults:
      raise ConfigError(f'{path}: unknown key {dotted!r} (no key of the fork\'s config.py in '
                        'either era, docs/fork_yaml.md §2); remove it or fix its spelling')
    default = defaults[key]
    if isinstance(default, dict):
      if not isinstance(value, dict):
        raise ConfigError(f'{path}: {dotted} must be a mapping of keys, got {value!r}')
      _check(value, default, dotted + '.', path)
    elif default is not ANY and default is not None and value is not None:
      numbers = (int, float)
      ok = (isinstance(value, (list, tuple)) if isinstance(default, (list, tuple)) else
            isinstance(value, bool) if isinstance(default, bool) else
            isinstance(value, numbers) and not isinstance(value, bool)
            if isinstance(default, numbers) else isinstance(value, type(default)))
      if dotted == 'DATA.IMG_SIZE':
        ok = isinstance(value, (int, list)) and not isinstance(value, bool)
      if not ok:
        raise ConfigError(f'{path}: {dotted}={value!r} has the wrong type; the fork\'s default '
                          f'is {default!r}')


def _merge(into: dict, node: dict) -> None:
  for key, value in node.items():
    if isinstance(value, dict) and isinstance(into.get(key), dict):
      _merge(into[key], value)
    else:
      into[key] = copy.deepcopy(value)


def _concrete(node):
  """DEFAULTS without the ANY markers (unknown defaults read as absent)."""
  return {k: _concrete(v) if isinstance(v, dict) else v for k, v in node.items() if v is not ANY}


def load(path: str) -> dict:
  """The fork's config tree of yaml `path`: DEFAULTS, then its BASE files (recursively, relative
  to it), then its own keys; DATA.IMG_SIZE as [H, W] and `__files__` the files read."""
  cfg = _concrete(DEFAULTS)
  files = []

  def merge_file(p, depth=0):
    if depth > 8:
      raise ConfigError(f'{p}: BASE nesting deeper than 8 (a cycle?)')
    p, data = _read(p)
    _check(data, DEFAULTS, '', p)
    for base in data.get('BASE') or ():
      if base:
        merge_file(os.path.join(os.path.dirname(p), base), depth + 1)
    files.append(p)
    _merge(cfg, data)

  merge_file(path)
  size = cfg['DATA']['IMG_SIZE']
  cfg['DATA']['IMG_SIZE'] = [size, size] if isinstance(size, int) else list(size)
  cfg['__files__'] = files
  return cfg


def per_stage(values, key: str) -> tuple:
  """A fork per-stage list ([v] or [v0, v1, v2, v3]) as mtl_jax's tuple: one entry if all are
  equal (what the recipes write), else one per stage."""
  values = list(values) if isinstance(values, (list, tuple)) else [values]
  if not values:
    raise ConfigError(f'{key} is empty; give one value or one per stage')
  return tuple(values[:1]) if len(set(values)) == 1 else tuple(values)


def task_values(cfg: dict, tasks, key: str, fallback: str) -> tuple:
  """MODEL.MTLORA.<key> (R_PER_TASK / SCALE_PER_TASK) of `tasks`, each defaulting to
  MODEL.MTLORA.<fallback> as in the fork's config.py; mtl_jax's TS-LoRA has one value per stage
  for every task, so tasks that differ are a ConfigError."""
  m = cfg['MODEL']['MTLORA']
  per_task = {t: per_stage(m[key].get(t, m[fallback]), f'MODEL.MTLORA.{key}.{t}') for t in tasks}
  if len(set(per_task.values())) > 1:
    raise ConfigError(f'MODEL.MTLORA.{key} differs between tasks ({per_task}): mtl_jax gives '
                      'every task the same TS-LoRA rank and scale; use one value for all tasks')
  return next(iter(per_task.values())) if per_task else per_stage(m[fallback], fallback)


# (dotted key, the value mtl_jax implements or a test, what the setting is) for settings mtl_jax
# understands but does not implement: each is an error unless allow_unimplemented.
_NOT = lambda v: not v  # noqa: E731
_UNIMPLEMENTED = (
    ('MODEL.TYPE', lambda v: v == 'swin', "model types other than 'swin'"),
    ('MODEL.DROP_RATE', lambda v: v == 0, 'dropout after the patch embedding'),
    ('MODEL.SWIN.IN_CHANS', lambda v: v == 3, 'inputs other than RGB'),
    ('MODEL.SWIN.QKV_BIAS', bool, 'qkv without bias'),
    ('MODEL.SWIN.QK_SCALE', lambda v: v is None, 'a custom attention scale'),
    ('MODEL.SWIN.APE', _NOT, 'absolute position embeddings'),
    ('MODEL.SWIN.PATCH_NORM', bool, 'a patch embedding without LayerNorm'),
    ('MODEL.PER_TASK_DOWNSAMPLER', bool, 'one downsampler shared by all tasks'),
    ('MODEL.UPDATE_RELATIVE_POSITION', _NOT, 'resizing position tables when loading'),
    ('MODEL.MTLORA.BIAS', lambda v: v == 'none', 'training biases with the LoRA (BIAS all / '
     'lora_only)'),
    ('MODEL.MTLORA.SHARED_MODE', lambda v: v in ('matrix', 'lora_only'),
     "SHARED_MODE matrixv2 / addition (mtl_jax: 'matrix', 'lora_only')"),
    ('MODEL.MTLORA.TRAINABLE_SCALE_SHARED', _NOT, 'a trained TA-LoRA scale'),
    ('MODEL.MTLORA.TRAINABLE_SCALE_PER_TASK', _NOT, 'trained TS-LoRA scales'),
    ('MODEL.MTLORA.INTERMEDIATE_SPECIALIZATION', _NOT, 'TS-LoRA in every block'),
    ('MODEL.MTLORA.SPLIT_QKV', _NOT, 'split-qkv checkpoint names'),
    ('MODEL.MTLORA.FREEZE_PRETRAINED', bool, 'training the pretrained weights under MTLoRA'),
    ('MODEL.MTLORA.DYNAMIC_TS_LORA', _NOT, 'input-routed dynamic TS-LoRA'),
    ('MODEL.MTLORA.TS_ADAPTER', _NOT, 'the stage-2 TS adapter'),
    ('MODEL.MTLORA.ADAPTIVE', _NOT, 'adaptive-rank LoRA (models/dora_mtlora.py)'),
    ('MODEL.MTLORA.ENABLE_TS_SHARED_COMPLEMENT', _NOT, 'the TS/shared complement'),
    ('MODEL.MTLORA.ENABLE_PRINCIPAL_ANGLE_REG', _NOT, 'the principal-angle regulariser'),
    ('MODEL.MTLORA.EMA_GATE.ENABLED', _NOT, 'EMA-gated MTLoRA'),
    ('MODEL.MTLORA.USE_OURS', _NOT, 'dynamic splitting of the shared LoRA'),
    ('MODEL.MTLORA.ADALORA.ENABLED', _NOT, 'AdaLoRA rank allocation'),
    ('MODEL.MTLORA.TASK_LORA_BLOCKS', _NOT, 'TS-LoRA in chosen blocks (blockmask, tsmove)'),
    ('MODEL.MTLORA.QKV_TASK_LORA', _NOT, 'TS-LoRA on qkv'),
    ('MODEL.CONV_ADAPTER.ENABLED', _NOT, 'convolutional adapters'),
    ('MODEL.PROMPT.LOCATION', lambda v: v == 'prepend', 'prompt locations other than prepend'),
    ('MODEL.PROMPT.INITIATION', lambda v: v == 'random', 'prompt initialisations other than '
     'random'),
    ('MODEL.PROMPT.PROJECT', lambda v: v == -1, 'a prompt projection'),
    ('TRAIN.ACCUMULATION_STEPS', lambda v: v in (0, 1), 'gradient accumulation'),
    ('TRAIN.LR_SCHEDULER.NAME', lambda v: v == 'cosine', 'schedules other than cosine'),
    ('TRAIN.OPTIMIZER.NAME', lambda v: v == 'adamw', 'optimizers other than AdamW'),
    ('TRAIN.LAYER_DECAY', lambda v: v == 1, 'layer-wise learning-rate decay'),
    ('TRAIN.SKIP_DECODER_CKPT', _NOT, 'resuming without the decoders'),
    ('TRAIN.CONSTRAINED_MTL.ENABLED', _NOT, 'constrained multi-task training'),
    ('PRUNING.ENABLED', _NOT, 'UniPoRA prompt-token pruning'),
    ('RL.ENABLED', _NOT, 'the RL agent choosing loss weights'),
    ('COTODROP.ENABLED', _NOT, 'CoToDrop'),
    ('DEBUG_REPRO_STEPS', _NOT, 'reproducibility debug steps'),
)


def get(cfg: dict, dotted: str):
  node = cfg
  for key in dotted.split('.'):
    node = node[key]
  return node


def unimplemented(cfg: dict, tasks) -> list[str]:
  """What the fork config sets that mtl_jax does not implement, one message per setting."""
  out = []
  mtlora, prompt = cfg['MODEL']['MTLORA']['ENABLED'], cfg['MODEL']['PROMPT']['ENABLED']
  for key, ok, what in _UNIMPLEMENTED:
    if key.startswith('MODEL.MTLORA.') and not (mtlora or prompt):
      continue  # the plain Swin reads none of them
    if key.startswith('MODEL.PROMPT.') and not prompt:
      continue
    value = get(cfg, key)
    if not ok(value):
      out.append(f'{key}={value!r} ({what})')
  for task in tasks:
    head = cfg['MODEL']['DECODER_HEAD'].get(task, 'hrnet')
    if head != 'hrnet':
      out.append(f"MODEL.DECODER_HEAD.{task}={head!r} (decoders other than 'hrnet')")
  if prompt and not cfg['MODEL']['PROMPT']['DEEP']:
    out.append('MODEL.PROMPT.DEEP=False (shallow prompts)')
  if prompt and mtlora and cfg['MODEL']['MTLORA']['SHARED_MODE'] != 'lora_only':
    out.append(f"MODEL.MTLORA.SHARED_MODE={cfg['MODEL']['MTLORA']['SHARED_MODE']!r} with "
               'MODEL.PROMPT.ENABLED (prompts with TS-LoRA, the mtlora_vpt_* configs)')
  modes = [k for k in ('MAML_MODE', 'REPTILE_MODE', 'METASGD_MODE', 'TAML_MODE')
           if cfg['MODEL']['MTLORA'][k]]
  if len(modes) > 1 and set(modes) != {'MAML_MODE', 'TAML_MODE'}:
    out.append(f'MODEL.MTLORA.{modes} all True (one meta-learning mode at a time)')
  if not (mtlora or prompt) and any(cfg['TRAIN'][f'FREEZE_{k}'] for k in (
      'PATCH_EMBED', 'LAYER_NORM', 'RELATIVE_POSITION_BIAS', 'DOWNSAMPLE_REDUCTION')):
    out.append('TRAIN.FREEZE_* on the plain Swin (they select the MTLoRA / prompt trainable set)')
  return out


def check_implemented(cfg: dict, tasks, *, allow_unimplemented: bool) -> None:
  """ConfigError naming every unimplemented setting (`unimplemented`), or with
  `allow_unimplemented` one warning each: the run then differs from the fork's."""
  missing = unimplemented(cfg, tasks)
  path = cfg['__files__'][-1]
  if missing and not allow_unimplemented:
    raise ConfigError(f'{path}: not implemented in mtl_jax: {"; ".join(missing)}. Remove them, '
                      'or pass --allow_unimplemented to run without them (docs/fork_yaml.md §3)')
  for message in missing:
    logging.warning('%s: %s is not implemented in mtl_jax and ignored (--allow_unimplemented)',
                    path, message)


def set_value(cfg: dict, dotted: str, value, source: str = '--opts') -> None:
  """Sets fork key `dotted` (as yacs' merge_from_list: the text parsed as a Python literal, else
  kept as a string), checked like a yaml key."""
  if isinstance(value, str):
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
  *parents, leaf = dotted.split('.')
  node = {leaf: value}
  for key in reversed(parents):
    node = {key: node}
  _check(node, DEFAULTS, '', source)
  if dotted == 'DATA.IMG_SIZE' and isinstance(value, int):
    value = [value, value]
  target = cfg
  for key in parents:
    target = target.setdefault(key, {})
  target[leaf] = value


def merge_opts(cfg: dict, opts) -> None:
  """The fork's `--opts KEY VALUE [KEY VALUE ...]`."""
  opts = list(opts or ())
  if len(opts) % 2:
    raise ConfigError(f'--opts takes KEY VALUE pairs; got {len(opts)} words ({opts})')
  for key, value in zip(opts[::2], opts[1::2]):
    set_value(cfg, key, value)
