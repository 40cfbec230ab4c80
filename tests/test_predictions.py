"""Per-example evaluators (mtl_jax/evaluators): predictions export
(``config.save_predictions``, the references' saved layout) and boundary odsF
(``config.eval_boundary``), on the synthetic `tiny` dataset (24x32 images, 4 validation)."""

import numpy as np
from PIL import Image
import pytest
import scipy.io

from conftest import smoke_config
from mtl_jax import boundary
from mtl_jax import input_pipeline
from mtl_jax import tasks as tasks_lib
from mtl_jax import train
from mtl_jax import transforms
from mtl_jax.evaluators import boundary as boundary_evaluator
from mtl_jax.evaluators import predictions
from mtl_jax.tools import eval_boundary

ORIGINAL = (24, 32)


@pytest.mark.slow
def test_eval_saves_predictions_and_scores_boundaries(tfds_dir, tmp_path):
  """An eval pass with ``save_predictions`` and ``eval_boundary`` on padded inputs: one file
  per image and task at the original size, and the in-training odsF equals the boundary tool's
  on the saved edge PNGs. (`launch.py --mode=eval` runs the same `Trainer.evaluate`:
  tests/test_train.py::test_init_from_and_eval_mode.)"""
  config = smoke_config(tfds_dir, save_predictions=True, eval_boundary=True,
                        eval_boundary_workers=1, eval_protocol='mtlora')
  config.input.crop_size = (32, 40)  # centred padding of 8 rows and columns (patch size 8)
  workdir = tmp_path / 'eval'
  trainer = train.Trainer(config, workdir)
  eval_iter, _ = input_pipeline.make_eval_iterator(config, trainer.tasks, 'validation',
                                                   source=trainer.eval_source)
  metrics, _ = trainer.evaluate(trainer.init_state(), eval_iter)

  source = input_pipeline.open_data_source(config.dataset, 'validation')
  ids = {source[i]['id'].decode() for i in range(len(source))}
  assert len(ids) == 4
  for name, task in trainer.tasks.items():
    folder = workdir / 'predictions' / name
    suffix = '.mat' if name == 'depth' else '.png'
    assert {p.name for p in folder.iterdir()} == {i + suffix for i in ids}, name
    for path in folder.iterdir():
      if name == 'depth':
        depth = scipy.io.loadmat(path)['depth']
        assert depth.shape == ORIGINAL and depth.dtype == np.float32 and depth.min() >= 0
        continue
      with Image.open(path) as image:
        assert image.size == ORIGINAL[::-1], (path, image.size)
        assert image.mode == ('RGB' if name == 'normals' else 'L'), (path, image.mode)
        if task.kind == 'segmentation':
          assert np.asarray(image).max() < task.num_classes

  # Metrics: the MTLoRA protocol's keys plus the boundary scores.
  assert {'sal/beta_maxf', 'sal/miou', 'normals/mean_v2', 'edge/odsF', 'edge/oisF',
          'edge/ap'} <= set(metrics)
  assert 'sal/maxf_correct' not in metrics
  # The boundary tool's reading of the saved PNGs against the TFDS ground truth, id by id.
  items = eval_boundary.tfds_items(workdir / 'predictions' / 'edge', source)
  tool = boundary.evaluate(items, tasks_lib.DATASETS['synthetic_scenes'].edge_max_dist)
  for key in ('odsF', 'oisF', 'ap'):
    assert metrics[f'edge/{key}'] == pytest.approx(tool[key], abs=1e-9), key


def test_to_original_size_inverts_the_eval_padding():
  tasks = tasks_lib.get_tasks(['semseg', 'edge'], 'pascal_context')
  rng = np.random.RandomState(0)
  sample = {'image': rng.rand(5, 7, 3).astype(np.float32),
            'semseg': rng.randint(0, 21, (5, 7, 1)).astype(np.uint8),
            'edge': rng.randint(0, 2, (5, 7, 1)).astype(np.uint8)}
  for crop in ((5, 7), (8, 8), (6, 10)):
    padded = transforms.pad(sample, crop, tasks)
    for key, value in sample.items():
      np.testing.assert_array_equal(
          predictions.to_original_size(padded[key], (5, 7), 'mlore'), value)


def test_to_original_size_resizes_back_for_mtlora():
  logits = np.zeros((8, 8, 1), np.float32)
  logits[:, 4:] = 1.0
  out = predictions.to_original_size(logits, (6, 12), 'mtlora')
  assert out.shape == (6, 12, 1)
  np.testing.assert_array_equal(out[:, :5, 0], 0.0)
  np.testing.assert_array_equal(out[:, 7:, 0], 1.0)


def test_encode_prediction_follows_the_reference_savers():
  tasks = tasks_lib.get_tasks(['semseg', 'sal', 'normals', 'edge', 'depth'], 'synthetic_scenes')
  semseg = np.zeros((1, 2, 7), np.float32)
  semseg[0, 0, 3], semseg[0, 1, 6] = 1, 1
  enc = lambda name, x, convention='mlore': predictions.encode_prediction(tasks[name], x,
                                                                         convention)
  np.testing.assert_array_equal(enc('semseg', semseg), [[3, 6]])
  sal = np.array([[[0.0, 0.0], [0.0, np.log(3.0)]]], np.float32)  # softmax[1] = 0.5, 0.75
  np.testing.assert_array_equal(enc('sal', sal), [[127, 191]])
  sigmoid_task = tasks_lib.get_tasks(['sal'], 'synthetic_scenes', 'mtlora')['sal']
  np.testing.assert_array_equal(
      predictions.encode_prediction(sigmoid_task, sal[..., 1:], 'mtlora'), [[127, 191]])
  normals = np.array([[[0, 0, 2], [-3, 0, 0]]], np.float32)
  np.testing.assert_array_equal(enc('normals', normals), [[[127, 127, 255], [0, 127, 127]]])
  edge = np.array([[[-30.0], [0.0], [3.0]]], np.float32)  # 255 sigmoid: 0, 127.5, 242.9
  np.testing.assert_array_equal(enc('edge', edge), boundary.to_png(edge[..., 0]))
  np.testing.assert_array_equal(enc('edge', edge), [[0, 127, 242]])
  depth = np.array([[[-1.0], [2.5]]], np.float32)
  np.testing.assert_array_equal(enc('depth', depth), [[0.0, 2.5]])
  np.testing.assert_array_equal(enc('depth', depth, 'mtlora'), [[-1.0, 2.5]])


def test_boundary_counts_are_summed_exactly_over_hosts(monkeypatch):
  """Counts travel as int32 halves through process_allgather; sums beyond 2^31 stay exact."""
  counts = np.array([[3 * 2 ** 31 + 5, 7], [0, 2 ** 24 - 1]], np.int64)
  monkeypatch.setattr(boundary_evaluator.jax, 'process_count', lambda: 3)
  monkeypatch.setattr(boundary_evaluator.multihost_utils, 'process_allgather',
                      lambda x: np.stack([x, x, x]) if x.dtype == np.int32 else None)
  np.testing.assert_array_equal(boundary_evaluator.sum_over_hosts(counts), 3 * counts)
