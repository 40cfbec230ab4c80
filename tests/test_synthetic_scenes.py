"""Tests of the embedded demo dataset `synthetic_scenes` (data_builders/synthetic_scenes)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

import data_builders.synthetic_scenes  # noqa: F401  (registers the builder)
from data_builders.synthetic_scenes import render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAPS = {  # name: (dtype, channels)
    'image': (np.uint8, 3), 'semseg': (np.uint8, 1), 'human_parts': (np.uint8, 1),
    'sal': (np.uint8, 1), 'edge': (np.uint8, 1), 'normals': (np.float32, 3),
    'depth': (np.float32, 1),
}
ROOM_FACES = {0: (0, -1), 1: (0, 1), 4: (2, -1), 5: (2, 1)}  # wall face -> (axis, side of room)


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  tfds.builder('synthetic_scenes/tiny', data_dir=data_dir).download_and_prepare()
  return data_dir


@pytest.fixture(scope='module')
def scenes():
  return [render.render_example(0, 'train', i, 64, 80) for i in range(24)]


def _backproject(rendered):
  """Camera-frame 3D points (H, W, 3) from depth and the intrinsics (OpenCV pixel convention)."""
  k = rendered.camera.intrinsics
  z = rendered.maps['depth'][..., 0].astype(np.float64)
  v, u = np.meshgrid(np.arange(z.shape[0]), np.arange(z.shape[1]), indexing='ij')
  return np.stack([(u - k[0, 2]) * z / k[0, 0], -(v - k[1, 2]) * z / k[1, 1], -z], axis=-1)


def test_configs_and_registration(tmp_path):
  builder = tfds.builder('synthetic_scenes', data_dir=tmp_path)
  assert builder.builder_config.name == 'small'
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  sizes = {c.name: (c.height, c.width, c.num_train, c.num_validation)
           for c in type(builder).BUILDER_CONFIGS}
  assert sizes == {'small': (64, 80, 2000, 250), 'large': (128, 160, 10000, 1000),
                   'tiny': (24, 32, 8, 4), 'ci': (32, 40, 512, 96)}
  assert builder.info.features['normals'].shape == (None, None, 3)


def test_tiny_build_reads_back_exactly(tiny_dir):
  files = sorted(p.name for p in (tiny_dir / 'synthetic_scenes' / 'tiny' / '1.0.0').iterdir())
  assert 'synthetic_scenes-train.array_record-00000-of-00001' in files
  for split, count in (('train', 8), ('validation', 4)):
    ds = tfds.data_source('synthetic_scenes/tiny', split=split, data_dir=tiny_dir)
    assert len(ds) == count
    for i in (0, count - 1):
      example = ds[i]
      assert example['id'] == f'{split}_{i:06d}'.encode()
      expected = render.render_example(0, split, i, 24, 32).maps
      for name, (dtype, channels) in MAPS.items():
        assert example[name].dtype == dtype and example[name].shape == (24, 32, channels), name
        np.testing.assert_array_equal(example[name], expected[name], err_msg=name)


def test_label_invariants(scenes):
  with_figure, facing_z = 0, []
  for r in scenes:
    m = r.maps
    sem, parts, sal, edge = (m[k][..., 0] for k in ('semseg', 'human_parts', 'sal', 'edge'))
    assert sem.max() < len(render.CLASS_NAMES) and parts.max() < len(render.PART_NAMES)
    np.testing.assert_array_equal(sal, sem >= render.SPHERE)
    np.testing.assert_array_equal(parts > 0, sem == render.FIGURE)
    with_figure += bool((sem == render.FIGURE).any())
    assert m['depth'].min() > 0
    normals = m['normals'].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1.0, atol=1e-5)
    rays = r.camera.pixel_rays()
    assert (np.sum(normals * -rays, -1) > 0).all()  # every labelled surface faces the camera
    facing_z.append(normals[..., 2] > 0)
    # Edge rule: (i, j) is an edge iff its right/bottom neighbour has another class or instance
    # (or is an occluding primitive of the same object), so each boundary is 1 px thick.
    assert set(np.unique(edge)) == {0, 1}
    changed = np.zeros(sem.shape, bool)
    for key in (sem, r.instance, r.surface):
      changed[:, :-1] |= key[:, :-1] != key[:, 1:]
      changed[:-1, :] |= key[:-1, :] != key[1:, :]
    class_change = np.zeros(sem.shape, bool)
    class_change[:, :-1] |= sem[:, :-1] != sem[:, 1:]
    class_change[:-1, :] |= sem[:-1, :] != sem[1:, :]
    assert class_change.any() and edge[class_change].all()
    assert not edge[~changed].any()
  assert 0 < with_figure < len(scenes)  # some images have no figure (all-zero part map)
  assert np.mean(facing_z) > 0.95  # z < 0 only on surfaces seen obliquely (render.py docstring)


def test_edge_rule_hand_computed():
  sem = np.zeros((5, 6), np.int32)
  sem[1:3, 2:4] = render.BOX
  instance = (sem > 0).astype(np.int32)
  surface = np.where(sem > 0, 7, 2)
  depth = np.full((5, 6), 4.0)
  expected = np.array([[0, 0, 1, 1, 0, 0],
                       [0, 1, 0, 1, 0, 0],
                       [0, 1, 1, 1, 0, 0],
                       [0, 0, 0, 0, 0, 0],
                       [0, 0, 0, 0, 0, 0]], np.uint8)
  np.testing.assert_array_equal(render.edge_map(sem, instance, surface, depth), expected)
  # Two primitives of one object: an edge only where the depth steps by more than DEPTH_JUMP.
  sem, instance = np.full((1, 3), render.FIGURE), np.ones((1, 3), np.int32)
  surface = np.array([[7, 8, 9]])
  depth = np.array([[4.0, 4.0 * (1 + render.DEPTH_JUMP / 2), 5.0]])
  np.testing.assert_array_equal(render.edge_map(sem, instance, surface, depth), [[0, 1, 0]])


def test_floor_and_wall_are_planes_matching_normals_and_pose(scenes):
  walls_checked = 0
  for r in scenes:
    points, normals = _backproject(r), r.maps['normals'].astype(np.float64)
    rot, pos = r.camera.rotation, r.camera.position
    floor = r.maps['semseg'][..., 0] == render.FLOOR
    n_floor = normals[floor]
    np.testing.assert_allclose(n_floor, np.broadcast_to(rot.T @ [0, 1, 0], n_floor.shape),
                               atol=1e-6)
    # The floor points lie on one plane: normal = the labelled normal, distance = camera height.
    p = points[floor]
    fitted = np.linalg.svd(p - p.mean(0), full_matrices=False)[2][-1]
    assert abs(fitted @ n_floor[0]) > 1 - 1e-6
    np.testing.assert_allclose(p @ n_floor[0], -pos[1], atol=1e-4)
    # The most visible wall: same check, distance from the pose and the room size.
    face, count = max(((f, (r.surface == f).sum()) for f in ROOM_FACES), key=lambda fc: fc[1])
    if count < 30:
      continue
    walls_checked += 1
    axis, side = ROOM_FACES[face]
    wall = r.surface == face
    n_wall = normals[wall][0]
    np.testing.assert_allclose(normals[wall], np.broadcast_to(n_wall, (count, 3)), atol=1e-6)
    np.testing.assert_allclose(rot @ n_wall, -side * np.eye(3)[axis], atol=1e-6)  # inward
    half = r.room[axis]
    np.testing.assert_allclose(points[wall] @ n_wall, -(half - side * pos[axis]), atol=1e-4)
  assert walls_checked >= 5


def test_depth_and_normals_agree_on_curved_primitives(scenes):
  # For neighbouring pixels on one sphere/cylinder/box face, the chord between their 3D points is
  # orthogonal to the mean of their normals (exact for spheres, cylinders and planes).
  for r in scenes:
    points, normals = _backproject(r), r.maps['normals'].astype(np.float64)
    sem = r.maps['semseg'][..., 0]
    for a, b in ((np.s_[:, :-1], np.s_[:, 1:]), (np.s_[:-1, :], np.s_[1:, :])):
      same = ((r.surface[a] == r.surface[b]) & (sem[a] != render.CONE)
              & (np.sum(normals[a] * normals[b], -1) > 0.5))  # not across a box/cap crease
      chord, mean_n = (points[b] - points[a])[same], (normals[a] + normals[b])[same]
      cos = np.sum(chord * mean_n, -1) / (np.linalg.norm(chord, axis=-1)
                                          * np.linalg.norm(mean_n, axis=-1))
      assert np.abs(cos).max() < 1e-3


def test_determinism():
  first = [render.render_example(3, 'train', i, 24, 32).maps for i in range(4)]
  alone = render.render_example(3, 'train', 2, 24, 32).maps
  for name in MAPS:
    np.testing.assert_array_equal(alone[name], first[2][name])
  other_split = render.render_example(3, 'validation', 2, 24, 32).maps
  other_seed = render.render_example(4, 'train', 2, 24, 32).maps
  assert not np.array_equal(other_split['image'], alone['image'])
  assert not np.array_equal(other_seed['image'], alone['image'])
  with pytest.raises(ValueError, match='unknown split'):
    render.example_rng(0, 'test', 0)


def test_figure_fraction():
  has_figure = [(render.render_example(0, 'train', i, 24, 32).maps['semseg'] == render.FIGURE).any()
                for i in range(200)]
  assert 0.45 < np.mean(has_figure) < 0.7


_NO_TF_SCRIPT = textwrap.dedent("""
    import importlib.util
    import sys

    class HideTensorFlow:
      '''Meta-path wrapper under which `tensorflow` looks not installed.'''

      def __init__(self, finder):
        self._finder = finder

      def __getattr__(self, name):
        return getattr(self._finder, name)

      def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] == 'tensorflow':
          return None
        return self._finder.find_spec(name, path, target)

    sys.meta_path[:] = [HideTensorFlow(f) for f in sys.meta_path]
    assert importlib.util.find_spec('tensorflow') is None
    import tensorflow_datasets as tfds
    import data_builders.synthetic_scenes

    data_dir = sys.argv[1]
    tfds.builder('synthetic_scenes/tiny', data_dir=data_dir).download_and_prepare()
    ds = tfds.data_source('synthetic_scenes/tiny', split='validation', data_dir=data_dir)
    assert len(ds) == 4 and ds[3]['normals'].shape == (24, 32, 3)
    assert 'tensorflow' not in sys.modules
    print('built and read without TensorFlow')
