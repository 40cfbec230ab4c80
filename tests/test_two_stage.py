"""Two-stage training (docs/methods.md §6): stage 1 trains the shared LoRA with the task LoRA
frozen, stage 2 starts from stage 1's checkpoint and trains the task LoRA with the shared LoRA
frozen; which leaves move in each stage, and what the optimizer state and schedule carry over."""

import jax
import numpy as np
import pytest

from configs import mtlora_pascal
from mtl_jax import ConfigError
from mtl_jax import checkpoint
from mtl_jax import input_pipeline
from mtl_jax import sharding
from mtl_jax import train

DEVICES = jax.devices()[:4]  # the smoke batch of 4


def _config(tfds_dir, recipe, **overrides):
  c = mtlora_pascal.get_config(f'smoke,recipe={recipe},tasks=semseg+sal')
  c.dataset.update(data_dir=tfds_dir, build_if_missing=False)
  c.update(overrides)
  return c


def _flat(tree) -> dict[str, np.ndarray]:
  return {sharding.path_str(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def _leaves(workdir, config):
  """{path: array} of every parameter (trainable or frozen) and optimizer-state leaf of the
  latest checkpoint of `workdir`."""
  trainer = train.Trainer(config, workdir, DEVICES)
  ckpt = checkpoint.Checkpointer(workdir / 'checkpoints')
  data = input_pipeline.make_train_iterator(config, trainer.tasks, source=trainer.train_source)
  state = trainer.restore(ckpt, ckpt.latest_step(), data)
  ckpt.close()
  return {**_flat(state.params), **_flat(state.frozen)}, _flat(state.opt_state), int(state.step)


def _moved(before, after, kind):
  return {p for p in before if kind in p and not np.array_equal(before[p], after[p])}


@pytest.mark.slow
def test_two_stages_train_the_shared_then_the_task_lora(tfds_dir, tmp_path):
  stage1 = _config(tfds_dir, 'freeze_ts_lora')
  init = train.Trainer(stage1, tmp_path / 'init', DEVICES).init_state()
  initial = {**_flat(init.params), **_flat(init.frozen)}
  train.train_and_evaluate(stage1, tmp_path / 'stage1', DEVICES)
  after1, opt1, step1 = _leaves(tmp_path / 'stage1', stage1)
  shared = {p for p in initial if '/lora_shared_' in p}
  task = {p for p in initial if '/lora_tasks_' in p}
  assert shared and task and step1 == 6
  # The shared LoRA moves (all of it but the last block's fc2 B, whose shared stream feeds nothing:
  # the decoders read the task streams); no task LoRA does.
  moved = _moved(initial, after1, '/lora_')
  assert moved <= shared and len(moved) >= len(shared) - 1
  assert not _moved(initial, after1, '/lora_tasks_')  # TS-LoRA frozen at its init (B = 0)
  assert _moved(initial, after1, 'decoder/')  # the decoders train in both stages

  stage2 = _config(tfds_dir, 'freeze_ta_lora', init_from=str(tmp_path / 'stage1'),
                   init_opt_state=True)
  bad = _config(tfds_dir, 'freeze_ta_lora', init_from=str(tmp_path / 'stage1'),
                init_opt_state=True, init_schedule='continue')  # stage 1 already used all 6 steps
  with pytest.raises(ConfigError, match='raise total_steps'):
    train.train_and_evaluate(bad, tmp_path / 'bad', DEVICES)
  assert not (tmp_path / 'bad').exists()

  trainer2 = train.Trainer(stage2, tmp_path / 'stage2', DEVICES)
  start = trainer2.load_optimizer_state(trainer2.init_state(), stage2.init_from)
  start_opt = _flat(start.opt_state)
  carried = [p for p in start_opt if '/mu/decoder/' in p]
  assert carried and all(np.array_equal(start_opt[p], opt1[p]) for p in carried)
  assert all(not np.any(v) for p, v in start_opt.items() if '/mu/' in p and '/lora_tasks_' in p)
  counts = {p: int(v) for p, v in start_opt.items() if p.endswith('count')}
  assert sorted(counts.values()) == [0, 6] and int(start.step) == 0  # Adam's count, schedule's

  train.train_and_evaluate(stage2, tmp_path / 'stage2', DEVICES)
  after2, _, step2 = _leaves(tmp_path / 'stage2', stage2)
  assert step2 == 6
  assert not _moved(after1, after2, '/lora_shared_')  # TA-LoRA frozen at its stage-1 values
  moved = _moved(after1, after2, '/lora_')
  assert moved <= task and {p for p in task if p.endswith('_B')} <= moved
  assert _moved(after1, after2, 'decoder/')


def test_continuing_the_schedule_needs_steps_left(tfds_dir, tmp_path):
  config = _config(tfds_dir, 'freeze_ta_lora', init_opt_state=True)
  with pytest.raises(ConfigError, match='init_opt_state needs --config.init_from'):
    train.Trainer(config, tmp_path, DEVICES)
  with pytest.raises(ConfigError, match="use 'restart' or 'continue'"):
    train.Trainer(_config(tfds_dir, 'mtlora', init_schedule='keep'), tmp_path, DEVICES)
