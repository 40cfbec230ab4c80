r"""The user fork's `main.py` command line on mtl_jax (docs/fork_yaml.md §4).

  python -m mtl_jax.tools.fork_main \
      --cfg configs/mtlora/tiny_448/promlora_tiny_448_r32_prom50_scale4_pertask.yaml \
      --pascal DATA_DIR --tasks semseg,normals,sal,human_parts --batch-size 12 --ckpt-freq=20 \
      --eval-freq=5 --epochs=300 --resume-backbone ./backbone/swin_tiny_patch4_window7_224.pth

Each fork command runs with its program name changed: `python -m torch.distributed.launch
--nproc_per_node 2 --master_port 29501 main.py ARGS` becomes `python -m mtl_jax.tools.fork_main
--nproc_per_node 2 --master_port 29501 main.py ARGS` (the launcher's arguments, `main.py` and
`--local_rank` / `--local-rank` are accepted and ignored: JAX runs one process per host over
every visible device, `CUDA_VISIBLE_DEVICES` still chooses them; multi-host: `--jax_distributed`).

The flags mean what they mean in the fork, with its defaults (`--epochs` 300, `--ckpt-freq` 5,
`--eval-freq` 5, `--tasks` depth, `--output` output): `--cfg` is read by configs/fork_yaml.py,
`--opts KEY VALUE ...` set fork keys, `--batch-size` is per device (the global batch is it times
the device count; learning rates scale with the global batch / 512 and epochs count
⌊train images / global batch⌋ steps, as the fork's), `--pascal DIR` / `--nyud DIR` choose the
dataset and give its TFDS data dir (built from the fork's PASCAL_MT / NYUD_MT folders once with
`python -m data_builders.build data_builders/pascal_context --manual_dir=... --data_dir=DIR`),
the run's directory is `<output>/<name or MODEL.NAME>/<tag or TAG>` (a rerun resumes from it).
`--resume-backbone X` starts the backbone from X: an official Swin `.pth` (converted once into
`<output>/converted/`, mtl_jax/tools/convert.py `swin_imagenet`) or a converted directory.
`--resume X` takes X's weights and optimizer state with the schedule restarted (the fork's
behaviour, docs/user_fork.md §4): an mtl_jax run directory, its checkpoints directory or one
step directory (`.../checkpoints/200`), or a fork `ckpt_epoch_N.pth`: its weights and, when it
has an `optimizer` entry, its AdamW moments and step count mapped by parameter order
(mtl_jax/convert/adamw.py). With `--eval` the `--resume` weights are evaluated and nothing
trains. `--freeze-backbone` trains the decoders only.

Bad input prints one `error:` line naming the fix and exits with 1, before anything is written.
"""

import argparse
import os
import re
import sys

from mtl_jax import ConfigError
from mtl_jax import RunStopped

# torch.distributed.launch / torchrun arguments and main.py flags with no effect here.
_LAUNCHER = ('--nproc_per_node', '--nproc-per-node', '--nnodes', '--node_rank', '--node-rank',
             '--master_addr', '--master-addr', '--master_port', '--master-port', '--rdzv_backend',
             '--rdzv-backend', '--rdzv_endpoint', '--rdzv-endpoint', '--rdzv_id', '--rdzv-id',
             '--max_restarts', '--max-restarts', '--local_rank', '--local-rank')
