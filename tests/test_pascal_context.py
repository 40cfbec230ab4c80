"""Tests of the PASCAL-Context builder (data_builders/pascal_context) on the fake download.

The fake (tests/fakes.py) reproduces the on-disk formats of docs/datasets_metrics.md §6.2; the
expected labels below are written out by hand from the patterns it draws (§1.2 decoding).
"""

import logging
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import scipy.ndimage
from skimage import morphology
import tensorflow_datasets as tfds

from conftest import ROOT, launch_env
from data_builders import manual_data
from data_builders.pascal_context import pascal_context_dataset_builder as pc
from mtl_jax import input_pipeline
from mtl_jax import tasks as tasks_lib
from mtl_jax import transforms
import fakes

# docs/datasets_metrics.md Appendix A, copied by hand.
APPENDIX_A = """
3 4 6 9 10 11 13 15 17 18 22 23 29 30 33 34 36 37 38 39 41 43 46 49 50 51 53 55 56 59 61 62 65 66 68
69 72 73 78 83 84 85 87 88 95 96 101 104 105 107 111 113 115 122 124 135 141 142 143 146 150 154 157
158 159 165 172 174 181 183 184 191 193 195 197 199 202 213 215 216 219 220 223 225 228 230 232 233
238 239 242 243 246 250 251 252 255 260 261 263 269 272 273 275 281 283 284 285 286 287 288 290 291
292 293 295 304 307 309 310 314 315 319 323 329 330 331 336 342 345 349 350 351 352 355 357 368 370
371 374 379 380 383 384 397 401 403 405 407 408 411 412 413 414 417 419 421 423 427 429 430 432 440
441 442 443 444 446 454 457"""


