"""Data augmentation of one example (numpy + OpenCV), as in the reference code.

Two chains, selected by ``config.input.augment`` (mtl_jax/input_pipeline.py):

* ``'mlore'``: the MLoRE / InvPT chains of docs/mlore.md §5.1 and docs/datasets_metrics.md §3.1
  (`MLoRE:data/transforms.py`, "same transform as ATRC"), `TrainTransform` / `EvalTransform`:

  - train: `random_scaling` -> `random_crop` -> `random_horizontal_flip` ->
    `photometric_distortion` -> `normalize` -> `pad` -> `add_ignore_regions`;
  - eval: `normalize` -> `pad` -> `add_ignore_regions` (no resize, no flip).

* ``'mtlora'``: the MTLoRA / MTI-Net chains of docs/mtlora.md §8 and docs/datasets_metrics.md
  §3.2 (`MTLoRA:data/mtl_ds.py:get_transformations`), `MTLoRATrainTransform` /
  `MTLoRAEvalTransform`:

  - train: `random_horizontal_flip` -> `random_scale_and_rotate` -> `fixed_resize` ->
    `add_ignore_regions` -> `wrap_to_uint8` -> `normalize`;
  - eval: `fixed_resize` -> `add_ignore_regions` -> `wrap_to_uint8` -> `normalize`, so metrics
    are computed on labels resized to the crop size, as the reference does.

  Invalid depth stays 0 (the mtl_jax format) where MTLoRA's `AddIgnoreRegions` writes 255: the
  same pixels are ignored.

A *sample* is a dict with ``'image'`` (float32 (H, W, 3) in [0, 255] until `normalize`) and one
label map per task, keyed by task name, in the mtl_jax label format (mtl_jax/tasks.py). Normals
are x right, y up, z towards the camera. Every random primitive takes a ``np.random.Generator``;
the references draw the same quantities from python's `random` / numpy's global generator.
"""

from typing import Mapping

import cv2
import grain
import numpy as np

from mtl_jax import ConfigError
from mtl_jax import tasks as tasks_lib

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_PAD_VALUE = 0.0  # in normalised space
# MTLoRA / MTI-Net interpolation flags (`FLAGVALS`, docs/datasets_metrics.md §3.2); every key not
# listed (semseg, human_parts, sal, edge, depth) is nearest.
MTLORA_INTERPOLATION = {'image': cv2.INTER_CUBIC, 'normals': cv2.INTER_CUBIC}
Sample = dict[str, np.ndarray]


def select(element: Mapping[str, object], tasks: Mapping[str, tasks_lib.Task]) -> Sample:
  """Keeps the image (as float32, like the reference loader) and the labels of `tasks`.

  Labels become (H, W, C) arrays of the task's label dtype; other keys (e.g. ``'id'``) are dropped.
  """
  missing = [k for k in ('image', *tasks) if k not in element]
  if missing:
    raise KeyError(f'example has no {missing} (it has {sorted(element)}); the dataset does not '
                   'label these tasks (fix --config.tasks or --config.dataset.name)')
  sample = {'image': np.array(element['image'], np.float32)}  # a copy
  for name, task in tasks.items():
    label = np.asarray(element[name])
    sample[name] = (label[..., None] if label.ndim == 2 else label).astype(task.label_dtype)
  return sample


# ------------------------------------------------------------------------------------------------
# Geometric primitives.

def resize(sample: Sample, size: tuple[int, int],
           interpolation: Mapping[str, int] | None = None) -> Sample:
  """Resizes every map to `size` (H, W) with cv2.

  `interpolation` maps keys to cv2 flags; by default the image is bilinear and every label nearest
  (`RandomScaling.mode`, docs/datasets_metrics.md §3.1 step 1).
  """
  interpolation = interpolation or {}
  out = {}
  for key, x in sample.items():
    flag = interpolation.get(key, cv2.INTER_LINEAR if key == 'image' else cv2.INTER_NEAREST)
    y = cv2.resize(x, (size[1], size[0]), interpolation=flag)  # cv2 takes (W, H)
    out[key] = y[..., None] if y.ndim == 2 else y
  return out