_LAUNCHER_SWITCHES = ('--use_env', '--use-env', '--standalone')
_IGNORED_SWITCHES = ('--disable_wandb', '--no_eval_50', '--zip', '--fused_window_process',
                     '--fused_layernorm', '--deterministic')


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='python -m mtl_jax.tools.fork_main',
      description="The user fork's main.py flags on mtl_jax (docs/fork_yaml.md §4).")
  p.add_argument('program', nargs='?', help="the launcher's script argument (main.py); ignored")
  p.add_argument('--cfg', required=True, metavar='FILE', help='a yaml of the fork')
  p.add_argument('--opts', nargs='+', default=None, help='fork config KEY VALUE pairs')
  p.add_argument('--tasks', default='depth', help='comma-separated tasks (default: depth)')
  p.add_argument('--pascal', metavar='DIR', help='PASCAL-Context: its TFDS data dir')
  p.add_argument('--nyud', metavar='DIR', help='NYUD-v2: its TFDS data dir')
  p.add_argument('--data-path', metavar='DIR', help='TFDS data dir (with --pascal/--nyud unset: '
                 'NYUD, the fork\'s default)')
  p.add_argument('--batch-size', type=int, help='batch per device (DATA.BATCH_SIZE)')
  p.add_argument('--epochs', type=int, default=300)
  p.add_argument('--ckpt-freq', type=int, default=5, help='checkpoint every N epochs')
  p.add_argument('--eval-freq', type=int, default=5, help='evaluate every N epochs')
  p.add_argument('--resume', metavar='CKPT', help='weights + optimizer state (schedule restarts)')
  p.add_argument('--resume-backbone', metavar='PTH', help='backbone weights to start from')
  p.add_argument('--freeze-backbone', action='store_true', help='train the decoders only')
  p.add_argument('--eval', action='store_true', help='evaluate --resume only')
  p.add_argument('--output', default='output', metavar='PATH')
  p.add_argument('--tag', help='TAG (default: the yaml\'s, "default")')
  p.add_argument('--name', help='MODEL.NAME override')
  p.add_argument('--seed', type=int, help='SEED')
  p.add_argument('--skip_initial_validation', action='store_true', help='no eval at step 0')
  p.add_argument('--accumulation-steps', type=int, help='TRAIN.ACCUMULATION_STEPS')
  p.add_argument('--use-checkpoint', action='store_true', help='rematerialise every block')
  p.add_argument('--disable_amp', action='store_true', help='float32 instead of bfloat16')
  p.add_argument('--optim', help='TRAIN.OPTIMIZER.NAME')
  p.add_argument('--skip_decoder', action='store_true', help='TRAIN.SKIP_DECODER_CKPT')
  p.add_argument('--decoder_map', metavar='JSON', help='MODEL.DECODER_HEAD per task')
  p.add_argument('--run_name', help='ignored (wandb)')
  p.add_argument('--allow_unimplemented', action='store_true',
                 help='warn about, instead of rejecting, fork settings mtl_jax does not implement')
  p.add_argument('--smoke', action='store_true',
                 help='mtl_jax: the recipes\' tiny model and 6-step schedule (tests, CPU checks)')
  p.add_argument('--jax_distributed', action='store_true',
                 help='mtl_jax: call jax.distributed.initialize() first (multi-host jobs)')
  for name in _LAUNCHER:
    p.add_argument(name, help=argparse.SUPPRESS)
  for name in _LAUNCHER_SWITCHES + _IGNORED_SWITCHES:
    p.add_argument(name, action='store_true', help=argparse.SUPPRESS)
  return p


# main.py flags -> the fork keys they set (its update_config), when given.
_VALUE_FLAGS = (('batch_size', 'DATA.BATCH_SIZE'),
                ('accumulation_steps', 'TRAIN.ACCUMULATION_STEPS'),
                ('optim', 'TRAIN.OPTIMIZER.NAME'), ('seed', 'SEED'), ('tag', 'TAG'),
                ('name', 'MODEL.NAME'))
_SWITCHES = (('skip_initial_validation', 'SKIP_INITIAL_EVAL', True),
             ('use_checkpoint', 'TRAIN.USE_CHECKPOINT', True), ('disable_amp', 'AMP_ENABLE', False),
             ('skip_decoder', 'TRAIN.SKIP_DECODER_CKPT', True))


def _fork_tree(args) -> dict:
  """The fork's config tree: the yaml, then --opts, then the dedicated flags (the fork's
  update_config order)."""
  import json  # pylint: disable=g-import-not-at-top
  from mtl_jax import fork_config  # pylint: disable=g-import-not-at-top
  for flag in ('batch_size', 'epochs', 'ckpt_freq', 'eval_freq'):
    if getattr(args, flag) is not None and getattr(args, flag) <= 0:
      raise ConfigError(f'--{flag.replace("_", "-")} must be positive, got {getattr(args, flag)}')
  cfg = fork_config.load(args.cfg)
  fork_config.merge_opts(cfg, args.opts)
  values = {'TRAIN.EPOCHS': args.epochs, 'SAVE_FREQ': args.ckpt_freq,
            'EVAL_FREQ': args.eval_freq}
  for flag, key in _VALUE_FLAGS:
    if getattr(args, flag) is not None:
      values[key] = getattr(args, flag)
  for flag, key, value in _SWITCHES:
    if getattr(args, flag):
      values[key] = value
  if args.decoder_map:
    try:
      with open(args.decoder_map) as f:
        heads = json.load(f)
    except (OSError, ValueError) as e:
      raise ConfigError(f'--decoder_map {args.decoder_map}: {e}') from e
    for task, head in heads.items():
      values[f'MODEL.DECODER_HEAD.{task}'] = head
  for key, value in values.items():
    fork_config.set_value(cfg, key, value, source='the command line')
  return cfg