def _build(manual_dir, data_dir):
  builder = tfds.builder('pascal_context', data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """The fake PASCALContext/ folder built into a TFDS data dir."""
  root = tmp_path_factory.mktemp('pascal')
  fakes.write_pascal_context(root / 'manual')
  _build(root / 'manual', root / 'tfds')
  return root / 'tfds'


def _examples(data_dir, split):
  ds = tfds.data_source('pascal_context', split=split, data_dir=data_dir)
  return {ex['id'].decode(): ex for ex in (ds[i] for i in range(len(ds)))}


@pytest.fixture(scope='module')
def examples(data_dir):
  return {**_examples(data_dir, 'train'), **_examples(data_dir, 'validation')}


def test_shipped_class_lists_and_subset():
  assert len(pc.NORMALS_VALID_CLASSES) == 170
  assert pc.NORMALS_VALID_CLASSES == {int(v) for v in APPENDIX_A.split()}
  assert len(pc.TEST_NEW_IDS) == 2498 == len(set(pc.TEST_NEW_IDS))
  assert pc.TEST_NEW_IDS[:2] == ('2008_000003', '2008_000007')


@pytest.mark.slow
def test_splits_ids_and_features(data_dir):
  for split, ids in (('train', fakes.PASCAL_TRAIN), ('validation', fakes.PASCAL_VAL),
                     ('test_new', ('2008_000003', '2008_000007'))):  # val ids in test_new.txt
    ds = tfds.data_source('pascal_context', split=split, data_dir=data_dir)
    assert [ds[i]['id'].decode() for i in range(len(ds))] == list(ids)
  ex = _examples(data_dir, 'train')['2008_000015']  # the 41 x 29 image
  expected = {'image': ((41, 29, 3), np.uint8), 'semseg': ((41, 29, 1), np.uint8),
              'human_parts': ((41, 29, 1), np.uint8), 'sal': ((41, 29, 1), np.uint8),
              'normals': ((41, 29, 3), np.float32), 'edge': ((41, 29, 1), np.uint8),
              'label_map': ((41, 29), np.uint16)}
  assert {k: (v.shape, v.dtype) for k, v in ex.items() if k != 'id'} == expected


@pytest.mark.slow
def test_image_is_the_jpeg_as_pil_reads_it(data_dir, examples):
  for image_id, ex in examples.items():
    jpeg = data_dir.parent / 'manual' / 'PASCALContext' / 'JPEGImages' / f'{image_id}.jpg'
    np.testing.assert_array_equal(ex['image'], fakes.pil_rgb(jpeg))
    h, w = fakes.PASCAL_SIZES[image_id]
    assert np.abs(ex['image'].astype(int) - fakes.gradient_image(h, w)).mean() < 2


@pytest.mark.slow
def test_semseg_prefers_voc12(examples):
  a, b = (5, 6), (20, 20)  # a pixel of rectangle A, of rectangle B
  for image_id in ('2008_000008', '2008_000003'):  # VOC12 palette PNG present
    assert examples[image_id]['semseg'][a] == 15 and examples[image_id]['semseg'][b] == 255
  for image_id in ('2008_000019', '2008_000002', '2008_000007'):  # pascal-context fallback
    assert examples[image_id]['semseg'][a] == 9 and examples[image_id]['semseg'][b] == 4
  assert examples['2008_000019']['semseg'][0, 0] == 0


@pytest.mark.slow
def test_human_parts_grouping_and_overwrites(examples):
  expected = np.zeros((37, 53), np.uint8)
  expected[2:8, 30:36] = 1  # head
  expected[6:14, 30:36] = 2  # torso, drawn after head
  expected[14:16, 40:44] = 4  # lhand
  expected[30:34, 30:34] = 6  # rfoot
  expected[14:18, 42:48] = 3  # luarm of the second person, drawn last
  np.testing.assert_array_equal(examples['2008_000008']['human_parts'][..., 0], expected)
  expected = np.zeros((37, 53), np.uint8)
  expected[2:8, 30:36] = 1  # hair
  expected[6:14, 30:36] = 2  # neck
  expected[14:16, 40:44] = 4  # rlarm
  expected[30:34, 30:34] = 5  # ruleg
  np.testing.assert_array_equal(examples['2008_000003']['human_parts'][..., 0], expected)
  # Person without parts, dog only, person of zero area, cat: all zero, which the pipeline's
  # AddIgnoreRegions turns into an ignored map.
  tasks = tasks_lib.get_tasks('human_parts', 'pascal_context')
  for image_id in ('2008_000015', '2008_000019', '2008_000002', '2008_000007'):
    assert not examples[image_id]['human_parts'].any(), image_id
    sample = transforms.add_ignore_regions(transforms.select(examples[image_id], tasks))
    assert np.all(sample['human_parts'] == 255)


@pytest.mark.slow
def test_saliency_threshold(examples):
  sal = examples['2008_000008']['sal'][..., 0]
  assert sal.shape == (37, 53) and set(np.unique(sal)) == {0, 1}
  np.testing.assert_array_equal(sal[:, 0:6], 0)  # raw 0 and 127
  np.testing.assert_array_equal(sal[:, 6:], 1)  # raw 128 and 255


@pytest.mark.slow
def test_normals_masked_to_valid_classes(examples):
  n = examples['2008_000003']['normals']
  valid = np.array([1 / 255, -1.0, 1.0], np.float32)  # 2 v / 255 - 1 of (128, 0, 255)
  for pixel in ((5, 6), (4, 21), (31, 5)):  # classes 3, 427 (tvmonitor), 6 (ashtray)
    np.testing.assert_allclose(n[pixel], valid, atol=1e-7)
  for pixel in ((20, 20), (0, 0), (31, 3), (31, 7)):  # classes 1, 0, 5, 7: not valid
    np.testing.assert_array_equal(n[pixel], 0)
  tasks = tasks_lib.get_tasks('normals', 'pascal_context')
  sample = transforms.add_ignore_regions(transforms.select(examples['2008_000003'], tasks))
  np.testing.assert_array_equal(sample['normals'][20, 20], 255)  # masked out -> ignore


@pytest.mark.slow
def test_edges_laplacian_then_thin(examples):
  label_map = fakes.pascal_label_map(37, 53)
  np.testing.assert_array_equal(examples['2008_000008']['label_map'], label_map)
  edge = examples['2008_000008']['edge'][..., 0]
  # Independently: Laplacian kernel [[0,1,0],[1,-4,1],[0,1,0]] with mirror (REFLECT_101) border.
  kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float64)
  laplacian = scipy.ndimage.convolve(label_map.astype(np.float64), kernel, mode='mirror')
  np.testing.assert_array_equal(edge, morphology.thin(laplacian != 0))
  # By hand: the stripes 5 | 6 | 7: the Laplacian of the middle pixel is 5 + 7 - 2 x 6 = 0.
  np.testing.assert_array_equal(edge[31, 1:9], [1, 0, 0, 1, 0, 1, 0, 1])
  # Rectangle B (rows 16..25, cols 16..25): one 1-px line on each side of every inner row.
  for row in range(17, 25):
    assert list(np.nonzero(edge[row, 13:29])[0] + 13) == [15, 25], row
  assert edge[16, 16:25].all() and edge[26, 17:25].all()
  assert not edge[18:24, 17:24].any() and not edge[14:16].any()