def random_scaling(sample: Sample, rng: np.random.Generator,
                   scale_range: tuple[float, float] = (0.5, 2.0)) -> Sample:
  """`RandomScaling`: s ~ U(scale_range), size (int(H*s), int(W*s)), depth / s; no-op if s == 1."""
  s = rng.uniform(*scale_range)
  if s == 1.0:
    return sample
  h, w = sample['image'].shape[:2]
  out = resize(sample, (int(h * s), int(w * s)))
  if 'depth' in out:
    out['depth'] = out['depth'] / np.float32(s)  # 0 (invalid) stays 0
  return out


def crop(sample: Sample, loc: tuple[int, int, int, int] | None) -> Sample:
  """Slices [top:bottom, left:right] of every map (clipped at the border); None keeps all."""
  if loc is None:
    return sample
  top, bottom, left, right = loc
  return {k: x[top:bottom, left:right] for k, x in sample.items()}


def _crop_loc(rng: np.random.Generator, shape, size) -> tuple[int, int, int, int] | None:
  """`RandomCrop.get_random_crop_loc`: offsets uniform in [0, max(dim - crop, 0)] (inclusive)."""
  (h, w), (ch, cw) = shape[:2], size
  if (h, w) == (ch, cw):
    return None
  top = int(rng.integers(0, max(h - ch, 0) + 1))
  left = int(rng.integers(0, max(w - cw, 0) + 1))
  return top, top + ch, left, left + cw


def _class_balanced(semseg: np.ndarray, cat_max_ratio: float) -> bool:
  """>= 2 non-ignore classes and the largest covers < cat_max_ratio of the non-ignore pixels."""
  labels, counts = np.unique(semseg, return_counts=True)
  counts = counts[labels != tasks_lib.IGNORE_INDEX]
  return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def random_crop(sample: Sample, rng: np.random.Generator, size: tuple[int, int],
                cat_max_ratio: float = 0.75) -> Sample:
  """`RandomCrop(size, cat_max_ratio)` (docs/datasets_metrics.md §3.1 step 2).

  Maps smaller than `size` are not padded here. With cat_max_ratio < 1 and a semseg label, a crop
  failing `_class_balanced` is redrawn up to 10 times; as in the reference, the 10th redraw is kept
  without being checked.
  """
  loc = _crop_loc(rng, sample['image'].shape, size)
  if cat_max_ratio < 1.0 and 'semseg' in sample:
    for _ in range(10):
      if _class_balanced(crop({'semseg': sample['semseg']}, loc)['semseg'], cat_max_ratio):
        break
      loc = _crop_loc(rng, sample['image'].shape, size)
  return crop(sample, loc)


def hflip(sample: Sample) -> Sample:
  """Mirrors every map left-right; the normals' x component (channel 0) changes sign."""
  out = {k: x[:, ::-1].copy() for k, x in sample.items()}
  if 'normals' in out:
    out['normals'][..., 0] *= -1
  return out


def random_horizontal_flip(sample: Sample, rng: np.random.Generator, p: float = 0.5) -> Sample:
  """`RandomHorizontalFlip(p)` (docs/datasets_metrics.md §3.1 step 3)."""
  return hflip(sample) if rng.random() < p else sample


def rotate_normals(normals: np.ndarray, angle: float) -> np.ndarray:
  """Rotates the in-plane part (x, y) of normals counter-clockwise by `angle` degrees.

  This is the normals' share of an image rotation by `angle` with `cv2.getRotationMatrix2D`
  (counter-clockwise on screen) for x-right / y-up normals. The reference
  (`ScaleNRotate`: (n0, n1) = r (sin, cos)(atan2(n0, n1) + angle)) rotates clockwise, which is
  right for y-down normals only; mtl_jax normals are y up, so the sign is flipped here
  (docs/datasets_metrics.md §3.2).
  """
  a = np.deg2rad(angle)
  c, s = np.float32(np.cos(a)), np.float32(np.sin(a))
  out = normals.copy()
  out[..., 0] = c * normals[..., 0] - s * normals[..., 1]
  out[..., 1] = s * normals[..., 0] + c * normals[..., 1]
  return out


