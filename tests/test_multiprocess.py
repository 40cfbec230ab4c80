"""Two JAX processes on 127.0.0.1 (2 CPU devices each): the multi-host path of launch.py.

Each process reads its own shard of the data; the step runs on the global 4-device mesh; only
process 0 writes reports; the checkpoint holds both processes' iterator positions and a restart of
both processes resumes from it; one process killed stops the other, and both restarted resume.
"""

import json
import re
import signal
import subprocess
import time

import portpicker
import pytest

from conftest import ROOT, launch_args, launch_env
from mtl_jax import reporting


def _start_two_processes(workdir, tfds_dir, total_steps, *extra):
  port = portpicker.pick_unused_port()
  return [subprocess.Popen(
      launch_args(workdir, tfds_dir, '--jax_distributed', f'--coordinator_address=127.0.0.1:{port}',
                  '--num_processes=2', f'--process_id={i}', f'--config.total_steps={total_steps}',
                  '--config.log_every_steps=1', '--config.checkpoint_every_steps=3', *extra),
      cwd=ROOT, env=launch_env(2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
          for i in range(2)]


def _run_two_processes(workdir, tfds_dir, total_steps):
  procs = _start_two_processes(workdir, tfds_dir, total_steps)
  logs = [p.communicate(timeout=600)[1] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return logs


def _losses(workdir) -> dict[int, float]:
  return {l['step']: l['train/loss'] for l in reporting.read_metrics(workdir) if 'train/loss' in l}


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume_after_one_is_killed(tfds_dir, tmp_path):
  """Reports, per-process data positions in the checkpoint, and faults (docs/faults.md §5):
  with one process killed the other stops within the heartbeat timeout (10 s here) with the
  distributed service's message instead of hanging; a restart of both resumes and every loss
  equals the uninterrupted run's bit for bit."""
  straight = tmp_path / 'straight'
  logs = _run_two_processes(straight, tfds_dir, total_steps=9)
  for i, log in enumerate(logs):
    assert f'JAX process {i}/2, 2 local / 4 global devices' in log
  lines = reporting.read_metrics(straight)
  steps = [l['step'] for l in lines]
  assert steps == sorted(set(steps)) and {1, 9} <= set(steps), 'process 0 alone writes'
  data_dir = straight / 'checkpoints' / '9' / 'data'
  assert sorted(p.name for p in data_dir.iterdir() if p.suffix == '.json') == [
      'process_0-of-2.json', 'process_1-of-2.json']
  # Each process reports the same (global) loss.
  loss_lines = [re.findall(r'step (\d+)/9 \| loss ([\d.]+)', log) for log in logs]
  assert loss_lines[0] == loss_lines[1] and len(loss_lines[0]) == 9

  killed = tmp_path / 'killed'
  procs = _start_two_processes(killed, tfds_dir, 9, '--heartbeat_timeout=10')
  deadline = time.time() + 300
  while not (killed / 'checkpoints' / '3').is_dir():
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  _, err = procs[0].communicate(timeout=120)
  assert procs[0].returncode != 0 and time.time() - killed_at < 60
  assert 'another task died' in err or 'stopped sending heartbeats' in err, err[-3000:]
  procs[1].wait()

  logs = _run_two_processes(killed, tfds_dir, total_steps=9)
  for log in logs:
    assert re.search(r'Resumed from .* at step [36]', log)
  got = _losses(killed)
  assert sorted(got) == list(range(1, 10)) and got == _losses(straight)  # bit for bit
  assert json.loads((killed / 'config.json').read_text())['total_steps'] == 9
