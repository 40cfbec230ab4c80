r"""Entry point: train or evaluate one configured job.

  python launch.py --config=configs/demo.py --workdir=runs/demo
  python launch.py --config=configs/demo.py:smoke --workdir=/tmp/x --config.total_steps=10
  python launch.py --config=configs/demo.py --workdir=runs/demo --mode=eval
  python launch.py --config=configs/mlore_pascal.py --workdir=runs/x --mode=eval \
      --config.save_predictions=True --config.eval_boundary=True
  python launch.py --config=FORK/configs/mtlora/tiny_448/mtlora_tiny_448_r64_scale4_pertask.yaml \
      --workdir=runs/mtlora      # a yaml of the user's fork (configs/fork_yaml.py)

Eval mode writes WORKDIR/eval_metrics.jsonl; `save_predictions` adds WORKDIR/predictions/<task>/
<id>.png in the references' layout and `eval_boundary` the SEISM boundary scores
(configs/common.py).

A run in a workdir that already holds checkpoints resumes from the latest one. On multi-host
TPU VMs / multi-node GPU jobs pass --jax_distributed on every host (see README.md).
Bad input (config, dataset, paths) prints one `error:` line naming the fix and exits with 1.
"""

import logging as py_logging
import os
import sys

# TensorFlow is only used by clu's TensorBoard writer: quiet, and kept off accelerators in main().
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
from ml_collections.config_flags import config_path

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:args]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and reports.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'Train (and evaluate) or '
                          'only evaluate the latest checkpoint / config.init_from.')
_JAX_DISTRIBUTED = flags.DEFINE_bool(
    'jax_distributed', False, 'Call jax.distributed.initialize() first (multi-host jobs). On '
    'Cloud TPU / SLURM / Kubernetes the cluster is auto-detected; elsewhere also pass:')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Index of this process.')
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout', 100, 'Seconds without a heartbeat after which the JAX distributed '
    'service declares a process dead and stops the others (docs/faults.md §5).')
_ALLOW_UNIMPLEMENTED = flags.DEFINE_bool(
    'allow_unimplemented', False, 'With --config=FORK.yaml: warn about, instead of rejecting, '
    'settings of the fork that mtl_jax does not implement (docs/fork_yaml.md §3).')
flags.mark_flags_as_required(['config', 'workdir'])


def _parse_flags(argv):
  """absl flag parsing, with one `error:` line instead of a traceback for bad input."""
  try:
    args = flags.FLAGS(argv)
    _ = flags.FLAGS.config.seed  # a config file that failed to load raises here
    return args
  except Exception as e:  # pylint: disable=broad-except
    message = next((l.strip() for l in reversed(str(e).splitlines()) if l.strip()), repr(e))
    print(f'error: {_unknown_override(argv) or message}', file=sys.stderr)
    sys.exit(1)


def _unknown_override(argv) -> str | None:
  """Names the first --config.<key>=... whose key the config file does not define."""
  file_args = [a for a in argv[1:] if a.startswith('--config=')]
  if not file_args:
    return None
  values, saved_argv = flags.FlagValues(), sys.argv
  try:  # config_flags reads overrides from sys.argv when the flag is defined
    sys.argv = ['launch.py', file_args[-1]]
    config_flags.DEFINE_config_file('config', None, '', flag_values=values)
    values(sys.argv)
    config = values.config
  except Exception:  # pylint: disable=broad-except
    return None
  finally:
    sys.argv = saved_argv
  for arg in argv[1:]:
    if arg.startswith('--config.'):
      path = arg[len('--config.'):].split('=', 1)[0]
      try:
        config_path.get_value(path, config)
      except (KeyError, AttributeError, IndexError):
        return (f'unknown config key {path!r} in {arg}; the known keys are those of '
                'configs/common.py and the config file')
  return None


def _quiet_library_info(record: py_logging.LogRecord) -> bool:
  """Drops Orbax's per-save INFO chatter (dozens of lines per checkpoint); keeps warnings."""
  return record.levelno >= py_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_quiet_library_info)
  import jax  # pylint: disable=g-import-not-at-top
  from mtl_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  xla_cpu.set_host_memory(_CONFIG.value)  # may restart the process: before any jax computation
  if _JAX_DISTRIBUTED.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               heartbeat_timeout_seconds=_HEARTBEAT_TIMEOUT.value)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')

  import mtl_jax  # pylint: disable=g-import-not-at-top
  from mtl_jax import train  # pylint: disable=g-import-not-at-top
  logging.info('JAX process %d/%d, %d local / %d global devices (%s); host huge pages: %s',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform, xla_cpu.host_huge_pages())
  try:
    if _MODE.value == 'train':
      train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    else:
      train.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
  except mtl_jax.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except mtl_jax.RunStopped as e:  # docs/faults.md: good checkpoints kept; the exit code says why
    print(f'{"error" if e.exit_code == 1 else "stopped"}: {e}', file=sys.stderr)
    sys.exit(e.exit_code)


def cli():
  """Entry point of the console script (pyproject.toml) and of `python -m`."""
  from configs import fork_yaml  # pylint: disable=g-import-not-at-top
  sys.argv = fork_yaml.launch_argv(sys.argv)
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  cli()
