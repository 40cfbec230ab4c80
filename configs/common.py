"""Shared defaults of every mtl_jax config (the keys every trainer component reads).

A config file defines `get_config(arg=None)` returning this dict updated for one experiment;
`arg` is the text after ':' in `--config=configs/x.py:arg`, parsed by `parse_arg`
(e.g. `configs/demo.py:smoke`, `configs/mlore_pascal.py:vit=B,smoke`). Any key can then be
overridden on the command line: `--config.total_steps=100 --config.optimizer.learning_rate=1e-4`.
Unknown keys are rejected.
"""

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'a=1,smoke' -> {a: 1, smoke: True} with types taken from `defaults` (big_vision style)."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'unknown config arg {key!r}; known: {", ".join(defaults)}')
    default = defaults[key]
    if not value:  # bare flag
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ('1', 'true', 'yes')
    else:
      out[key] = type(default)(value) if default is not None else value
  return out


def get_config() -> ml_collections.ConfigDict:
  """Defaults; experiment configs override what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 8  # global, over all processes and devices
  # > 0: the batch per device (the fork's per-GPU DATA.BATCH_SIZE / --batch-size); batch_size
  # becomes it times the device count when the run starts, and what references it follows.
  c.batch_size_per_device = 0
  c.eval_batch_size = 0  # 0 = batch_size
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.eval_at_start = True  # an eval at step 0, the baseline every later eval is compared with
  c.checkpoint_every_steps = 500
  # Epochs: steps_per_epoch (0 = ⌊train examples / global batch⌋ when the run starts, as the
  # references' drop_last loaders) labels log_rank0.txt and conflict_ratio.txt; *_every_epochs > 0
  # replace the step intervals above with that many epochs.
  c.steps_per_epoch = 0
  c.eval_every_epochs = 0
  c.checkpoint_every_epochs = 0
  # A step whose loss or updated weights are not finite is never applied nor saved
  # (docs/faults.md): 'stop' ends the run (exit 1, good checkpoints kept); 'skip' drops the
  # update, counts it (train/skipped_steps) and stops after nonfinite_max_skips in a row.
  c.nonfinite = 'stop'
  c.nonfinite_max_skips = 10
  # True: glibc maps XLA:CPU's large buffers with transparent huge pages (CPU-only hosts; the
  # process restarts once with GLIBC_TUNABLES set; docs/stack.md §13): far fewer page faults,
  # faster large CPU steps (benchmarks/RESULTS.md). The full-size Swin and MLoRE recipes set it.
  c.host_huge_pages = False
  c.keep_checkpoints = 2  # the latest N checkpoints are kept (N >= 1) ...
  c.keep_period = 0  # ... and every one whose step is a multiple of this (0: none; 1: all)
  # The user fork's WORKDIR/log_rank0.txt (mtl_jax/fork_log.py) under this logger name (its
  # MODEL.NAME; '' = none). configs/fork_yaml.py sets it.
  c.fork_log = ''
  c.num_eval_images = 4  # examples drawn in the prediction grid at every eval
  c.init_from = ''  # weights-only start: a checkpoint dir (see mtl_jax/checkpoint.py)
  # Two-stage training (docs/methods.md §6): also take init_from's optimizer state for the leaves
  # trainable in both stages; the schedule then 'restart's at step 0 (the fork) or 'continue's.
  c.init_opt_state = False
  c.init_schedule = 'restart'
  # A fresh run that continues another exactly from one of its checkpoints (a workdir: its
  # latest, or a step directory such as runs/a/checkpoints/200): weights, optimizer and method
  # state, step and data position; the same config then gives the same later steps bit for bit.
  c.resume_from = ''
  # The training method (mtl_jax/methods, docs/methods.md): 'mtl' = the weighted sum of the task
  # losses; 'maml' | 'reptile' | 'metasgd' | 'taml' (the fork's meta-learning); 'uncertainty' |
  # 'dwa' | 'pcgrad' | 'famo' (task weighting and gradient surgery). Their keys:
  c.method = 'mtl'
  c.maml = ml_collections.ConfigDict(dict(  # maml, metasgd, taml, reptile (the fork's defaults)
      inner_steps=1, inner_lr=1e-3, first_order=True,
      # 'scan': one compiled task pass in a lax.scan over tasks; 'unroll': a Python loop (T
      # passes in the program, slow to compile). The same function (mtl_jax/methods/maml.py).
      loop='scan'))
  c.metasgd = ml_collections.ConfigDict(dict(init=1e-3))  # initial inner learning rates
  c.taml = ml_collections.ConfigDict(dict(lam=0.0, in_gradient=False))  # spread regulariser
  c.uncertainty = ml_collections.ConfigDict(dict(init=-0.5))  # initial log variances s_t
  c.dwa = ml_collections.ConfigDict(dict(temperature=2.0, period=100))  # period: steps per "epoch"
  c.famo = ml_collections.ConfigDict(dict(lr=0.025, gamma=0.01))  # logit Adam lr, its L2 decay
  # Gradient-conflict diagnostics (mtl_jax/methods/conflict.py): every_steps N (0 = off).
  c.conflict = ml_collections.ConfigDict(dict(every_steps=0))
  # What every eval computes (mtl_jax/evaluators); eval_boundary / save_predictions below add
  # 'boundary' / 'save_predictions'.
  c.evaluators = ('metrics', 'prediction_grid')
  # Evaluation (mtl_jax/metrics.py module docstring). The metric set and names of one reference:
  # 'mlore' | 'mtlora' | '' (= config.convention). The resolution metrics see is chosen by
  # config.input.augment ('mlore' pads: original resolution; 'mtlora' resizes labels).
  c.eval_protocol = ''
  # Boundary odsF / oisF / AP (SEISM, mtl_jax/boundary.py) of the edge predictions at every eval,
  # as eval/edge/odsF etc.; slow (about 2 s per image and CPU core).
  c.eval_boundary = False
  c.eval_boundary_workers = 0  # processes per host for it; 0 = every CPU core, 1 = inline
  # Every eval writes WORKDIR/predictions/<task>/<id>.png (depth: <id>.mat) at the original image
  # size, as the reference saves them, for external tools (e.g. mtl_jax.tools.eval_boundary).
  c.save_predictions = False

  # Tasks (mtl_jax/tasks.py) as a comma-separated list, and the reference convention.
  c.tasks = 'semseg,human_parts,sal,normals,edge'
  c.convention = 'mlore'  # 'mlore' | 'mtlora': saliency channels, loss and metric variants
  c.loss_weights = ml_collections.ConfigDict(  # docs/mlore.md §4 (PASCAL) + NYUD depth
      dict(semseg=1.0, human_parts=2.0, sal=5.0, normals=10.0, edge=50.0, depth=1.0))
  c.edge_w = 0.95  # positive-class weight of the edge BCE (loss and eval proxy)
  c.load_balancing_weight = 0.0  # MLoRE's L_cv weight (only models that return gates)

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'synthetic_scenes/small'  # TFDS name[/builder config]
  c.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)  # None: TFDS default
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'validation'
  c.dataset.build_if_missing = False  # only sensible for procedural datasets

  c.input = ml_collections.ConfigDict()
  c.input.crop_size = (512, 512)  # (H, W): train crop = eval pad size (docs/mlore.md §1)
  c.input.scale_range = (0.5, 2.0)
  c.input.cat_max_ratio = 0.75
  c.input.flip = True
  c.input.photometric = True
  c.input.num_workers = 0  # grain worker processes (0 = in-process)
  # Augmentation chain (mtl_jax/transforms.py): 'mlore' (docs/mlore.md §5.1: random scale, crop,
  # flip, colour jitter; eval pads to crop_size) | 'mtlora' (docs/mtlora.md §8: flip, scale and
  # rotate, resize to crop_size; eval resizes image and labels to crop_size). Both read
  # crop_size, scale_range and flip; cat_max_ratio and photometric are 'mlore' only, the two keys
  # below 'mtlora' only. MTLoRA recipes: PASCAL crop (448, 448), scale_range (0.75, 1.25),
  # rotation (-20, 20); NYUD crop (448, 448), rotation (0, 0), scale_choices (1.0, 1.2, 1.5).
  c.input.augment = 'mlore'
  c.input.rotation_range = (-20.0, 20.0)  # degrees, U(lo, hi), counter-clockwise; (0, 0): none
  c.input.scale_choices = ()  # non-empty: the scale is drawn from these instead of scale_range

  c.model = ml_collections.ConfigDict()
  c.model.name = 'vit_baseline'
  c.model.dtype = 'float32'  # computation dtype; 'bfloat16' on accelerators
  # name: a family of mtl_jax/models BACKBONES ('vit' | 'swin'); '' = the model's own.
  c.model.backbone = ml_collections.ConfigDict(dict(
      name='', variant='S/16', patch_size=0, embed_dim=0, depth=0, num_heads=0, taps=(),
      drop_path_rate=0.15, remat='none', attention='auto'))
  # remat: models/backbone.py REMAT_POLICIES; attention (ViT): docs/accelerators.md §3
  c.model.decoder = ml_collections.ConfigDict(dict(channels=192, upsample=4))

  c.frozen = ()  # regexes over parameter paths that are not trained
  c.optimizer = ml_collections.ConfigDict(dict(
      name='adam', learning_rate=2e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-6,
      grad_clip_norm=10.0, decay_1d=True, no_decay=()))
  c.schedule = ml_collections.ConfigDict(dict(
      name='poly', power=0.9, warmup_steps=0, warmup_lr=0.0, min_lr=0.0))

  c.perf_peak_flops = 0.0  # peak FLOP/s of one device for perf/mfu; 0: mtl_jax/perf.py's table
  c.mesh = (('data', -1),)  # (axis, size); -1 = the remaining devices
  c.param_sharding = (('.*', 'replicate'),)  # (regex over param paths, spec); see sharding.py
  return c


def smoke_schedule(c: ml_collections.ConfigDict, batch_size: int) -> None:
  """The `smoke` run every config shares: 6 steps of `batch_size` in 2 epochs of 3, logs every
  2, eval and checkpoint every 3 on 2 eval images (tests and CPU checks)."""
  c.update(total_steps=6, batch_size=batch_size, eval_batch_size=batch_size, log_every_steps=2,
           eval_every_steps=3, checkpoint_every_steps=3, num_eval_images=2, steps_per_epoch=3)
