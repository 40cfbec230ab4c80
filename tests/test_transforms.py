"""Tests of mtl_jax/transforms.py (docs/mlore.md §5.1, docs/datasets_metrics.md §3.1)."""

import cv2
import numpy as np
import pytest

from mtl_jax import tasks as tasks_lib
from mtl_jax import transforms

ALL_TASKS = tasks_lib.get_tasks(tasks_lib.DATASETS['synthetic_scenes'].tasks, 'synthetic_scenes')
CROP = (32, 48)


class ScriptedRng:
  """Stands in for np.random.Generator: returns scripted values and records the calls."""

  def __init__(self, random=(), uniform=(), integers=(), default_random=0.99):
    self._random, self._uniform, self._integers = list(random), list(uniform), list(integers)
    self.default_random = default_random
    self.integer_calls = []

  def random(self):
    return self._random.pop(0) if self._random else self.default_random

  def uniform(self, low, high):
    return self._uniform.pop(0)

  def integers(self, low, high):
    self.integer_calls.append((low, high))
    return self._integers.pop(0) if self._integers else low


def make_element(seed=0, shape=(40, 50)):
  """A random example as read from a TFDS source, with every task and an 'id'."""
  r = np.random.default_rng(seed)
  h, w = shape
  normals = r.normal(size=(h, w, 3)).astype(np.float32)
  normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
  normals[:4] = 0  # invalid rows
  semseg = r.integers(0, 7, (h, w, 1), dtype=np.uint8)
  semseg[-3:] = 255
  return {
      'image': r.integers(0, 256, (h, w, 3), dtype=np.uint8),
      'semseg': semseg,
      'human_parts': r.integers(0, 5, (h, w, 1), dtype=np.uint8),
      'sal': r.integers(0, 2, (h, w, 1), dtype=np.uint8),
      'edge': r.integers(0, 2, (h, w, 1), dtype=np.uint8),
      'normals': normals,
      'depth': np.where(r.random((h, w, 1)) < 0.2, 0, r.uniform(0.5, 10, (h, w, 1))
                        ).astype(np.float32),
      'id': b'2008_000001',
  }


def test_select_keeps_configured_tasks_in_label_format():
  tasks = tasks_lib.get_tasks(['semseg', 'depth'], 'synthetic_scenes')
  el = make_element()
  el['depth'] = el['depth'][..., 0]  # (H, W) maps get a channel axis
  s = transforms.select(el, tasks)
  assert sorted(s) == ['depth', 'image', 'semseg']
  assert s['image'].dtype == np.float32 and s['depth'].shape == (40, 50, 1)
  np.testing.assert_array_equal(s['image'], el['image'])
  with pytest.raises(KeyError, match='config.tasks'):
    transforms.select({'image': el['image']}, tasks)


def test_resize_nearest_keeps_label_values_and_matches_pixel_repeat():
  x = np.random.default_rng(0).integers(0, 7, (5, 6, 1), dtype=np.uint8)
  x[0, 0] = 255
  y = transforms.resize({'semseg': x}, (10, 12))['semseg']
  # cv2 INTER_NEAREST at an exact x2 repeats every pixel (dst(i) = src(floor(i / 2))).
  np.testing.assert_array_equal(y, x.repeat(2, 0).repeat(2, 1))
  z = transforms.resize({'semseg': x}, (7, 9))['semseg']
  assert z.shape == (7, 9, 1) and set(np.unique(z)) <= set(np.unique(x))


def test_random_scaling_resizes_every_map_and_divides_depth():
  el = make_element()
  sample = transforms.select(el, ALL_TASKS)
  sample['depth'] = np.where(el['depth'] > 0, 2.0, 0.0).astype(np.float32)
  s = np.random.default_rng(3).uniform(0.5, 2.0)
  out = transforms.random_scaling(sample, np.random.default_rng(3))
  h, w = int(40 * s), int(50 * s)
  assert all(x.shape[:2] == (h, w) for x in out.values())
  np.testing.assert_allclose(np.unique(out['depth']), [0.0, np.float32(2.0) / np.float32(s)])
  # Nearest resize of normals copies whole input vectors (unit or zero).
  norms = np.linalg.norm(out['normals'], axis=-1)
  assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0))
  np.testing.assert_array_equal(out['image'], cv2.resize(sample['image'], (w, h)))
  assert transforms.random_scaling(sample, np.random.default_rng(0), (1.0, 1.0)) is sample


