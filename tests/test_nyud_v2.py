"""Tests of the NYUD-v2 builder (data_builders/nyud_v2), every config, on fake downloads.

The fakes (tests/fakes.py) reproduce the on-disk formats of docs/datasets_metrics.md §2 and
§6.2; the expected labels are written out by hand from the patterns they draw.
"""

import logging

import ml_collections
import numpy as np
import pytest
import scipy.io
import tensorflow_datasets as tfds

from data_builders import manual_data
from data_builders.nyud_v2 import nyud_v2_dataset_builder as nyud
from mtl_jax import input_pipeline
import fakes


def _build(config, manual_dir, data_dir):
  builder = tfds.builder(f'nyud_v2/{config}', data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))


def _read(config, data_dir, split):
  ds = tfds.data_source(f'nyud_v2/{config}', split=split, data_dir=data_dir)
  return [ds[i] for i in range(len(ds))]


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """{config: TFDS data dir} with every config built from its fake download."""
  root = tmp_path_factory.mktemp('nyud')
  fakes.write_nyud(root / 'invpt', 'invpt')
  fakes.write_nyud(root / 'nyud_mt', 'nyud_mt')
  fakes.write_nyud(root / 'nyud_mt_mm', 'nyud_mt', depth_unit=0.001)
  fakes.write_labeled_mat(root / 'labeled_mat')
  for config in ('invpt', 'nyud_mt', 'nyud_mt_mm', 'labeled_mat'):
    _build(config, root / config, root / 'tfds')
  return root / 'tfds'


def test_shipped_split_and_class_mapping():
  assert len(nyud.TEST_IDS) == 654 and nyud.TEST_IDS[:3] == ('0001', '0002', '0009')
  assert nyud.TEST_IDS[-1] == '1449'
  lut = nyud.CLASS_MAPPING_40
  assert lut.shape == (895,) and lut[0] == 255 and lut[1:].max() == 39
  # By hand from classMapping40.mat: 1 book -> 40 otherprop, 4 -> 22 ceiling, 11 floor -> 2.
  assert (lut[1], lut[4], lut[11]) == (39, 21, 1)


@pytest.mark.slow
@pytest.mark.parametrize('config', ['invpt', 'nyud_mt', 'nyud_mt_mm'])
def test_folder_layouts(built, config):
  for split, ids in (('train', fakes.NYUD_TRAIN), ('validation', fakes.NYUD_VAL)):
    examples = _read(config, built, split)
    assert [ex['id'].decode() for ex in examples] == list(ids)
  ex = _read(config, built, 'train')[1]  # '0004', the 41 x 29 frame
  assert {k: (v.shape, v.dtype) for k, v in ex.items() if k != 'id'} == {
      'image': ((41, 29, 3), np.uint8), 'semseg': ((41, 29, 1), np.uint8),
      'depth': ((41, 29, 1), np.float32), 'normals': ((41, 29, 3), np.float32),
      'edge': ((41, 29, 1), np.uint8)}
  ex = _read(config, built, 'validation')[0]  # '0001', 37 x 53
  # Segmentation PNG columns 0 | 1 | 40 | 20 -> 255 | 0 | 39 | 19.
  np.testing.assert_array_equal(ex['semseg'][7, [0, 4, 5, 9, 10, 14, 15, 52], 0],
                                [255, 255, 0, 0, 39, 39, 19, 19])
  # Depth in metres (0.5 + 0.1 row + 0.01 col), 0 on the two top rows, whatever the file unit.
  np.testing.assert_allclose(ex['depth'][[0, 1, 2, 5, 36], [0, 9, 0, 7, 52], 0],
                             [0, 0, 0.7, 1.07, 4.62], rtol=1e-6)
  normals = {'invpt': [1 / 255, -1, 1], 'nyud_mt': [0.6, -0.8, 0.0]}  # PNG (128, 0, 255) / .npy
  np.testing.assert_allclose(ex['normals'][20, 30], normals.get(config, normals['nyud_mt']),
                             atol=1e-7)
  edge = ex['edge'][..., 0]
  assert edge.sum() == 2 * 17 + 2 * 13  # the outline of rows 5..19 x cols 3..19
  assert edge[5, 3:20].all() and edge[19, 3:20].all() and edge[5:20, 3].all()
  assert edge[5:20, 19].all() and not edge[6:19, 4:19].any()
  if config == 'invpt':  # lossless PNG
    np.testing.assert_array_equal(ex['image'], fakes.gradient_image(37, 53))
  else:  # the JPEG, as PIL reads it
    jpeg = built.parent / config / 'NYUD_MT' / 'images' / '0001.jpg'
    np.testing.assert_array_equal(ex['image'], fakes.pil_rgb(jpeg))


