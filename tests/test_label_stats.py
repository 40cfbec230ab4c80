"""Tests of `python -m mtl_jax.tools.label_stats` (per-task label statistics of a split)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import ROOT, launch_env, smoke_config
from mtl_jax import tasks as tasks_lib
from mtl_jax.tools import label_stats


def test_summarize_hand_made_labels():
  """Two 2 x 3 examples with every kind of odd value; counts written out by hand."""
  tasks = tasks_lib.get_tasks('semseg,human_parts,normals,depth', 'synthetic_scenes')
  zero = np.zeros((2, 3, 1), np.uint8)
  normals = np.full((2, 3, 3), 0.6, np.float32)
  normals[0, 0] = 0  # zero vector: ignored by AddIgnoreRegions
  normals[1, 2] = (0.0, 0.0, 1.0)
  source = [
      {'image': np.zeros((2, 3, 3), np.uint8),
       'semseg': np.array([[0, 0, 255], [3, 30, 20]], np.uint8)[..., None],
       'human_parts': zero,  # no parts: the whole map becomes ignore
       'normals': normals,
       'depth': np.array([[0, 1.5, 2.5], [np.nan, 90, 2.0]], np.float32)[..., None]},
      {'image': np.zeros((4, 1, 3), np.uint8),
       'semseg': np.array([[1], [1], [1], [1]], np.uint8)[..., None],
       'human_parts': np.array([[0], [2], [6], [255]], np.uint8)[..., None],
       'normals': np.full((4, 1, 3), 0.6, np.float32),
       'depth': np.full((4, 1, 1), 4.0, np.float32)},
  ]
  stats = label_stats.summarize(source, tasks, 2)
  assert stats['examples'] == 2 and stats['sizes'] == {(2, 3): 1, (4, 1): 1}
  semseg = stats['semseg']
  assert semseg['pixels'] == 10 and semseg['ignore'] == 1 and semseg['all_ignore_examples'] == 0
  assert {v: int(c) for v, c in enumerate(semseg['histogram']) if c} == {
      0: 2, 1: 4, 3: 1, 20: 1, 30: 1, 255: 1}
  parts = stats['human_parts']
  assert parts['ignore'] == 6 + 1 and parts['all_ignore_examples'] == 1
  n = stats['normals']
  assert n['pixels'] == 10 and n['ignore'] == 1
  np.testing.assert_allclose([n['norm_min'], n['norm_max']], [1.0, np.sqrt(3 * 0.36)])
  np.testing.assert_allclose(n['channel_min'], [0, 0, 0.6])
  d = stats['depth']
  assert (d['valid'], d['non_finite'], d['beyond_cap']) == (8, 1, 1)
  np.testing.assert_allclose([d['min'], d['max'], d['sum']], [1.5, 90, 1.5 + 2.5 + 90 + 2 + 16])
  report = label_stats.format_report(stats, 'hand-made')
  assert report.splitlines()[0] == ('hand-made: 2 examples, image sizes (H x W) 2..4 x 1..3, '
                                    '2 distinct')
  assert ('semseg (7 classes): 10 px, ignore (255) 10.00%, values 0..30, outside 0..6: 2 px '
          '(values [20, 30]), maps fully ignored: 0 / 2 examples') in report
  assert '  class %: 0: 22.22  1: 44.44  3: 11.11  20: 11.11  30: 11.11' in report
  assert ('depth: 10 px, invalid (<= 0) 20.00%, non-finite 1 px, valid 1.5000..90.0000 m '
          '(mean 14.0000), >= 80 m: 1 px') in report


def test_compute_on_the_synthetic_dataset(tfds_dir):
  config = smoke_config(tfds_dir)
  stats = label_stats.compute(config, 'train', max_examples=6)
  source = tfds.data_source('synthetic_scenes/tiny', split='train', data_dir=tfds_dir)
  examples = [source[i] for i in range(6)]
  assert stats['examples'] == 6 and stats['sizes'] == {(24, 32): 6}
  semseg = np.stack([ex['semseg'] for ex in examples])
  np.testing.assert_array_equal(stats['semseg']['histogram'],
                                np.bincount(semseg.ravel(), minlength=256))
  # synthetic_scenes README: every pixel labelled; parts all zero (-> ignored) without a figure
  # (class 6); depth > 0 everywhere; unit normals.
  assert stats['semseg']['ignore'] == 0 and stats['semseg']['pixels'] == 6 * 24 * 32
  no_figure = sum(not (ex['semseg'] == 6).any() for ex in examples)
  assert stats['human_parts']['all_ignore_examples'] == no_figure
  assert stats['human_parts']['ignore'] == no_figure * 24 * 32
  assert stats['depth']['valid'] == 6 * 24 * 32 and stats['depth']['min'] > 0
  assert stats['normals']['ignore'] == 0
  np.testing.assert_allclose([stats['normals']['norm_min'], stats['normals']['norm_max']], 1,
                             atol=1e-5)
  assert set(np.nonzero(stats['edge']['histogram'])[0]) == {0, 1}


@pytest.mark.slow
def test_cli(tfds_dir):
  out = subprocess.run(
      [sys.executable, '-m', 'mtl_jax.tools.label_stats',
       f'--config={os.path.join(ROOT, "configs", "demo.py")}:smoke',
       '--config.dataset.name=synthetic_scenes/tiny', f'--config.dataset.data_dir={tfds_dir}',
       '--config.tasks=semseg,depth', '--split=validation', '--max_examples=3'],
      cwd=ROOT, env=launch_env(1), capture_output=True, text=True, check=True, timeout=300)
  lines = out.stdout.splitlines()
  assert lines[0].startswith('synthetic_scenes/tiny validation: 3 examples, image sizes (H x W) '
                             '24..24 x 32..32'), out.stdout
  assert lines[1].startswith('semseg (7 classes): 2304 px, ignore (255) 0.00%')
  assert lines[3].startswith('depth: 2304 px, invalid (<= 0) 0.00%, non-finite 0 px, valid ')
  assert len(lines) == 4