def test_random_crop_takes_a_slice_and_never_pads():
  yy, xx = np.mgrid[:40, :50]
  image = np.stack([yy, xx, np.zeros_like(yy)], -1).astype(np.float32)
  out = transforms.random_crop({'image': image}, np.random.default_rng(1), CROP)
  top, left = int(out['image'][0, 0, 0]), int(out['image'][0, 0, 1])
  assert out['image'].shape == (32, 48, 3) and 0 <= top <= 8 and 0 <= left <= 2
  np.testing.assert_array_equal(out['image'], image[top:top + 32, left:left + 48])
  small = {'image': np.zeros((20, 30, 3), np.float32)}
  assert transforms.random_crop(small, np.random.default_rng(0), CROP)['image'].shape == (20, 30, 3)


def test_random_crop_cat_max_ratio_redraws_and_keeps_the_last_draw():
  image = np.zeros((40, 50, 3), np.float32)
  one_class = {'image': image, 'semseg': np.ones((40, 50, 1), np.uint8)}
  # Never balanced: 1 draw + 10 redraws (two offsets each); the last one is kept unchecked.
  rng = ScriptedRng(integers=[0, 0] * 10 + [5, 1])
  out = transforms.random_crop(one_class, rng, CROP, cat_max_ratio=0.75)
  assert rng.integer_calls == [(0, 9), (0, 3)] * 11
  assert out['image'].shape == (32, 48, 3)
  # Columns 0-9 class 1, 10-24 ignore, 25-49 class 2.
  semseg = np.ones((40, 50, 1), np.uint8)
  semseg[:, 25:] = 2
  semseg[:, 10:25] = 255
  sample = {'image': image, 'semseg': semseg}
  # Left offset 2 -> 8 class-1 vs 25 class-2 columns (25/33 = 0.76, rejected); left 0 -> 10 vs 23
  # (0.70, accepted) on the second draw.
  rng = ScriptedRng(integers=[0, 2, 3, 0, 7, 7])  # (top, left) pairs
  out = transforms.random_crop(sample, rng, CROP, cat_max_ratio=0.75)
  assert len(rng.integer_calls) == 4
  np.testing.assert_array_equal(out['semseg'], semseg[3:35, 0:48])
  # No redraws without semseg or with cat_max_ratio 1.
  for s, ratio in (({'image': image}, 0.75), (one_class, 1.0)):
    rng = ScriptedRng()
    transforms.random_crop(s, rng, CROP, cat_max_ratio=ratio)
    assert len(rng.integer_calls) == 2


def test_flip_mirrors_maps_and_negates_normals_x():
  sample = transforms.select(make_element(), ALL_TASKS)
  flipped = transforms.random_horizontal_flip(sample, ScriptedRng(random=[0.2]))
  for key in ('image', 'semseg', 'depth', 'edge'):
    np.testing.assert_array_equal(flipped[key], sample[key][:, ::-1])
  np.testing.assert_array_equal(flipped['normals'][..., 0], -sample['normals'][:, ::-1, 0])
  np.testing.assert_array_equal(flipped['normals'][..., 1:], sample['normals'][:, ::-1, 1:])
  assert transforms.random_horizontal_flip(sample, ScriptedRng(random=[0.5])) is sample


def test_photometric_identity_when_every_coin_says_no():
  image = np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)
  out = transforms.photometric_distortion(image, ScriptedRng(default_random=0.5))
  np.testing.assert_array_equal(out, image)