def renormalize_normals(normals: np.ndarray) -> np.ndarray:
  """n / (|n| + eps) as `FixedResize` (float64 eps): unit vectors, zero vectors stay zero."""
  norm = np.linalg.norm(normals, axis=-1, keepdims=True)
  return (normals / (norm + np.finfo(np.float64).eps)).astype(np.float32)


def scale_and_rotate(sample: Sample, angle: float, scale: float) -> Sample:
  """`ScaleNRotate` by `angle` degrees (counter-clockwise) and `scale` (docs/mtlora.md §8).

  Every map is warped with `cv2.warpAffine(getRotationMatrix2D((W / 2, H / 2), angle, scale))`
  onto a canvas of its own size, with `MTLORA_INTERPOLATION`. As in the reference:

  * the centre is (W / 2, H / 2), not ((W - 1) / 2, (H - 1) / 2), so a 90 degree turn of an even
    square is `np.rot90` moved by one pixel;
  * the uncovered border is filled with 0 for every map: image black, normals zero (ignore after
    `add_ignore_regions`), depth 0 (invalid), but semseg / human_parts / sal / edge 0 is a real
    class (background), not the ignore value;
  * normals are rotated in-plane (`rotate_normals`) before the cubic warp; depth is divided by
    `scale`.
  """
  out = {}
  for key, x in sample.items():
    h, w = x.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    if key == 'normals':
      x = rotate_normals(x, angle)
    y = cv2.warpAffine(x, m, (w, h), flags=MTLORA_INTERPOLATION.get(key, cv2.INTER_NEAREST),
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    y = y[..., None] if y.ndim == 2 else y
    if key == 'depth':
      y = y / np.float32(scale)
    out[key] = y
  return out


def random_scale_and_rotate(sample: Sample, rng: np.random.Generator,
                            rotation_range: tuple[float, float] = (-20.0, 20.0),
                            scale_range: tuple[float, float] = (0.75, 1.25),
                            scale_choices: tuple[float, ...] = ()) -> Sample:
  """`ScaleNRotate` with angle ~ U(rotation_range), scale ~ U(scale_range) or from scale_choices.

  PASCAL: rotation (-20, 20), scale (0.75, 1.25); NYUD: rotation (0, 0), scale_choices
  (1.0, 1.2, 1.5) (docs/mtlora.md §8). The reference computes `(hi - lo) * U - (hi - lo) / 2`
  (+ 1 for the scale), i.e. centres the ranges on 0 and 1; that equals U(lo, hi) for its
  symmetric ranges, and U(lo, hi) is used here for any range.
  """
  angle = rng.uniform(*rotation_range)
  if scale_choices:
    scale = scale_choices[int(rng.integers(0, len(scale_choices)))]
  else:
    scale = rng.uniform(*scale_range)
  return scale_and_rotate(sample, angle, scale)


def fixed_resize(sample: Sample, size: tuple[int, int]) -> Sample:
  """`FixedResize(size)`: every map to `size` with `MTLORA_INTERPOLATION`, normals renormalised.

  The aspect ratio is not kept (docs/datasets_metrics.md §3.2).
  """
  out = resize(sample, size, MTLORA_INTERPOLATION)
  if 'normals' in out:
    out['normals'] = renormalize_normals(out['normals'])
  return out


def pad(sample: Sample, size: tuple[int, int], tasks: Mapping[str, tasks_lib.Task]) -> Sample:
  """`PadImage(size)`: centred pad (top/left get delta // 2) with each task's `pad_value`.

  Raises ConfigError for maps larger than `size` (the reference would leave them unpadded, which
  cannot be batched).
  """
  h, w = sample['image'].shape[:2]
  if h > size[0] or w > size[1]:
    raise ConfigError(f'example of size {h}x{w} is larger than config.input.crop_size '
                      f'{tuple(size)}; evaluation does not resize (docs/mlore.md §5.1), so set '
                      'crop_size to at least the largest image size')
  top, left = (size[0] - h) // 2, (size[1] - w) // 2
  out = {}
  for key, x in sample.items():
    value = IMAGE_PAD_VALUE if key == 'image' else tasks[key].pad_value
    y = np.full((*size, x.shape[-1]), value, x.dtype)
    y[top:top + h, left:left + w] = x
    out[key] = y
  return out


# ------------------------------------------------------------------------------------------------
# Image and label value primitives.

def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """x * alpha + beta in float32, clipped to [0, 255], truncated to uint8."""
  return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator,
                           brightness_delta: int = 32,
                           contrast_range: tuple[float, float] = (0.5, 1.5),
                           saturation_range: tuple[float, float] = (0.5, 1.5),
                           hue_delta: int = 18) -> np.ndarray:
  """`PhotoMetricDistortion` on a uint8 RGB image (docs/datasets_metrics.md §3.1 step 4).

  Each step has probability 0.5: brightness + U(±delta); contrast x U(range), first or last (coin
  flip); saturation x U(range) in cv2 HSV; hue + randint(-delta, delta - 1) mod 180. No channel
  swap. Returns uint8.
  """
  img = image
  if rng.random() < 0.5:
    img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
  contrast_first = rng.random() < 0.5

  def contrast(img):
    if rng.random() < 0.5:
      return _convert(img, alpha=rng.uniform(*contrast_range))
    return img

  if contrast_first:
    img = contrast(img)
  if rng.random() < 0.5:  # saturation
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if rng.random() < 0.5:  # hue
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    shift = int(rng.integers(-hue_delta, hue_delta))  # randint(-delta, delta - 1)
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 180
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if not contrast_first:
    img = contrast(img)
  return img