@pytest.mark.slow
def test_labeled_mat(built):
  examples = {ex['id'].decode(): ex for split in ('train', 'validation')
              for ex in _read('labeled_mat', built, split)}
  # No splits.mat: the shipped test ids (0001, 0002, 0009, ...) that exist among 5 frames.
  assert [ex['id'].decode() for ex in _read('labeled_mat', built, 'validation')] == ['0001', '0002']
  assert sorted(examples) == ['0001', '0002', '0003', '0004', '0005']
  ex = examples['0003']
  assert 'normals' not in ex
  expected_image = fakes.gradient_image(37, 53)
  expected_image[..., 2] = 2
  np.testing.assert_array_equal(ex['image'], expected_image)  # MATLAB's transposed storage undone
  # Raw labels 4 (-> NYU-40 22 -> 21), 11 floor (-> 1), 0 unlabelled (-> 255), 1 book (-> 39).
  np.testing.assert_array_equal(ex['semseg'][[10, 10, 20, 30, 30], [10, 25, 45, 5, 45], 0],
                                [21, 21, 1, 255, 39])
  np.testing.assert_allclose(ex['depth'][[0, 5, 36], [0, 7, 52], 0], [2, 3.07, 6.62], rtol=1e-6)
  edge = ex['edge'][..., 0]
  # The two instances of label 4 (cols 5..19 and 20..34, rows 5..14) meet between cols 19 and
  # 20: the thinned boundary keeps one of the two columns on every inner row.
  for row in range(6, 14):
    assert edge[row, 19] + edge[row, 20] == 1, row
    assert edge[row, 4] + edge[row, 5] == 1 and edge[row, 34] + edge[row, 35] == 1, row
  assert not edge[7:13, 7:18].any() and not edge[17:23].any()  # inside regions: nothing
  assert edge[24:26, 0:9].any(axis=0).all()  # the top of the unlabelled block


def test_labeled_mat_splits_mat(tmp_path):
  scipy.io.savemat(tmp_path / 'splits.mat', {'trainNdxs': np.array([[1], [3], [4]], np.uint16),
                                             'testNdxs': np.array([[2], [5]], np.uint16)})
  assert nyud.labeled_mat_splits(tmp_path, 5) == {'train': [0, 2, 3], 'validation': [1, 4]}
  with pytest.raises(manual_data.ManualDataError, match='frame numbers \\[5\\]'):
    nyud.labeled_mat_splits(tmp_path, 4)


def test_depth_unit_and_missing_files_are_clear_errors(tmp_path):
  fakes.write_nyud(tmp_path / 'mm', 'nyud_mt', depth_unit=0.001)
  with pytest.raises(manual_data.ManualDataError, match='(?s)depth/0003.npy: depth up to .*'
                     '--config=nyud_mt_mm'):
    _build('nyud_mt', tmp_path / 'mm', tmp_path / 'tfds')
  # The InvPT config on the NYUD_MT layout: one error listing every missing file.
  fakes.write_nyud(tmp_path / 'mt', 'nyud_mt')
  (tmp_path / 'mt' / 'NYUDv2').symlink_to(tmp_path / 'mt' / 'NYUD_MT')
  with pytest.raises(manual_data.ManualDataError) as error:
    _build('invpt', tmp_path / 'mt', tmp_path / 'tfds')
  message = str(error.value)
  assert message.startswith('15 file(s) of NYUD-v2 (invpt)')  # images, normals, edge x 5 ids
  assert 'images/0003.png' in message and '--config=nyud_mt' in message


def test_all_zero_edges_warn(tmp_path, caplog):
  base = fakes.write_nyud(tmp_path / 'manual', 'nyud_mt')
  for path in (base / 'edge').iterdir():
    np.save(path, np.zeros((37, 53), np.float32))
  with caplog.at_level(logging.WARNING):
    _build('nyud_mt', tmp_path / 'manual', tmp_path / 'tfds')
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("every edge map of split 'validation' is empty" in w for w in warnings), warnings
  assert any("split 'train' has 3 examples, the published split has 795" in w for w in warnings)


def test_not_built_error_names_config_and_manual_dir(tmp_path):
  cfg = ml_collections.ConfigDict(dict(name='nyud_v2/nyud_mt', data_dir=str(tmp_path),
                                       build_if_missing=False))
  with pytest.raises(input_pipeline.DatasetNotBuiltError) as error:
    input_pipeline.open_data_source(cfg, 'validation')
  assert ('`python -m data_builders.build data_builders/nyud_v2 --config=nyud_mt '
          f'--data_dir={tmp_path} --file_format=array_record --manual_dir=<directory holding the '
          'downloaded archive>`') in str(error.value)