def test_photometric_steps_by_hand():
  image = np.array([[[250, 100, 0], [200, 100, 50]]], np.uint8)
  # brightness yes (+10.7, truncated), contrast last, saturation/hue/contrast no.
  out = transforms.photometric_distortion(image, ScriptedRng(random=[0.1, 0.9], uniform=[10.7]))
  np.testing.assert_array_equal(out, [[[255, 110, 10], [210, 110, 60]]])
  # contrast first (x0.5): 250 * 0.5 = 125, 100 * 0.5 = 50, 50 * 0.5 = 25.
  out = transforms.photometric_distortion(image, ScriptedRng(random=[0.9, 0.1, 0.1],
                                                             uniform=[0.5]))
  np.testing.assert_array_equal(out, [[[125, 50, 0], [100, 50, 25]]])
  # saturation x0: grey at the value (max channel).
  out = transforms.photometric_distortion(image, ScriptedRng(random=[0.9, 0.9, 0.1],
                                                             uniform=[0.0]))
  np.testing.assert_array_equal(out, [[[250, 250, 250], [200, 200, 200]]])
  # hue -18 (= -36 degrees) on pure red: H 0 -> 162 (324 deg) -> magenta-ish (255, 0, 153).
  red = np.array([[[255, 0, 0]]], np.uint8)
  out = transforms.photometric_distortion(red, ScriptedRng(random=[0.9, 0.9, 0.9, 0.1],
                                                           integers=[-18]))
  np.testing.assert_allclose(out.astype(int), [[[255, 0, 153]]], atol=1)


def test_photometric_keeps_uint8_range():
  image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  outs = [transforms.photometric_distortion(image, np.random.default_rng(i)) for i in range(20)]
  assert all(o.dtype == np.uint8 and o.shape == image.shape for o in outs)
  assert sum(not np.array_equal(o, image) for o in outs) >= 15  # 1/16 chance of identity each


def test_normalize_by_hand():
  image = np.array([[[0, 255, 255 * 0.406]]], np.float32)
  out = transforms.normalize(image)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0], [-0.485 / 0.229, (1 - 0.456) / 0.224, 0.0], atol=1e-6)


def test_pad_is_centred_with_task_fill_values():
  tasks = tasks_lib.get_tasks(['semseg', 'normals', 'depth'], 'synthetic_scenes')
  sample = {'image': np.ones((5, 7, 3), np.float32), 'semseg': np.zeros((5, 7, 1), np.uint8),
            'normals': np.ones((5, 7, 3), np.float32), 'depth': np.ones((5, 7, 1), np.float32)}
  out = transforms.pad(sample, (8, 12), tasks)
  inside = np.zeros((8, 12), bool)
  inside[1:6, 2:9] = True  # top = 3 // 2, left = 5 // 2
  for key, fill in (('image', 0), ('semseg', 255), ('normals', 0), ('depth', 0)):
    assert out[key].shape[:2] == (8, 12) and out[key].dtype == sample[key].dtype
    assert np.all(out[key][~inside] == fill)
    np.testing.assert_array_equal(out[key][1:6, 2:9], sample[key])
  with pytest.raises(ValueError, match='crop_size'):
    transforms.pad(sample, (4, 12), tasks)


def test_add_ignore_regions():
  normals = np.zeros((2, 2, 3), np.float32)
  normals[0, 0] = (0.6, 0.8, 0.0)
  parts_empty = np.array([[0, 255], [0, 0]], np.uint8)[..., None]
  out = transforms.add_ignore_regions({'normals': normals, 'human_parts': parts_empty})
  np.testing.assert_array_equal(out['normals'][0, 0], normals[0, 0])
  assert np.all(out['normals'].reshape(-1, 3)[1:] == 255)
  assert np.all(out['human_parts'] == 255)
  parts = parts_empty.copy()
  parts[1, 1] = 3
  np.testing.assert_array_equal(transforms.add_ignore_regions({'human_parts': parts})
                                ['human_parts'], parts)


def _check_output(out, size):
  assert sorted(out) == sorted([*ALL_TASKS, 'image', 'example_valid'])
  assert all(out[k].shape[:2] == size for k in out if k != 'example_valid')
  assert out['image'].dtype == np.float32 and np.all(np.isfinite(out['image']))
  assert out['example_valid'].dtype == bool and out['example_valid'].shape == ()
  for name, task in ALL_TASKS.items():
    assert out[name].dtype == task.label_dtype and out[name].shape[-1] == task.label_channels
  assert set(np.unique(out['semseg'])) <= set(range(7)) | {255}
  assert set(np.unique(out['human_parts'])) <= set(range(5)) | {255}
  assert set(np.unique(out['sal'])) <= {0, 1, 255}
  assert set(np.unique(out['edge'])) <= {0, 1, 255}
  ignored = np.all(out['normals'] == 255, axis=-1)
  norms = np.linalg.norm(out['normals'], axis=-1)
  assert np.all(ignored | (np.abs(norms - 1) < 1e-5))
  assert np.all(out['depth'] >= 0)