def normalize(image: np.ndarray) -> np.ndarray:
  """`Normalize`: (image / 255 - ImageNet mean) / ImageNet std, float32."""
  mean = np.asarray(IMAGENET_MEAN, np.float32)
  std = np.asarray(IMAGENET_STD, np.float32)
  return (image.astype(np.float32) / np.float32(255.0) - mean) / std


def wrap_to_uint8(image: np.ndarray) -> np.ndarray:
  """The reference's `image.astype(np.uint8)` (MTLoRA `ToTensor`) on a float image, made portable.

  Truncates towards zero and keeps the low 8 bits, so the cubic overshoot *wraps* (-1.5 -> 255,
  256.2 -> 0) instead of clipping: what numpy's cast gives on x86 (out-of-range float -> uint8
  casts are undefined in C and may differ on other CPUs). Reproduced on purpose
  (docs/datasets_metrics.md §3.2).
  """
  return (np.trunc(image).astype(np.int64) & 255).astype(np.uint8)


def add_ignore_regions(sample: Sample) -> Sample:
  """`AddIgnoreRegions`: normals of zero norm -> (255, 255, 255); parts maps in {0, 255} -> 255."""
  out = dict(sample)
  if 'normals' in out:
    n = out['normals']
    norm = np.sqrt(n[..., 0] ** 2 + n[..., 1] ** 2 + n[..., 2] ** 2)  # as the reference
    out['normals'] = np.where((norm == 0)[..., None], np.float32(tasks_lib.IGNORE_INDEX), n)
  if 'human_parts' in out:
    parts = out['human_parts']
    if np.all((parts == 0) | (parts == tasks_lib.IGNORE_INDEX)):
      out['human_parts'] = np.full_like(parts, tasks_lib.IGNORE_INDEX)
  return out


def dummy_example(tasks: Mapping[str, tasks_lib.Task], size: tuple[int, int]) -> Sample:
  """A padding example: zero image, every label ignore/invalid, ``example_valid`` False."""
  ex = {'image': np.zeros((*size, 3), np.float32)}
  for name, task in tasks.items():
    ex[name] = np.full((*size, task.label_channels), task.pad_value, task.label_dtype)
  ex = add_ignore_regions(ex)
  ex['example_valid'] = np.asarray(False)
  return ex


