"""Writers of tiny fake downloads in the exact on-disk formats of the real datasets.

docs/datasets_metrics.md §6.2: PASCAL-Context MT (`PASCALContext/` = `PASCAL_MT/` layout, with
PASCAL-Part `.mat` structs and `LabelMap` `.mat` files written by scipy.io.savemat), NYUD-v2 in the
InvPT layout, the MTI-Net `NYUD_MT` layout, and the official `nyu_depth_v2_labeled.mat` (MATLAB
v7.3 = HDF5 with the 512-byte MATLAB header, arrays stored transposed). Odd sizes (37 x 53,
41 x 29) so that transposed or swapped axes show up. Every map is a known pattern whose decoded
values tests/test_pascal_context.py and tests/test_nyud_v2.py check pixel by pixel; the geometry
is in the constants below.
"""

import io
import pathlib
import tarfile

import numpy as np
from PIL import Image
import scipy.io

# ------------------------------------------------------------------------------------------------
# PASCAL-Context. Ids are real ones: '2008_000003' and '2008_000007' are in the boundary benchmark
# subset (test_new), '2008_000002' is not.
PASCAL_TRAIN = ('2008_000008', '2008_000015', '2008_000019')
PASCAL_VAL = ('2008_000002', '2008_000003', '2008_000007')
PASCAL_SIZES = {i: (37, 53) for i in PASCAL_TRAIN + PASCAL_VAL} | {'2008_000015': (41, 29)}
PASCAL_WITH_VOC12 = ('2008_000008', '2008_000003')  # semseg/VOC12/<id>.png exists
# LabelMap: 0 background; rectangle A = class 3 ('air conditioner', normals-valid), rectangle B =
# class 1 ('accordion', not normals-valid), a 427 ('tvmonitor', valid) square and three stripes of
# classes 5 | 6 | 7 (one pixel of 6 between them: the Laplacian there is 0).
RECT_A = (slice(3, 12), slice(5, 13))
RECT_B = (slice(16, 26), slice(16, 26))
TV = (slice(3, 7), slice(20, 24))
STRIPES = ((slice(29, 35), slice(2, 5), 5), (slice(29, 35), slice(5, 6), 6),
           (slice(29, 35), slice(6, 9), 7))
NORMALS_RGB = (128, 0, 255)  # every pixel of every normals_distill PNG
SAL_COLUMNS = ((slice(0, 3), 0), (slice(3, 6), 127), (slice(6, 9), 128), (slice(9, None), 255))
SEMSEG_VOC12 = {'A': 15, 'B': 255}  # values of the VOC12 PNG on the rectangles (else 0)
SEMSEG_CONTEXT = {'A': 9, 'B': 4}  # values of the pascal-context PNG on the rectangles (else 0)
# PASCAL-Part objects per id: (class name, class_ind, object mask region or None for all-zero,
# [(part name, region)] or None for no parts). Regions are (rows, cols) slices.
HEAD = (slice(2, 8), slice(30, 36))
TORSO = (slice(6, 14), slice(30, 36))  # overlaps HEAD on rows 6..7: torso (2) wins
LHAND = (slice(14, 16), slice(40, 44))
RFOOT = (slice(30, 34), slice(30, 34))
LUARM = (slice(14, 18), slice(42, 48))  # second person, overlaps LHAND on cols 42..43: 3 wins
DOG = (slice(20, 28), slice(2, 12))
PASCAL_OBJECTS = {
    '2008_000008': [('person', 15, None, [('head', HEAD), ('torso', TORSO), ('lhand', LHAND),
                                          ('rfoot', RFOOT)]),
                    ('dog', 12, DOG, None),
                    ('person', 15, LUARM, [('luarm', LUARM)])],
    '2008_000015': [('person', 15, DOG, None), ('dog', 12, DOG, None)],  # person without parts
    '2008_000019': [('dog', 12, DOG, None)],
    # A person with parts but an all-zero object mask: not in the references' object list.
    '2008_000002': [('person', 15, (slice(0, 0), slice(0, 0)), [('head', HEAD)])],
    '2008_000003': [('person', 15, None, [('hair', HEAD), ('neck', TORSO), ('rlarm', LHAND),
                                          ('ruleg', RFOOT)])],
    '2008_000007': [('cat', 8, DOG, None)],
}


def gradient_image(h: int, w: int) -> np.ndarray:
  """A smooth RGB uint8 pattern (survives JPEG well; rows, columns distinguishable)."""
  r, c = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  return np.stack([r * 5 % 256, c * 4 % 256, (r + c) * 2 % 256], -1).astype(np.uint8)


def pascal_label_map(h: int, w: int) -> np.ndarray:
  label_map = np.zeros((h, w), np.uint16)
  label_map[RECT_A] = 3
  label_map[RECT_B] = 1
  label_map[TV] = 427
  for rows, cols, value in STRIPES:
    label_map[rows, cols] = value
  return label_map


def _save_png(path: pathlib.Path, array: np.ndarray, mode: str | None = None) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  image = Image.fromarray(array)
  if mode == 'P':  # palette PNG: PIL returns the indices, OpenCV would expand the colours
    image = image.convert('L').convert('P')
    image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
  image.save(path)