def test_train_transform_invariants_and_determinism():
  t = transforms.TrainTransform(ALL_TASKS, CROP)
  outs = []
  for seed in range(6):
    out = t.random_map(make_element(seed), np.random.default_rng(seed))
    _check_output(out, CROP)
    assert out['example_valid']
    outs.append(out)
  again = t.random_map(make_element(0), np.random.default_rng(0))
  for k in outs[0]:
    np.testing.assert_array_equal(again[k], outs[0][k])
  other = t.random_map(make_element(0), np.random.default_rng(1))
  assert not np.array_equal(other['image'], outs[0]['image'])


def test_train_transform_without_augmentation_is_crop_normalize():
  t = transforms.TrainTransform(ALL_TASKS, (40, 50), scale_range=(1.0, 1.0), flip=False,
                                photometric=False)
  el = make_element(0)
  out = t.random_map(el, np.random.default_rng(0))
  np.testing.assert_allclose(out['image'], transforms.normalize(el['image']), atol=1e-6)
  np.testing.assert_array_equal(out['semseg'], el['semseg'])
  np.testing.assert_array_equal(out['depth'], el['depth'])


def test_eval_transform_pads_centred_without_resizing():
  el = make_element(0)
  out = transforms.EvalTransform(ALL_TASKS, (48, 56)).map(el)
  _check_output(out, (48, 56))
  np.testing.assert_allclose(out['image'][4:44, 3:53], transforms.normalize(el['image']))
  assert np.all(out['image'][:4] == 0) and np.all(out['semseg'][:, :3] == 255)
  np.testing.assert_array_equal(out['semseg'][4:44, 3:53], el['semseg'])
  assert np.all(out['normals'][:8] == 255)  # 4 zero rows in the data + 4 padded rows
  assert np.all(out['depth'][:4] == 0)


def test_dummy_example_is_all_ignore():
  d = transforms.dummy_example(ALL_TASKS, CROP)
  assert not d['example_valid']
  for name in ('semseg', 'human_parts', 'sal', 'edge', 'normals'):
    assert np.all(d[name] == 255)
  assert np.all(d['depth'] == 0) and np.all(d['image'] == 0)


# ------------------------------------------------------------------------------------------------
# MTLoRA chain (docs/mtlora.md §8, docs/datasets_metrics.md §3.2).

def test_scale_and_rotate_90_degrees_is_rot90_moved_by_one_pixel():
  labels = (np.arange(36, dtype=np.uint8) + 1).reshape(6, 6, 1)
  image = np.repeat(labels, 3, axis=-1).astype(np.float32)
  out = transforms.scale_and_rotate({'image': image, 'semseg': labels}, 90.0, 1.0)
  # cv2's positive angle turns counter-clockwise like np.rot90; the reference's centre (W/2, H/2)
  # (not (W-1)/2) moves the result down by one row and fills the uncovered row with 0.
  expected = np.zeros_like(labels)
  expected[1:] = np.rot90(labels)[:-1]
  np.testing.assert_array_equal(out['semseg'], expected)
  np.testing.assert_array_equal(out['image'], np.repeat(expected, 3, -1))  # cubic, exact here
  drawn = transforms.random_scale_and_rotate({'semseg': labels}, ScriptedRng(uniform=[90.0, 1.0]))
  np.testing.assert_array_equal(drawn['semseg'], expected)
  out = transforms.scale_and_rotate({'semseg': labels}, -90.0, 1.0)
  expected = np.zeros_like(labels)
  expected[:, 1:] = np.rot90(labels, k=-1)[:, :-1]  # clockwise: moved right by one column
  np.testing.assert_array_equal(out['semseg'], expected)