def resolve(argv: list[str]):
  """(mtl_jax config, run directory, 'train' | 'eval', weights to evaluate or None) of a fork
  command line (argv without the program name). Converts .pth files (--resume-backbone,
  --resume) into `<output>/converted/` first; ConfigError for bad input."""
  from configs import fork_yaml  # pylint: disable=g-import-not-at-top
  from mtl_jax import fork_config  # pylint: disable=g-import-not-at-top
  from mtl_jax.convert import adamw  # pylint: disable=g-import-not-at-top
  args = parser().parse_args(argv)
  if args.pascal and args.nyud:
    raise ConfigError('give one of --pascal and --nyud')
  dataset = 'pascal_context' if args.pascal else 'nyud_v2'  # the fork's default DBNAME is NYUD
  data_dir = args.pascal or args.nyud or args.data_path
  tasks = [t for t in re.split(r'\s*,\s*', args.tasks.strip()) if t]
  if 'shared' in tasks:
    raise ConfigError("'shared' is a reserved task name (the fork's config.py); remove it from "
                      '--tasks')
  cfg = _fork_tree(args)
  fork_config.check_implemented(cfg, tasks, allow_unimplemented=args.allow_unimplemented)
  config = fork_yaml.to_config(cfg, dataset=dataset, tasks=tasks,
                               freeze_backbone=args.freeze_backbone, smoke=args.smoke)
  if data_dir and not args.smoke:
    config.dataset.data_dir = os.path.abspath(data_dir)
  elif data_dir:  # smoke: the tiny procedural data, kept in DIR
    config.dataset.update(data_dir=os.path.abspath(data_dir), build_if_missing=True)
  workdir = os.path.join(args.output, cfg['MODEL']['NAME'], cfg['TAG'])

  if args.eval and not args.resume:
    raise ConfigError('--eval evaluates --resume CKPT; give the checkpoint to evaluate')
  weights = None
  if args.resume:
    source = _checkpoint(args.resume, 'mtlora' if config.model.name != 'promlora' else 'promlora',
                         config, args.output)
    if args.eval:
      weights = source
    else:
      config.init_from = source
      # An mtl_jax checkpoint, or a .pth with an optimizer entry (its moments, converted).
      config.init_opt_state = (not args.resume.endswith('.pth')
                               or os.path.exists(os.path.join(source, adamw.FILE)))
      config.init_schedule = 'restart'
  elif args.resume_backbone:
    config.init_from = _checkpoint(args.resume_backbone, 'swin_imagenet', config, args.output)
  return config, workdir, 'eval' if args.eval else 'train', weights


def _checkpoint(path: str, fmt: str, config, output: str) -> str:
  """`path` itself if it is an mtl_jax checkpoint directory, else the `.pth` converted into
  `<output>/converted/<name>-<sha256[:12]>-<format>` (reused when present)."""
  if os.path.isdir(path):
    return os.path.abspath(path)
  if not os.path.isfile(path):
    raise ConfigError(f'{path} not found; give a .pth file or an mtl_jax checkpoint directory')
  from mtl_jax.tools import convert as convert_tool  # pylint: disable=g-import-not-at-top
  stem = os.path.splitext(os.path.basename(path))[0]
  out = os.path.abspath(os.path.join(output, 'converted',
                                     f'{stem}-{convert_tool.sha256(path)[:12]}-{fmt}'))
  if not os.path.isdir(out):
    convert_tool.run(fmt, path, out, config)
  return out


def main(argv: list[str]) -> int:
  if '--jax_distributed' in argv:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  try:
    config, workdir, mode, weights = resolve(argv)
  except ConfigError as e:
    print('error: ' + '; '.join(l.strip() for l in str(e).splitlines() if l.strip()),
          file=sys.stderr)
    return 1
  from mtl_jax import train  # pylint: disable=g-import-not-at-top
  try:
    if mode == 'eval':
      train.evaluate_checkpoint(config, workdir, weights=weights)
    else:
      train.train_and_evaluate(config, workdir)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  except RunStopped as e:  # docs/faults.md
    print(f'{"error" if e.exit_code == 1 else "stopped"}: {e}', file=sys.stderr)
    return e.exit_code
  return 0


def cli():
  """Entry point of the console script (pyproject.toml) and of `python -m`."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  sys.exit(main(sys.argv[1:]))


if __name__ == '__main__':
  cli()