# ------------------------------------------------------------------------------------------------
# Chains, as grain transforms.

class TrainTransform(grain.transforms.RandomMap):
  """The MLoRE / InvPT training chain (docs/mlore.md §5.1), one example at a time."""

  def __init__(self, tasks: Mapping[str, tasks_lib.Task], crop_size: tuple[int, int],
               scale_range: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
               flip: bool = True, photometric: bool = True):
    self.tasks = dict(tasks)
    self.crop_size = tuple(crop_size)
    self.scale_range = tuple(scale_range)
    self.cat_max_ratio = cat_max_ratio
    self.flip = flip
    self.photometric = photometric

  def random_map(self, element, rng: np.random.Generator) -> Sample:
    sample = select(element, self.tasks)
    sample = random_scaling(sample, rng, self.scale_range)
    sample = random_crop(sample, rng, self.crop_size, self.cat_max_ratio)
    if self.flip:
      sample = random_horizontal_flip(sample, rng)
    if self.photometric:
      # The reference truncates the (bilinearly resized, float) image to uint8 here.
      image = photometric_distortion(sample['image'].astype(np.uint8), rng)
      sample['image'] = image.astype(np.float32)
    sample['image'] = normalize(sample['image'])
    sample = add_ignore_regions(pad(sample, self.crop_size, self.tasks))
    sample['example_valid'] = np.asarray(True)
    return sample


class EvalTransform(grain.transforms.Map):
  """The MLoRE / InvPT evaluation chain: normalize, centred pad, ignore regions (§5.1)."""

  def __init__(self, tasks: Mapping[str, tasks_lib.Task], crop_size: tuple[int, int]):
    self.tasks = dict(tasks)
    self.crop_size = tuple(crop_size)

  def map(self, element) -> Sample:
    sample = select(element, self.tasks)
    sample['image'] = normalize(sample['image'])
    sample = add_ignore_regions(pad(sample, self.crop_size, self.tasks))
    sample['example_valid'] = np.asarray(True)
    return sample


class MTLoRATrainTransform(grain.transforms.RandomMap):
  """The MTLoRA / MTI-Net training chain (docs/mtlora.md §8, docs/datasets_metrics.md §3.2)."""

  def __init__(self, tasks: Mapping[str, tasks_lib.Task], crop_size: tuple[int, int],
               rotation_range: tuple[float, float] = (-20.0, 20.0),
               scale_range: tuple[float, float] = (0.75, 1.25),
               scale_choices: tuple[float, ...] = (), flip: bool = True):
    self.tasks = dict(tasks)
    self.crop_size = tuple(crop_size)
    self.rotation_range = tuple(rotation_range)
    self.scale_range = tuple(scale_range)
    self.scale_choices = tuple(scale_choices)
    self.flip = flip

  def random_map(self, element, rng: np.random.Generator) -> Sample:
    sample = select(element, self.tasks)
    if self.flip:
      sample = random_horizontal_flip(sample, rng)
    sample = random_scale_and_rotate(sample, rng, self.rotation_range, self.scale_range,
                                     self.scale_choices)
    sample = add_ignore_regions(fixed_resize(sample, self.crop_size))
    sample['image'] = normalize(wrap_to_uint8(sample['image']))
    sample['example_valid'] = np.asarray(True)
    return sample


class MTLoRAEvalTransform(grain.transforms.Map):
  """The MTLoRA evaluation chain: image *and* labels resized to `crop_size` (§3.2)."""

  def __init__(self, tasks: Mapping[str, tasks_lib.Task], crop_size: tuple[int, int]):
    self.tasks = dict(tasks)
    self.crop_size = tuple(crop_size)

  def map(self, element) -> Sample:
    sample = add_ignore_regions(fixed_resize(select(element, self.tasks), self.crop_size))
    sample['image'] = normalize(wrap_to_uint8(sample['image']))
    sample['example_valid'] = np.asarray(True)
    return sample