def test_scale_and_rotate_zoom_out_fills_border_with_zero_and_divides_depth():
  h = w = 6
  labels = (np.arange(36, dtype=np.uint8) + 1).reshape(h, w, 1)
  normals = np.zeros((h, w, 3), np.float32)
  normals[..., 2] = 1.0
  sample = {'image': np.full((h, w, 3), 200.0, np.float32), 'semseg': labels,
            'normals': normals, 'depth': np.full((h, w, 1), 3.0, np.float32)}
  out = transforms.scale_and_rotate(sample, 0.0, 0.5)
  # Output pixel j samples source (j - 3) / 0.5 + 3 = 2j - 3: rows/columns 2..4 see 1, 3, 5.
  inside = np.zeros((h, w), bool)
  inside[2:5, 2:5] = True
  np.testing.assert_array_equal(out['semseg'][2:5, 2:5], labels[1::2, 1::2])
  np.testing.assert_array_equal(out['depth'][inside], 6.0)  # depth / scale
  for key in sample:
    assert out[key].shape == sample[key].shape and out[key].dtype == sample[key].dtype
    assert np.all(out[key][~inside] == 0), key  # semseg 0 = background, not ignore
  ignored = transforms.add_ignore_regions(out)
  assert np.all(ignored['normals'][~inside] == 255)
  np.testing.assert_allclose(ignored['normals'][inside], np.broadcast_to([0, 0, 1], (9, 3)))


def test_rotate_normals_by_hand():
  n = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]], np.float32)
  # A counter-clockwise quarter turn: right-facing (x) becomes up-facing (y), up becomes left.
  np.testing.assert_allclose(transforms.rotate_normals(n, 90.0),
                             [[0.0, 1.0, 0.5], [-1.0, 0.0, 0.0]], atol=1e-7)
  np.testing.assert_allclose(transforms.rotate_normals(n, 30.0)[0, :2],
                             [np.sqrt(3) / 2, 0.5], atol=1e-6)


def _height_normals(height):
  """Unit normals (x right, y up, z to the camera) of the surface z = height[row, column]."""
  dh_dv, dh_du = np.gradient(height)
  n = np.stack([-dh_du, dh_dv, np.ones_like(height)], -1)  # d/dy = -d/drow
  return (n / np.linalg.norm(n, axis=-1, keepdims=True)).astype(np.float32)


def _angle_deg(a, b):
  return np.rad2deg(np.arccos(np.clip(np.sum(a * b, -1), -1, 1)))


def test_normals_rotate_with_the_geometry():
  h, w, angle = 48, 56, 30.0

  def height(u, v):  # an off-centre bump on a slope
    return 6.0 * np.exp(-((u - 16) ** 2 + (v - 30) ** 2) / 128.0) + 0.3 * u

  v, u = np.mgrid[:h, :w].astype(np.float64)
  normals = _height_normals(height(u, v))
  # The rotated scene: output pixel p shows the source point M^-1 p (what warpAffine samples).
  inv = cv2.invertAffineTransform(cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0))
  src_u = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2]
  src_v = inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
  expected = _height_normals(height(src_u, src_v))
  valid = (src_u > 3) & (src_u < w - 4) & (src_v > 3) & (src_v < h - 4)
  got = transforms.renormalize_normals(
      transforms.scale_and_rotate({'normals': normals}, angle, 1.0)['normals'])
  error = _angle_deg(got, expected)[valid]
  assert error.max() < 1.5 and error.mean() < 0.2  # finite differences and cubic interpolation
  # The reference's formula (clockwise vector rotation, right for y-down normals) is far off.
  reference = transforms.rotate_normals(normals, -2 * angle)  # undo ours, rotate the other way
  wrong = transforms.renormalize_normals(
      transforms.scale_and_rotate({'normals': reference}, angle, 1.0)['normals'])
  assert _angle_deg(wrong, expected)[valid].mean() > 10.0


def test_random_scale_and_rotate_draws_scale_choices():
  sample = {'depth': np.full((6, 8, 1), 3.0, np.float32)}
  rng = ScriptedRng(uniform=[0.0], integers=[2])
  out = transforms.random_scale_and_rotate(sample, rng, (0.0, 0.0), scale_choices=(1.0, 1.2, 1.5))
  assert rng.integer_calls == [(0, 3)]
  np.testing.assert_allclose(out['depth'], 2.0)  # 3 / 1.5 everywhere: zooming in has no border