def _struct(fields: tuple[str, ...], rows: list[tuple]) -> np.ndarray:
  """A MATLAB 1 x N struct array (numpy structured array of objects, for scipy.io.savemat)."""
  array = np.empty((1, len(rows)), dtype=[(f, 'O') for f in fields])
  for j, row in enumerate(rows):
    array[0, j] = row
  return array


def _region_mask(shape, region) -> np.ndarray:
  mask = np.zeros(shape, np.uint8)
  mask[region] = 1
  return mask


def human_parts_anno(image_id: str, shape: tuple[int, int]) -> np.ndarray:
  """The `anno` struct of human_parts/<id>.mat: fields (imname, objects), objects (class,
  class_ind, mask, parts), parts (part_name, mask) or a 0 x 0 array (§6.2)."""
  objects = []
  for name, class_ind, region, parts in PASCAL_OBJECTS[image_id]:
    if parts is None:
      part_array = np.zeros((0, 0))
    else:
      part_array = _struct(('part_name', 'mask'),
                           [(p, _region_mask(shape, r)) for p, r in parts])
    if region is None:  # the union of the parts
      mask = np.max([_region_mask(shape, r) for _, r in parts], axis=0).astype(np.uint8)
    else:
      mask = _region_mask(shape, region)
    objects.append((name, np.array([[float(class_ind)]]), mask, part_array))
  return _struct(('imname', 'objects'),
                 [(image_id, _struct(('class', 'class_ind', 'mask', 'parts'), objects))])


def write_pascal_context(root: pathlib.Path, folder: str = 'PASCALContext') -> pathlib.Path:
  """Writes the fake tree under root/folder; returns that folder."""
  base = root / folder
  for split, ids in (('train', PASCAL_TRAIN), ('val', PASCAL_VAL)):
    path = base / 'ImageSets' / 'Context' / f'{split}.txt'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(f'{i}\n' for i in ids))
  for image_id in PASCAL_TRAIN + PASCAL_VAL:
    h, w = PASCAL_SIZES[image_id]
    jpeg = base / 'JPEGImages' / f'{image_id}.jpg'
    jpeg.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gradient_image(h, w)).save(jpeg, quality=95)
    label_map = pascal_label_map(h, w)
    mat = base / 'pascal-context' / 'trainval' / f'{image_id}.mat'
    mat.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(mat, {'LabelMap': label_map})
    for sub, values, mode in (('pascal-context', SEMSEG_CONTEXT, 'L'),
                              ('VOC12', SEMSEG_VOC12, 'P')):
      if sub == 'VOC12' and image_id not in PASCAL_WITH_VOC12:
        continue
      seg = np.zeros((h, w), np.uint8)
      seg[RECT_A], seg[RECT_B] = values['A'], values['B']
      _save_png(base / 'semseg' / sub / f'{image_id}.png', seg, mode)
    sal = np.zeros((h, w), np.uint8)
    for cols, value in SAL_COLUMNS:
      sal[:, cols] = value
    _save_png(base / 'sal_distill' / f'{image_id}.png', sal)
    _save_png(base / 'normals_distill' / f'{image_id}.png',
              np.broadcast_to(np.array(NORMALS_RGB, np.uint8), (h, w, 3)).copy())
    parts = base / 'human_parts' / f'{image_id}.mat'
    parts.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(parts, {'anno': human_parts_anno(image_id, (h, w))})
  return base


def tar_gz(folder: pathlib.Path, archive: pathlib.Path) -> pathlib.Path:
  """archive (.tar.gz / .tgz) holding `folder` as its top directory."""
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(folder, arcname=folder.name)
  return archive


# ------------------------------------------------------------------------------------------------
# NYUD-v2 (InvPT and NYUD_MT layouts).
NYUD_TRAIN = ('0003', '0004', '0005')
NYUD_VAL = ('0001', '0002')
NYUD_SIZES = {i: (37, 53) for i in NYUD_TRAIN + NYUD_VAL} | {'0004': (41, 29)}
SEG_COLUMNS = ((slice(0, 5), 0), (slice(5, 10), 1), (slice(10, 15), 40), (slice(15, None), 20))
EDGE_BOX = (slice(5, 20), slice(3, 20))  # the edge map is this box's outline
NORMALS_NPY = (0.6, -0.8, 0.0)


def nyud_depth(h: int, w: int) -> np.ndarray:
  """Depth in metres: 0.5 + 0.1 row + 0.01 col, invalid (0) on the two top rows."""
  r, c = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  depth = (0.5 + 0.1 * r + 0.01 * c).astype(np.float32)
  depth[:2] = 0
  return depth


def nyud_edge(h: int, w: int) -> np.ndarray:
  """{0, 1} uint8 outline of EDGE_BOX."""
  edge = np.zeros((h, w), np.uint8)
  rows, cols = EDGE_BOX
  edge[rows, cols] = 1
  edge[rows.start + 1:rows.stop - 1, cols.start + 1:cols.stop - 1] = 0
  return edge


