"""Gradient-conflict diagnostics (mtl_jax/methods/conflict.py): the fork's conflict ratio against
a loop of separate backward passes, and conflict_ratio.txt in the fork's format."""

import re

from flax import nnx
import jax
import numpy as np
import pytest

from conftest import smoke_config
from mtl_jax import ConfigError
from mtl_jax import input_pipeline
from mtl_jax import losses
from mtl_jax import reporting
from mtl_jax import sharding
from mtl_jax import train
from mtl_jax.methods import conflict

TASKS = ('semseg', 'normals', 'depth')


def _fork_conflict_ratio(grads: list[np.ndarray]) -> float:
  """The fork's two passes over flattened per-task gradients (docs/methods.md §5)."""
  total = sum(grads)
  ratios = []
  for g in grads:
    sq = float(g @ g)
    d = float(g @ total) - sq
    others = float(total @ total) - sq - 2 * d
    if sq <= 1e-12 or others <= 1e-12:
      ratios.append(0.0)
      continue
    proj = d * d / (others + 1e-12)
    ratios.append(np.sqrt(max(0.0, sq - proj) / (sq + 1e-12)))
  return float(np.mean(ratios)), ratios


def test_conflict_ratio_equals_a_loop_of_backward_passes(tfds_dir, tmp_path):
  config = smoke_config(tfds_dir, tasks=','.join(TASKS), frozen=(r'^backbone/patch_embed/',))
  trainer = train.Trainer(config, tmp_path, jax.devices()[:1])
  state = trainer.init_state()
  batch = sharding.global_batch(next(input_pipeline.make_train_iterator(
      config, trainer.tasks, source=trainer.train_source)), trainer.mesh)
  got = jax.device_get(trainer.conflict_step(state, trainer.rest, batch))

  key = jax.random.fold_in(jax.random.key(config.seed), 0)  # the step's key (Method.step_key)
  def task_loss(params, task):
    model = nnx.merge(trainer.train_graph, params, state.frozen, state.batch_stats, trainer.rest)
    if trainer.rng_streams:
      nnx.reseed(model, **{s: jax.random.fold_in(key, i)
                           for i, s in enumerate(trainer.rng_streams)})
    preds, _ = model(batch['image'])
    return config.loss_weights[task] * losses.task_loss(
        trainer.tasks[task], preds[task], batch[task], convention=config.convention,
        edge_w=config.edge_w)

  flat = []
  for task in TASKS:  # one backward pass per task; shared = trainable and not under heads/
    g = jax.jit(jax.grad(task_loss), static_argnums=1)(state.params, task)
    leaves = [np.ravel(x) for p, x in jax.tree_util.tree_flatten_with_path(g)[0]
              if not sharding.path_str(p).startswith('heads/')]
    flat.append(np.concatenate(leaves).astype(np.float64))
  want_cr, want_ratios = _fork_conflict_ratio(flat)
  np.testing.assert_allclose(got['conflict/cr'], want_cr, rtol=1e-5)
  for task, want in zip(TASKS, want_ratios):
    np.testing.assert_allclose(got[f'conflict/ratio/{task}'], want, rtol=1e-5, atol=1e-7)
  cos = flat[0] @ flat[2] / np.linalg.norm(flat[0]) / np.linalg.norm(flat[2])
  # A cosine near 0 from float32 dot products: float32 rounding, ~1e-6 absolute.
  np.testing.assert_allclose(got['conflict/cos/semseg_depth'], cos, rtol=1e-5, atol=3e-6)
  assert 0 < want_cr < 1


def test_conflict_scalars_of_orthogonal_and_opposed_gradients():
  tasks = ('a', 'b', 'c')
  g = np.diag([1.0, 4.0, 9.0])  # orthogonal: each task is fully orthogonal to the others' sum
  out = jax.device_get(conflict.conflict_scalars(g, tasks))
  np.testing.assert_allclose(out['conflict/cr'], 1.0, rtol=1e-6)
  assert out['conflict/cos/a_b'] == 0
  v = np.array([[1.0, 0.0], [-1.0, 0.0], [2.0, 0.0]])  # collinear: no orthogonal part
  out = jax.device_get(conflict.conflict_scalars(v @ v.T, tasks))
  np.testing.assert_allclose(out['conflict/cr'], 0.0, atol=1e-6)
  np.testing.assert_allclose(out['conflict/cos/a_b'], -1.0, rtol=1e-6)


@pytest.mark.slow
def test_training_writes_conflict_metrics_and_the_forks_file(tfds_dir, tmp_path):
  config = smoke_config(tfds_dir, tasks='semseg,depth',
                        conflict={'every_steps': 2}, steps_per_epoch=4)
  train.train_and_evaluate(config, tmp_path)
  measured = {m['step']: m for m in reporting.read_metrics(tmp_path) if 'conflict/cr' in m}
  assert sorted(measured) == [2, 4, 6]
  assert all('conflict/cos/semseg_depth' in m and 'train/loss' in m for m in measured.values())
  lines = (tmp_path / conflict.FILE).read_text().splitlines()
  assert lines[:-1] == [f'epoch={(s - 1) // 4}, batch={(s - 1) % 4}, global_step={s}, '
                        f'cr={measured[s]["conflict/cr"]:.6f}' for s in (2, 4, 6)]
  mean = np.mean([m['conflict/cr'] for m in measured.values()])
  assert re.fullmatch(r'global_average_cr: \d\.\d{6}', lines[-1])
  assert lines[-1] == f'global_average_cr: {mean:.6f}'


def test_conflict_needs_two_tasks(tfds_dir, tmp_path):
  with pytest.raises(ConfigError, match='at least two tasks'):
    train.Trainer(smoke_config(tfds_dir, tasks='semseg', conflict={'every_steps': 5}), tmp_path)