""")


@pytest.mark.slow
def test_build_and_read_without_tensorflow_is_bit_identical(tiny_dir, tmp_path):
  result = subprocess.run([sys.executable, '-c', _NO_TF_SCRIPT, str(tmp_path)], cwd=ROOT,
                          env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'built and read without TensorFlow' in result.stdout
  for split in ('train', 'validation'):
    ours = tfds.data_source('synthetic_scenes/tiny', split=split, data_dir=tiny_dir)
    theirs = tfds.data_source('synthetic_scenes/tiny', split=split, data_dir=tmp_path)
    assert len(ours) == len(theirs)
    for i in range(len(ours)):
      for name in (*MAPS, 'id'):
        np.testing.assert_array_equal(ours[i][name], theirs[i][name], err_msg=f'{split} {i}')


@pytest.mark.slow
def test_tfds_build_command(tmp_path):
  """`python -m data_builders.build` (TFDS's `tfds build`) writes array_record by default."""
  subprocess.run([sys.executable, '-m', 'data_builders.build', 'data_builders/synthetic_scenes',
                  '--config=tiny', f'--data_dir={tmp_path}'], cwd=ROOT, check=True,
                 capture_output=True)
  files = sorted(os.listdir(tmp_path / 'synthetic_scenes' / 'tiny' / '1.0.0'))
  assert 'synthetic_scenes-train.array_record-00000-of-00001' in files
  source = tfds.data_source('synthetic_scenes/tiny', split='validation', data_dir=tmp_path)
  assert len(source) == 4
