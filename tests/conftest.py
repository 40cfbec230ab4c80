"""Test session setup: 8 simulated CPU devices (sharding tests), repo root importable."""

import atexit
import os
import shutil
import sys
import tempfile

# Tests compile with LLVM at -O0: XLA:CPU's compile time, most of the suite's, drops ~3x (the
# MLoRE smoke train step: 107 -> 34 s on 2 cores) and its runtime barely moves at test sizes (the
# matmuls and convolutions are library calls). Values move at rounding level only (parity of the
# four fixtures: max rel err 2.0e-6 / 1.1e-6 / 2.5e-6 / 1.0e-6 at -O0, 2.2e-6 / 1.2e-6 / 2.3e-6 /
# 1.1e-6 at -O3, tolerance 1e-5), and whatever a test compares bit for bit runs under these same
# flags, subprocesses included (launch_env).
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'
# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# One persistent compilation cache for the session and the launch.py subprocesses it starts
# (they inherit the environment): a program compiled once (the same smoke train step in another
# test, a resumed run) is loaded, not recompiled. Executables are keyed by the program and the
# XLA flags, so results are those of a fresh compile.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='mtl_jax_test_jit_cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from absl import flags  # pylint: disable=g-import-not-at-top

# grain reads absl flags; outside absl.app.run they must be marked parsed (docs/stack.md §3).
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()

FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')

import pytest  # pylint: disable=g-import-not-at-top,g-bad-import-order


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory):
  """A TFDS data dir with synthetic_scenes/tiny (8 + 4 images) and /ci (512 + 96), built once."""
  import data_builders.synthetic_scenes  # noqa: F401  (registers the builder)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = tmp_path_factory.mktemp('tfds')
  for name in ('tiny', 'ci'):
    tfds.builder(f'synthetic_scenes/{name}', data_dir=data_dir).download_and_prepare()
  return str(data_dir)


# The trainer-mechanics tests (reports, resume, devices, processes, bad input) run the demo's ViT
# baseline: it compiles in seconds, where MLoRE's train step takes ~30 s on 2 cores. MLoRE itself
# goes through the trainer in test_train.py's shortened demo and test_mlore_configs.py.
SMOKE = 'smoke,model=vit_baseline'


def smoke_config(tfds_dir, **overrides):
  """configs/demo.py:smoke,model=vit_baseline on the 8-image `tiny` dataset (24x32)."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  c = demo.get_config(SMOKE)
  c.dataset.update(name='synthetic_scenes/tiny', data_dir=tfds_dir, build_if_missing=False)
  c.input.crop_size = (24, 32)
  c.update(overrides)
  return c


def launch_args(workdir, tfds_dir, *extra):
  """launch.py on configs/demo.py:SMOKE + `tiny`; absolute script/config paths, so any cwd works."""
  return [sys.executable, os.path.join(ROOT, 'launch.py'),
          f'--config={os.path.join(ROOT, "configs", "demo.py")}:{SMOKE}', f'--workdir={workdir}',
          '--config.dataset.name=synthetic_scenes/tiny', f'--config.dataset.data_dir={tfds_dir}',
          '--config.input.crop_size=(24, 32)', *extra]


def launch_env(num_devices=2):
  """Environment of a launch.py subprocess with `num_devices` simulated CPU devices."""
  flags = f'--xla_force_host_platform_device_count={num_devices} {TEST_XLA_FLAGS}'
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  return env




def sigkill_after_checkpoint(args, checkpoint_dir, timeout_s=600, **popen_kwargs) -> None:
  """Starts `args`, waits until `checkpoint_dir` exists and SIGKILLs the run (asserting it was
  still running: a run that ended first would prove nothing)."""
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          **popen_kwargs)
  deadline = time.time() + timeout_s
  while not os.path.isdir(checkpoint_dir):
    assert proc.poll() is None and time.time() < deadline, 'run ended before its checkpoint'
    time.sleep(0.01)
  assert proc.poll() is None, 'the run finished before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()


@pytest.fixture(autouse=True, scope='module')
def _free_compiled_programs():
  """Drops JAX's in-memory caches of compiled programs after each test module: the suite's one
  process would otherwise hold every module's executables (more than 15 GB by the end)."""
  yield
  import gc  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  jax.clear_caches()
  gc.collect()

# The files that take longest first (longest-processing-time order), so that `--dist loadfile`
# hands them out while both workers are busy and the two finish together instead of one running
# test_train.py / test_two_stage.py alone at the end (durations: `pytest --durations=40`).
_LONGEST_FIRST = ('test_methods.py', 'test_mlore_configs.py', 'test_train.py', 'test_faults.py',
                  'test_meta_learning.py', 'test_two_stage.py', 'test_promlora.py',
                  'test_perf.py', 'test_multiprocess.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole
