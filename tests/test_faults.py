"""Faults and bad input never cost a good checkpoint (docs/faults.md).

Non-finite steps (stop / skip), SIGTERM, kill -9 during saves, corrupted checkpoints, a
checkpoint of another model and the checks made before the workdir is written. Each test first
states the defect it reproduces (the 2026-12-01 probe, before this change).
"""

import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from conftest import launch_args, launch_env, smoke_config
from mtl_jax import ConfigError
from mtl_jax import RunStopped
from mtl_jax import checkpoint
from mtl_jax import reporting
from mtl_jax import train

DEVICES = jax.devices()[:1]


def _losses(workdir) -> dict[int, float]:
  return {l['step']: l['train/loss'] for l in reporting.read_metrics(workdir) if 'train/loss' in l}


def _steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def _all_finite(path) -> bool:
  params, stats = checkpoint.load_weights(path)
  return all(np.all(np.isfinite(x)) for x in jax.tree.leaves((params, stats)))


# -- non-finite steps ------------------------------------------------------------------------------

@pytest.mark.slow
def test_nonfinite_step_is_never_applied_nor_saved_and_the_rerun_resumes(tfds_dir, tmp_path):
  """Before: the finite check ran on log steps only, so with a checkpoint every step the NaN
  weights of later steps were saved and keep-2 deleted the good ones. Now the step itself checks
  loss and weights: under 'stop' the run ends with one error naming the step, every checkpoint
  kept is finite, and a rerun with a sane learning rate resumes from the last good step."""
  good = dict(log_every_steps=100, checkpoint_every_steps=1, keep_checkpoints=2)
  train.train_and_evaluate(smoke_config(tfds_dir, total_steps=3, **good), tmp_path, DEVICES)
  bad = smoke_config(tfds_dir, total_steps=12, **good)
  bad.optimizer.learning_rate = float('inf')  # NaN / Inf weights from the next step on: step 4
  with pytest.raises(RunStopped, match=r'step 4: the loss or the updated weights are not '
                     r'finite .* checkpoints up to step 3 are kept') as e:
    train.train_and_evaluate(bad, tmp_path, DEVICES)
  assert e.value.exit_code == 1 and '\n' not in str(e.value)
  assert _steps(tmp_path) == [2, 3]  # the good ones survive
  assert all(_all_finite(tmp_path / 'checkpoints' / str(s)) for s in (2, 3))
  assert all(np.isfinite(v) for l in reporting.read_metrics(tmp_path) for v in l.values())

  final = train.train_and_evaluate(smoke_config(tfds_dir, total_steps=12, **good), tmp_path,
                                   DEVICES)  # resumes from step 3
  assert all(np.isfinite(v) for v in final.values())
  assert max(_steps(tmp_path)) == 12 and _all_finite(tmp_path / 'checkpoints' / '12')


@pytest.mark.slow
def test_skip_policy_drops_the_update_counts_it_and_stops_after_n_in_a_row(tfds_dir, tmp_path):
  config = smoke_config(tfds_dir, total_steps=12, log_every_steps=1, checkpoint_every_steps=1,
                        nonfinite='skip', nonfinite_max_skips=3)
  config.optimizer.learning_rate = float('inf')  # every update non-finite
  with pytest.raises(RunStopped, match=r'steps 1\.\.3: 3 non-finite steps in a row'):
    train.train_and_evaluate(config, tmp_path, DEVICES)
  lines = reporting.read_metrics(tmp_path)
  assert [l['train/skipped_steps'] for l in lines if 'train/skipped_steps' in l] == [1, 2]
  assert not any('train/loss' in l for l in lines)  # no applied step: no means written
  # Skipped steps keep the initial weights: steps 1 and 2 were saved, finite.
  assert _steps(tmp_path) == [1, 2]
  assert all(_all_finite(tmp_path / 'checkpoints' / str(s)) for s in (1, 2))


# -- signals and kill -9 ---------------------------------------------------------------------------

EXTRA = ('--config.total_steps=40', '--config.log_every_steps=1', '--config.eval_every_steps=40')


@pytest.fixture(scope='module')
def straight(tfds_dir, tmp_path_factory) -> dict[int, float]:
  """The losses of an uninterrupted 40-step launch.py run (checkpoints do not change them)."""
  cwd = tmp_path_factory.mktemp('straight')
  subprocess.run(launch_args('run', tfds_dir, *EXTRA), check=True, capture_output=True, cwd=cwd,
                 env=launch_env())
  return _losses(cwd / 'run')


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_and_the_rerun_equals_an_uninterrupted_run(
    tfds_dir, tmp_path, straight):
  """Before: SIGTERM killed the run (exit 143) without a save, leaving the step being saved as
  a -tmp directory; the rerun resumed 50 steps back. Now: a checkpoint at the step reached, exit
  143 within 60 s, no -tmp left, and the same command continues bit for bit."""
  run = dict(cwd=tmp_path, env=launch_env())
  args = launch_args('termed', tfds_dir, *EXTRA, '--config.checkpoint_every_steps=100')
  proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          **run)
  metrics = tmp_path / 'termed' / reporting.METRICS_FILE
  deadline = time.time() + 300
  while not (metrics.exists() and '"train/loss"' in metrics.read_text()):
    assert proc.poll() is None and time.time() < deadline, 'the run ended before training'
    time.sleep(0.05)
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 143 and time.time() - sent < 60
  assert re.search(r'stopped: SIGTERM: stopped at step (\d+) after saving', err), err[-2000:]
  reached = int(re.search(r'stopped at step (\d+)', err).group(1))
  assert 1 <= reached < 40 and _steps(tmp_path / 'termed') == [reached]
  assert not list((tmp_path / 'termed' / 'checkpoints').glob('*tmp*'))

  subprocess.run(args, check=True, capture_output=True, **run)
  got = _losses(tmp_path / 'termed')
  assert sorted(got) == list(range(1, 41)) and got == straight  # bit for bit


@pytest.mark.slow
def test_kill_9_during_saves_ten_times_then_the_losses_equal_a_clean_run(tfds_dir, tmp_path,
                                                                         straight):
  """A checkpoint every step, SIGKILL at 10 random moments (before: each left a -tmp directory
  behind): every rerun starts from a complete step, stale -tmp directories are removed, and every
  step's loss equals the uninterrupted run's bit for bit (metrics.jsonl is cut back to the step
  resumed from, so each loss comes from the run that went on from there)."""
  run = dict(cwd=tmp_path, env=launch_env())
  args = launch_args('killed', tfds_dir, *EXTRA, '--config.checkpoint_every_steps=1')
  rng = random.Random(0)
  for _ in range(10):
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **run)
    ckpts = tmp_path / 'killed' / 'checkpoints'
    start = _steps(tmp_path / 'killed')[-1] if ckpts.is_dir() and _steps(tmp_path / 'killed') else 0
    deadline = time.time() + 300
    while not (ckpts.is_dir() and _steps(tmp_path / 'killed')
               and _steps(tmp_path / 'killed')[-1] > start):
      assert proc.poll() is None and time.time() < deadline, 'the run ended before a save'
      time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.3))  # somewhere in the next steps and saves
    if proc.poll() is not None:
      break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  done = subprocess.run(args, check=True, capture_output=True, text=True, **run)
  resumed = re.search(r'Resumed from .* at step (\d+)', done.stderr)
  assert resumed or _steps(tmp_path / 'killed')[-1] == 40
  assert not list((tmp_path / 'killed' / 'checkpoints').glob('*tmp*'))
  got = _losses(tmp_path / 'killed')
  assert sorted(got) == list(range(1, 41)) and got == straight  # bit for bit


# -- corrupted checkpoints -------------------------------------------------------------------------

def _corrupt(step_dir, case: str) -> None:
  state = step_dir / 'state'
  if case == 'truncated_arrays':  # the OCDBT data files (state/ocdbt.process_*/d/*)
    data = [f for f in state.rglob('*') if f.is_file() and f.parent.name == 'd']
    assert data
    for f in data:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  elif case == 'garbage_metadata':
    (state / '_METADATA').write_text('{not json')
  elif case == 'garbage_iterator':
    for f in (step_dir / 'data').rglob('*'):
      if f.is_file():
        f.write_text('{"garbage": ')
  elif case == 'missing_state':
    shutil.rmtree(state)


@pytest.fixture(scope='module')
def trained(tfds_dir, tmp_path_factory):
  """A smoke run with checkpoints at steps 3 and 6."""
  workdir = tmp_path_factory.mktemp('trained')
  train.train_and_evaluate(smoke_config(tfds_dir), workdir, DEVICES)
  assert _steps(workdir) == [3, 6]
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize('case', ['truncated_arrays', 'garbage_metadata', 'garbage_iterator',
                                  'missing_state'])