def write_nyud(root: pathlib.Path, layout: str = 'invpt', depth_unit: float = 1.0) -> pathlib.Path:
  """Writes NYUDv2/ (layout 'invpt') or NYUD_MT/ ('nyud_mt') under root; returns the folder.

  `depth_unit`: metres per stored depth unit (0.001: millimetres, as prepare_nyudv2.py may write).
  """
  base = root / ('NYUDv2' if layout == 'invpt' else 'NYUD_MT')
  (base / 'gt_sets').mkdir(parents=True, exist_ok=True)
  (base / 'gt_sets' / 'train.txt').write_text('\n'.join(NYUD_TRAIN) + '\n')
  (base / 'gt_sets' / 'val.txt').write_text('\n'.join(NYUD_VAL) + '\n')
  for sub in ('images', 'segmentation', 'depth', 'normals', 'edge'):
    (base / sub).mkdir(exist_ok=True)
  for image_id in NYUD_TRAIN + NYUD_VAL:
    h, w = NYUD_SIZES[image_id]
    seg = np.zeros((h, w), np.uint8)
    for cols, value in SEG_COLUMNS:
      seg[:, cols] = value
    _save_png(base / 'segmentation' / f'{image_id}.png', seg)
    np.save(base / 'depth' / f'{image_id}.npy', (nyud_depth(h, w) / depth_unit).astype(np.float32))
    if layout == 'invpt':
      _save_png(base / 'images' / f'{image_id}.png', gradient_image(h, w))
      _save_png(base / 'normals' / f'{image_id}.png',
                np.broadcast_to(np.array(NORMALS_RGB, np.uint8), (h, w, 3)).copy())
      _save_png(base / 'edge' / f'{image_id}.png', nyud_edge(h, w) * 255)
    else:
      Image.fromarray(gradient_image(h, w)).save(base / 'images' / f'{image_id}.jpg', quality=95)
      np.save(base / 'normals' / f'{image_id}.npy',
              np.broadcast_to(np.array(NORMALS_NPY, np.float32), (h, w, 3)).copy())
      np.save(base / 'edge' / f'{image_id}.npy', nyud_edge(h, w).astype(np.float32))
  return base


# ------------------------------------------------------------------------------------------------
# nyu_depth_v2_labeled.mat: MAT_FRAMES frames of MAT_SIZE; raw labels are 894-class ids.
MAT_FRAMES = 5
MAT_SIZE = (37, 53)
# (region, raw label, instance): label 11 'floor' everywhere else (instance 1).
MAT_REGIONS = (((slice(5, 15), slice(5, 20)), 4, 1),  # two instances of label 4, side by side
               ((slice(5, 15), slice(20, 35)), 4, 2),
               ((slice(25, 37), slice(0, 10)), 0, 0),  # unlabelled
               ((slice(25, 37), slice(40, 53)), 1, 1))
_MATLAB_HEADER = (b'MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 '
                  b'HDF5 schema 1.00 .')


def mat_frame(index: int) -> dict[str, np.ndarray]:
  """The (H, W) maps of frame `index` (0-based), as MATLAB shows them."""
  h, w = MAT_SIZE
  labels = np.full((h, w), 11, np.uint16)
  instances = np.ones((h, w), np.uint8)
  for region, label, instance in MAT_REGIONS:
    labels[region], instances[region] = label, instance
  image = gradient_image(h, w)
  image[..., 2] = index  # frames differ
  return {'image': image, 'depth': nyud_depth(h, w) + index, 'labels': labels,
          'instances': instances}


def write_labeled_mat(root: pathlib.Path) -> pathlib.Path:
  """root/nyu_depth_v2_labeled.mat with MAT_FRAMES frames; returns its path."""
  import h5py  # pylint: disable=g-import-not-at-top
  frames = [mat_frame(i) for i in range(MAT_FRAMES)]
  path = root / 'nyu_depth_v2_labeled.mat'
  root.mkdir(parents=True, exist_ok=True)
  with h5py.File(path, 'w', userblock_size=512) as f:
    for name, key, matlab_class in (('images', 'image', 'uint8'), ('depths', 'depth', 'single'),
                                    ('labels', 'labels', 'uint16'),
                                    ('instances', 'instances', 'uint8')):
      data = np.stack([fr[key].T for fr in frames])  # column-major: (N, [3,] W, H)
      f.create_dataset(name, data=data).attrs['MATLAB_class'] = np.bytes_(matlab_class)
  with open(path, 'r+b') as f:  # MATLAB's text header, version 0x0200, endian 'IM'
    f.write(_MATLAB_HEADER.ljust(116) + b'\0' * 8 + b'\x00\x02' + b'IM')
  return path


def read_bytes(path: pathlib.Path) -> bytes:
  return pathlib.Path(path).read_bytes()


def pil_rgb(path: pathlib.Path) -> np.ndarray:
  """The image as the reference loaders read it: PIL, convert('RGB')."""
  with Image.open(io.BytesIO(read_bytes(path))) as image:
    return np.array(image.convert('RGB'))