@pytest.mark.slow
def test_build_from_archive_and_split_warnings(tmp_path, examples, caplog):
  folder = fakes.write_pascal_context(tmp_path / 'tree', folder='PASCAL_MT')
  (tmp_path / 'manual').mkdir()
  fakes.tar_gz(folder, tmp_path / 'manual' / 'PASCAL_MT.tgz')
  with caplog.at_level(logging.INFO):
    _build(tmp_path / 'manual', tmp_path / 'tfds')
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  for split, size, published in (('train', 3, 4998), ('validation', 3, 5105),
                                 ('test_new', 2, 2498)):
    assert any(f"split '{split}' has {size} examples, the published split has {published}" in w
               for w in warnings), warnings
  from_archive = _examples(tmp_path / 'tfds', 'validation')
  assert sorted(from_archive) == sorted(fakes.PASCAL_VAL)
  for name in ('image', 'semseg', 'human_parts', 'normals', 'edge'):
    np.testing.assert_array_equal(from_archive['2008_000003'][name],
                                  examples['2008_000003'][name])


def test_missing_and_corrupt_files_are_one_clear_error(tmp_path):
  base = fakes.write_pascal_context(tmp_path / 'manual')
  (base / 'sal_distill' / '2008_000019.png').unlink()
  (base / 'semseg' / 'pascal-context' / '2008_000002.png').unlink()  # it has no VOC12 file
  with pytest.raises(manual_data.ManualDataError) as error:
    _build(tmp_path / 'manual', tmp_path / 'tfds')
  message = str(error.value)
  assert message.startswith('2 file(s) of PASCAL-Context')
  assert 'sal_distill/2008_000019.png' in message
  assert 'semseg/pascal-context/2008_000002.png' in message
  assert not (tmp_path / 'tfds' / 'pascal_context' / '1.0.0').exists()

  shutil.rmtree(tmp_path / 'manual')
  base = fakes.write_pascal_context(tmp_path / 'manual')
  (base / 'human_parts' / '2008_000015.mat').write_bytes(b'not a mat file')
  with pytest.raises(manual_data.ManualDataError, match='cannot decode .*human_parts/2008_000015'):
    _build(tmp_path / 'manual', tmp_path / 'tfds')


def test_manual_dir_without_the_dataset_shows_the_instructions(tmp_path):
  (tmp_path / 'manual').mkdir()
  with pytest.raises(AssertionError, match='(?s)is empty.*PASCAL_MT.tgz'):  # TFDS' own check
    _build(tmp_path / 'manual', tmp_path / 'tfds')
  (tmp_path / 'manual' / 'notes.txt').write_text('something else')
  with pytest.raises(manual_data.ManualDataError, match='(?s)no dataset found.*PASCAL_MT.tgz'):
    _build(tmp_path / 'manual', tmp_path / 'tfds')


def test_not_built_error_names_the_build_command(tmp_path):
  cfg = ml_collections.ConfigDict(dict(name='pascal_context', data_dir=str(tmp_path),
                                       build_if_missing=False))
  with pytest.raises(input_pipeline.DatasetNotBuiltError) as error:
    input_pipeline.open_data_source(cfg, 'train')
  assert (f'`python -m data_builders.build data_builders/pascal_context --data_dir={tmp_path} '
          '--file_format=array_record --manual_dir=<directory holding the downloaded archive>`'
          in str(error.value))
  assert 'build_if_missing' not in str(error.value)


@pytest.mark.parametrize('config_file, builder', [('mlore_pascal.py', 'pascal_context'),
                                                  ('mlore_nyud.py', 'nyud_v2')])
@pytest.mark.slow
def test_launch_without_the_dataset_prints_the_build_command(tmp_path, config_file, builder):
  """The user's main job before the data is built: one error line with the exact build command."""
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch.py'),
       f'--config={os.path.join(ROOT, "configs", config_file)}', f'--workdir={tmp_path / "wd"}',
       f'--config.dataset.data_dir={tmp_path / "tfds"}'],
      cwd=ROOT, env=launch_env(1), capture_output=True, text=True)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and (
      f'python -m data_builders.build data_builders/{builder}') in last, last
  assert '--manual_dir=<directory holding the downloaded archive>' in last
  assert not (tmp_path / 'wd').exists()
