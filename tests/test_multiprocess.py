"""Two JAX processes on 127.0.0.1 (2 CPU devices each): the multi-host path of launch.py.

Each process reads its own shard of the data; the step runs on the global 4-device mesh; only
process 0 writes reports; the checkpoint holds both processes' iterator positions and a restart of
both processes resumes from it.
"""

import json
import re
import subprocess

import portpicker
import pytest

from conftest import ROOT, launch_args, launch_env
from mtl_jax import reporting


def _run_two_processes(workdir, tfds_dir, total_steps):
  port = portpicker.pick_unused_port()
  procs = [subprocess.Popen(
      launch_args(workdir, tfds_dir, '--jax_distributed', f'--coordinator_address=127.0.0.1:{port}',
                  '--num_processes=2', f'--process_id={i}', f'--config.total_steps={total_steps}',
                  '--config.log_every_steps=1', '--config.checkpoint_every_steps=3'),
      cwd=ROOT, env=launch_env(2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  logs = [p.communicate(timeout=600)[1] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return logs


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tfds_dir, tmp_path):
  logs = _run_two_processes(tmp_path, tfds_dir, total_steps=6)
  for i, log in enumerate(logs):
    assert f'JAX process {i}/2, 2 local / 4 global devices' in log
  lines = reporting.read_metrics(tmp_path)
  steps = [l['step'] for l in lines]
  assert steps == sorted(set(steps)) and {1, 6} <= set(steps), 'process 0 alone writes'
  data_dir = tmp_path / 'checkpoints' / '6' / 'data'
  assert sorted(p.name for p in data_dir.iterdir() if p.suffix == '.json') == [
      'process_0-of-2.json', 'process_1-of-2.json']
  # Each process reports the same (global) loss.
  loss_lines = [re.findall(r'step (\d+)/6 \| loss ([\d.]+)', log) for log in logs]
  assert loss_lines[0] == loss_lines[1] and len(loss_lines[0]) == 6

  logs = _run_two_processes(tmp_path, tfds_dir, total_steps=9)
  for log in logs:
    assert re.search(r'Resumed from .* at step 6', log)
  lines = reporting.read_metrics(tmp_path)
  assert [l['step'] for l in lines if 'train/loss' in l] == list(range(1, 10))
  assert json.loads((tmp_path / 'config.json').read_text())['total_steps'] == 9