def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(case, trained, tfds_dir,
                                                                     tmp_path, caplog):
  """Before: up to 416 lines of traceback and no resume. Now one warning naming the checkpoint,
  the checkpoint kept as unreadable-6, and the run resumes from step 3."""
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  _corrupt(workdir / 'checkpoints' / '6', case)
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(smoke_config(tfds_dir), workdir, DEVICES)
  warnings = [r.getMessage() for r in caplog.records if 'cannot be restored' in r.getMessage()]
  assert len(warnings) == 1 and '/6 cannot be restored' in warnings[0], warnings
  assert (workdir / 'checkpoints' / 'unreadable-6').is_dir()
  assert _steps(workdir) == [3, 6]  # resumed at 3, trained and saved 6 again
  assert sorted(_losses(workdir)) == [2, 4, 6]


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_one_error_before_anything_is_written(trained, tfds_dir,
                                                                               tmp_path):
  """Before: an Orbax traceback suggesting strict=False after config.json was overwritten."""
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  before = (workdir / 'config.json').read_text()
  other = smoke_config(tfds_dir)
  other.model.backbone.embed_dim = 2 * other.model.backbone.embed_dim
  with pytest.raises(ConfigError, match='holds another model than this config') as e:
    train.train_and_evaluate(other, workdir, DEVICES)
  assert '\n' not in str(e.value)
  assert (workdir / 'config.json').read_text() == before and _steps(workdir) == [3, 6]


# -- checks before the workdir is written ----------------------------------------------------------

@pytest.mark.parametrize('overrides, match', [
    (dict(keep_checkpoints=0), 'keep_checkpoints must be positive'),
    (dict(num_eval_images=0), 'num_eval_images=0 must be positive'),
    (dict(nonfinite='ignore'), "use 'stop' or 'skip'"),
    (dict(init_from='/nonexistent/ckpt'), 'init_from'),
    (dict(init_from='GARBAGE'), 'cannot be read'),
])
def test_bad_input_fails_before_the_workdir_is_written(overrides, match, tfds_dir, tmp_path):
  if overrides.get('init_from') == 'GARBAGE':  # a directory that is not a checkpoint
    (tmp_path / 'garbage' / 'state').mkdir(parents=True)
    (tmp_path / 'garbage' / 'state' / '_METADATA').write_text('{not json')
    overrides = dict(init_from=str(tmp_path / 'garbage'))
  workdir = tmp_path / 'run'
  with pytest.raises(ConfigError, match=match):
    train.train_and_evaluate(smoke_config(tfds_dir, **overrides), workdir, DEVICES)
  assert not workdir.exists()


def test_workdir_that_is_a_file_and_total_steps_below_the_checkpoint(trained, tfds_dir,
                                                                     tmp_path):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(ConfigError, match='is a file; give a directory'):
    train.train_and_evaluate(smoke_config(tfds_dir), tmp_path / 'file', DEVICES)
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  before = json.loads((workdir / 'config.json').read_text())
  with pytest.raises(ConfigError, match='at step 6, beyond config.total_steps=3'):
    train.train_and_evaluate(smoke_config(tfds_dir, total_steps=3), workdir, DEVICES)
  assert json.loads((workdir / 'config.json').read_text()) == before


def test_stale_tmp_directories_are_removed_at_start(trained, tfds_dir, tmp_path, caplog):
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  stale = workdir / 'checkpoints' / '9.orbax-checkpoint-tmp-123'
  stale.mkdir()
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(smoke_config(tfds_dir, total_steps=6), workdir, DEVICES)
  assert not stale.exists() and 'an unfinished save' in caplog.text
  assert os.path.isdir(workdir / 'checkpoints' / '6')


def test_corrupt_dataset_shard_is_one_error_naming_the_file_before_the_workdir(tfds_dir,
                                                                               tmp_path):
  """Before: a Riegeli traceback naming no file, after compiling and the first eval, with the
  workdir written. Now every shard is checked (its footer and record count) when it opens."""
  data_dir = tmp_path / 'data'
  shutil.copytree(os.path.join(tfds_dir, 'synthetic_scenes', 'tiny'),
                  data_dir / 'synthetic_scenes' / 'tiny')
  shard = next((data_dir / 'synthetic_scenes' / 'tiny').rglob('*-train.array_record-*'))
  shard.write_bytes(shard.read_bytes()[:-100])
  with pytest.raises(ConfigError, match=re.escape(str(shard)) + ': unreadable shard'):
    train.train_and_evaluate(smoke_config(str(data_dir)), tmp_path / 'run', DEVICES)
  assert not (tmp_path / 'run').exists()