def test_fixed_resize_interpolations_and_renormalised_normals():
  sample = transforms.select(make_element(), ALL_TASKS)
  out = transforms.fixed_resize(sample, CROP)
  assert all(x.shape[:2] == CROP for x in out.values())
  np.testing.assert_array_equal(out['image'], cv2.resize(sample['image'], (48, 32),
                                                         interpolation=cv2.INTER_CUBIC))
  nearest = cv2.resize(sample['semseg'], (48, 32), interpolation=cv2.INTER_NEAREST)
  np.testing.assert_array_equal(out['semseg'][..., 0], nearest)
  assert set(np.unique(out['semseg'])) <= set(np.unique(sample['semseg']))
  cubic = cv2.resize(sample['normals'], (48, 32), interpolation=cv2.INTER_CUBIC)
  norms = np.linalg.norm(out['normals'], axis=-1)
  assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0))
  np.testing.assert_allclose(out['normals'] * np.linalg.norm(cubic, axis=-1, keepdims=True),
                             cubic, atol=1e-6)
  # Rows 0-3 of 40 are invalid (zero); the cubic kernel reaches valid row 4 from output row 2.
  assert np.all(norms[:2] == 0) and np.all(norms[2] > 0)


def test_wrap_to_uint8_truncates_and_wraps_like_the_reference_cast():
  x = np.array([-300.7, -256.2, -1.5, -0.7, 0.3, 100.9, 254.99, 255.5, 256.2, 300.1], np.float32)
  np.testing.assert_array_equal(transforms.wrap_to_uint8(x),
                                [212, 0, 255, 0, 0, 100, 254, 255, 0, 44])


def test_mtlora_train_transform_invariants_and_determinism():
  t = transforms.MTLoRATrainTransform(ALL_TASKS, CROP)
  outs = [t.random_map(make_element(seed), np.random.default_rng(seed)) for seed in range(6)]
  for out in outs:
    _check_output(out, CROP)
    assert out['example_valid']
  again = t.random_map(make_element(0), np.random.default_rng(0))
  for k in outs[0]:
    np.testing.assert_array_equal(again[k], outs[0][k])
  other = t.random_map(make_element(0), np.random.default_rng(1))
  assert not np.array_equal(other['image'], outs[0]['image'])


def test_mtlora_train_transform_nyud_scale_choices():
  el = make_element(0)
  el['depth'] = np.full((40, 50, 1), 2.0, np.float32)
  t = transforms.MTLoRATrainTransform(ALL_TASKS, CROP, rotation_range=(0.0, 0.0),
                                      scale_choices=(1.0, 1.2, 1.5))
  depths = set()
  for seed in range(12):
    out = t.random_map(el, np.random.default_rng(seed))
    values = np.unique(out['depth'])
    assert len(values) == 1  # no rotation and zoom-in only: no border
    depths.add(round(float(values[0]), 5))
  assert depths == {2.0, round(2 / 1.2, 5), round(2 / 1.5, 5)}


def test_mtlora_train_transform_without_augmentation_is_resize_normalize():
  t = transforms.MTLoRATrainTransform(ALL_TASKS, (40, 50), rotation_range=(0.0, 0.0),
                                      scale_choices=(1.0,), flip=False)
  el = make_element(0)
  out = t.random_map(el, np.random.default_rng(0))
  np.testing.assert_array_equal(out['image'], transforms.normalize(el['image']))
  np.testing.assert_array_equal(out['semseg'], el['semseg'])
  np.testing.assert_array_equal(out['depth'], el['depth'])
  np.testing.assert_allclose(out['normals'][4:], el['normals'][4:], atol=1e-6)
  assert np.all(out['normals'][:4] == 255)


def test_mtlora_eval_transform_resizes_image_and_labels():
  el = make_element(0)
  out = transforms.MTLoRAEvalTransform(ALL_TASKS, CROP).map(el)
  _check_output(out, CROP)
  image = cv2.resize(el['image'].astype(np.float32), (48, 32), interpolation=cv2.INTER_CUBIC)
  np.testing.assert_array_equal(out['image'],
                                transforms.normalize(transforms.wrap_to_uint8(image)))
  np.testing.assert_array_equal(
      out['semseg'][..., 0], cv2.resize(el['semseg'], (48, 32), interpolation=cv2.INTER_NEAREST))
  assert np.all(out['normals'][:2] == 255)  # rows 0-3 of 40 were invalid (see above)
