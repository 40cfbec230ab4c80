"""TFDS builder of NYUD-v2 multi-task, from three sources (docs/datasets_metrics.md §2, §6.2).

Builder configs (one per on-disk source, all read from `--manual_dir`):

* ``invpt`` (default): InvPT's `NYUDv2.tar.gz` (MLoRE / InvPT / TaskPrompter), §2.1: PNG images,
  normals and edges, depth .npy in metres.
* ``nyud_mt``: MTI-Net's `NYUD_MT.tgz` (ATRC / MTLoRA / the user's fork), §2.2: JPEG images,
  normals and edges as .npy. Also reads trees written by the fork's `prepare_nyudv2.py`
  (docs/user_fork.md §6) when their depth is in metres; ``nyud_mt_mm`` reads the same layout
  with depth in millimetres (x 0.001).
* ``labeled_mat``: the official `nyu_depth_v2_labeled.mat` (1449 frames, 480x640), §2.3:
  NYU-40 semseg from the 894-class labels, depth in metres, edges from label/instance
  boundaries. It has no surface normals: this config has no `normals` feature.

Labels follow the mtl_jax format (mtl_jax/tasks.py): semseg 0..39 (NYU-40 minus 1), 255 =
unlabelled; depth float32 metres, 0 = invalid; normals float32 in [-1, 1] (zero vectors are
ignored by the pipeline); edge {0, 1}. Build:

  python -m data_builders.build data_builders/nyud_v2 --config=invpt --manual_dir=DIR \
      --data_dir=DATA_DIR

Splits: `train` (795) and `validation` (654, the references' val = test).
"""

import dataclasses

from absl import logging
import cv2
from etils import epath
import numpy as np
import scipy.io
import tensorflow_datasets as tfds

from data_builders import features
from data_builders import manual_data

_DIR = epath.Path(__file__).parent
NUM_FRAMES = 1449
SEMSEG_CLASSES = 40
PUBLISHED_SIZES = {'train': 795, 'validation': 654}
MAX_DEPTH_M = 100.0  # NYU depth is < 10 m; larger values mean the unit is not metres
# The 654 test frames of the official splits.mat (= SEISM's gt_sets/NYUD/test_new.txt), 1-based.
TEST_IDS = tuple(manual_data.read_ids(_DIR / 'test_ids.txt'))


def _class_mapping_40() -> np.ndarray:
  """Lookup table: 894-class label (0 = unlabelled) -> semseg 0..39, 255 for unlabelled."""
  lines = (_DIR / 'class_mapping_40.txt').read_text().splitlines()
  mapping = np.array([int(l) for l in lines if not l.startswith('#')])
  return np.concatenate([[255], mapping - 1]).astype(np.uint8)


CLASS_MAPPING_40 = _class_mapping_40()


@dataclasses.dataclass(eq=False)
class NyudConfig(tfds.core.BuilderConfig):
  """Which on-disk source, and the unit of its depth files."""
  source: str = 'invpt'  # 'invpt' | 'nyud_mt' | 'labeled_mat'
  depth_scale: float = 1.0  # multiplies the depth files' values into metres


_LAYOUTS = {  # source: (folders, archives, image ext, normals ext, edge ext)
    'invpt': (('NYUDv2',), ('NYUDv2.tar.gz', 'NYUDv2.tgz'), 'png', 'png', 'png'),
    'nyud_mt': (('NYUD_MT',), ('NYUD_MT.tgz', 'NYUD_MT.tar.gz'), 'jpg', 'npy', 'npy'),
}
_LAYOUT_HINT = ('InvPT layout (--config=invpt): images/<id>.png, normals/<id>.png, edge/<id>.png; '
                'MTI-Net layout (--config=nyud_mt): images/<id>.jpg, normals/<id>.npy, '
                'edge/<id>.npy; both with segmentation/<id>.png, depth/<id>.npy, gt_sets/.')
_LABELED_MAT = 'nyu_depth_v2_labeled.mat'

_FEATURE_DOCS = {
    'image': 'RGB uint8 (H, W, 3).',
    'semseg': 'uint8 (H, W, 1): NYU-40 class - 1 (0 wall ... 39 otherprop), 255 unlabelled.',
    'depth': 'float32 (H, W, 1): depth in metres, 0 = invalid.',
    'normals': 'float32 (H, W, 3): surface normals in [-1, 1] (x = R, y = G, z = B of the PNG: '
               '2 v / 255 - 1, not renormalised; the .npy of NYUD_MT as stored).',
    'edge': 'uint8 (H, W, 1) {0, 1}: boundary ground truth.',
    'id': "frame id: 1-based index into the 1449 labelled frames ('0001' style for invpt and "
          'labeled_mat, as in the source files otherwise).',
}


def decode_semseg(path: epath.Path) -> np.ndarray:
  """PNG value v in 0..40: 0 (unlabelled) -> 255, v -> v - 1."""
  seg = manual_data.load_png(path, channels=1)
  if seg.max() > SEMSEG_CLASSES:
    raise manual_data.ManualDataError(f'{path}: values up to {seg.max()}, NYU-40 labels are '
                                      '0..40')
  return np.where(seg == 0, 255, seg.astype(np.int64) - 1).astype(np.uint8)


def check_depth(depth: np.ndarray, path) -> np.ndarray:
  """Depth as float32 metres (H, W); raises for non-finite, negative or non-metre values."""
  if not np.all(np.isfinite(depth)) or depth.min() < 0:
    raise manual_data.ManualDataError(f'{path}: depth has non-finite or negative values')
  if depth.max() > MAX_DEPTH_M:
    raise manual_data.ManualDataError(
        f'{path}: depth up to {depth.max():g} after scaling to metres; NYU depth is < 10 m. '
        'Files in millimetres (e.g. written by prepare_nyudv2.py from a toolkit extraction) '
        'build with --config=nyud_mt_mm.')
  return depth.astype(np.float32)


def load_depth(path: epath.Path, scale: float) -> np.ndarray:
  """depth/<id>.npy (H, W) or (H, W, 1), times `scale`, as float32 metres (H, W)."""
  with manual_data.decoding(path):
    depth = np.load(path)
  depth = depth[..., 0] if depth.ndim == 3 and depth.shape[-1] == 1 else depth
  if depth.ndim != 2:
    raise manual_data.ManualDataError(f'{path}: expected an (H, W) depth map, got {depth.shape}')
  return check_depth(depth.astype(np.float64) * scale, path)


def decode_normals(path: epath.Path) -> np.ndarray:
  """normals/<id>.png: 2 v / 255 - 1 (float32); normals/<id>.npy: as stored (H, W, 3)."""
  if path.suffix == '.png':
    png = manual_data.load_png(path, channels=3).astype(np.float32)
    return np.float32(2.0) * png / np.float32(255.0) - np.float32(1.0)
  with manual_data.decoding(path):
    normals = np.load(path).astype(np.float32)
  if normals.ndim != 3 or normals.shape[-1] != 3 or not np.all(np.isfinite(normals)):
    raise manual_data.ManualDataError(f'{path}: expected finite (H, W, 3) normals, got '
                                      f'{normals.shape}')
  return normals


def decode_edge(path: epath.Path) -> np.ndarray:
  """edge/<id>.png (0/255: v / 255) or .npy ({0, 1} floats) as uint8 {0, 1} (>= 0.5)."""
  if path.suffix == '.png':
    edge = manual_data.load_png(path, channels=1).astype(np.float32) / np.float32(255.0)
  else:
    with manual_data.decoding(path):
      edge = np.load(path).astype(np.float32)
    edge = edge[..., 0] if edge.ndim == 3 and edge.shape[-1] == 1 else edge
    if edge.ndim != 2:
      raise manual_data.ManualDataError(f'{path}: expected an (H, W) edge map, got {edge.shape}')
  return (edge >= 0.5).astype(np.uint8)


def boundaries(*maps: np.ndarray) -> np.ndarray:
  """thin(pixels with a 4-neighbour of another value in any of `maps`), uint8 {0, 1}."""
  edge = np.zeros(maps[0].shape, bool)
  for m in maps:
    vertical, horizontal = m[1:] != m[:-1], m[:, 1:] != m[:, :-1]
    edge[1:] |= vertical
    edge[:-1] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
  return manual_data.thin(edge)


def labeled_mat_example(f, index: int) -> dict[str, object]:
  """Example of frame `index` (0-based) of the h5py-opened nyu_depth_v2_labeled.mat.

  MATLAB v7.3 stores arrays transposed: images (N, 3, W, H) uint8, depths (N, W, H) metres,
  labels (N, W, H) 894-class ids (0 = unlabelled), instances (N, W, H).
  """
  image = np.transpose(f['images'][index], (2, 1, 0))
  labels = f['labels'][index].T
  instances = f['instances'][index].T
  if labels.max() >= len(CLASS_MAPPING_40):
    raise manual_data.ManualDataError(f'{_LABELED_MAT}: frame {index + 1} has label ids up to '
                                      f'{labels.max()}, the NYU labels are 0..894')
  return {
      'image': manual_data.png(image),
      'semseg': manual_data.png(CLASS_MAPPING_40[labels]),
      'depth': check_depth(f['depths'][index].T.astype(np.float64),
                           f'{_LABELED_MAT} frame {index + 1}')[..., None],
      'edge': manual_data.png(boundaries(labels, instances)),
      'id': f'{index + 1:04d}',
  }


def labeled_mat_splits(root: epath.Path, num_frames: int) -> dict[str, list[int]]:
  """0-based frame indices: splits.mat (trainNdxs / testNdxs) next to the .mat, else the
  shipped test ids (test_ids.txt) and every other frame for train."""
  splits_mat = root / 'splits.mat'
  if splits_mat.exists():
    with manual_data.decoding(splits_mat):
      mat = scipy.io.loadmat(splits_mat)
      splits = {'train': mat['trainNdxs'], 'validation': mat['testNdxs']}
    logging.info('nyud_v2: splits from %s', splits_mat)
  else:
    test = {int(i) for i in TEST_IDS}
    splits = {'train': [i for i in range(1, num_frames + 1) if i not in test],
              'validation': [i for i in range(1, num_frames + 1) if i in test]}
  splits = {k: [int(i) - 1 for i in np.ravel(v)] for k, v in splits.items()}
  bad = [i + 1 for v in splits.values() for i in v if not 0 <= i < num_frames]
  if bad:
    raise manual_data.ManualDataError(f'{splits_mat}: frame numbers {bad[:10]} are not in '
                                      f'1..{num_frames}')
  return splits


class Builder(features.ArrayRecordByDefault, tfds.core.GeneratorBasedBuilder):
  """NYUD-v2 multi-task: semseg (40), depth, normals, edge."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      NyudConfig(name='invpt', source='invpt',
                 description="InvPT's NYUDv2.tar.gz (MLoRE / InvPT / TaskPrompter numbers)."),
      NyudConfig(name='nyud_mt', source='nyud_mt',
                 description="MTI-Net's NYUD_MT.tgz (ATRC / MTLoRA), depth in metres."),
      NyudConfig(name='nyud_mt_mm', source='nyud_mt', depth_scale=0.001,
                 description='The NYUD_MT layout with depth .npy in millimetres.'),
      NyudConfig(name='labeled_mat', source='labeled_mat',
                 description='The official nyu_depth_v2_labeled.mat (no surface normals).'),
  ]
  DEFAULT_CONFIG_NAME = 'invpt'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put into --manual_dir, depending on --config (archives do not need to be extracted):
  * invpt: NYUDv2.tar.gz, the archive of InvPT / MLoRE / TaskPrompter, linked from the InvPT
    README (github.com/prismformore/Multi-Task-Transformer, InvPT/README.md, "Data"), or its
    extracted folder NYUDv2/;
  * nyud_mt / nyud_mt_mm: NYUD_MT.tgz of MTI-Net / ATRC / MTLoRA (Google Drive file id
    14EAEMXmd3zs2hIMY63UhHPSFPDAkiTzw, linked from the MTI-Net repository
    SimonVandenhende/Multi-Task-Learning-PyTorch), its folder NYUD_MT/, or a tree written by
    prepare_nyudv2.py (nyud_mt_mm when its depth is in millimetres);
  * labeled_mat: nyu_depth_v2_labeled.mat from the NYU Depth V2 page
    (cs.nyu.edu/~silberman/datasets/nyu_depth_v2.html), optionally with the official splits.mat
    beside it (the builder ships the same 654 test ids).
See data_builders/nyud_v2/README.md."""
  # TFDS 4.9.10 locates a packaged builder's file via `importlib_resources`, which it does not
  # install on Python >= 3.9: give the path (as data_builders/synthetic_scenes does).
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    doc = _FEATURE_DOCS
    specs = {
        'image': features.image(doc['image']),
        'semseg': features.label(doc['semseg']),
        'depth': features.dense(doc['depth'], 1),
        'normals': features.dense(doc['normals'], 3),
        'edge': features.label(doc['edge']),
        'id': features.text(doc['id']),
    }
    if self.builder_config.source == 'labeled_mat':
      del specs['normals']
    return tfds.core.DatasetInfo(
        builder=self,
        description=('NYUD-v2 multi-task (795 train / 654 validation frames): NYU-40 semantic '
                     'segmentation, depth, surface normals and boundaries. Decoding: '
                     'docs/datasets_metrics.md §2 and data_builders/nyud_v2/README.md.'),
        features=tfds.features.FeaturesDict(specs),
        homepage='https://cs.nyu.edu/~silberman/datasets/nyu_depth_v2.html',
        disable_shuffling=True,  # record i of a split is the i-th id of its split
    )

  def _split_generators(self, dl_manager):
    config = self.builder_config
    if config.source == 'labeled_mat':
      root = manual_data.find_root(dl_manager, lambda p: (p / _LABELED_MAT).exists(), (), (),
                                   self.MANUAL_DOWNLOAD_INSTRUCTIONS)
      return self._labeled_mat_splits(root / _LABELED_MAT)
    folders, archives, image_ext, normals_ext, edge_ext = _LAYOUTS[config.source]
    root = manual_data.find_root(
        dl_manager, lambda p: (p / 'gt_sets').is_dir() and (p / 'images').is_dir(), folders,
        archives, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    files = lambda i: {
        'image': root / 'images' / f'{i}.{image_ext}',
        'semseg': root / 'segmentation' / f'{i}.png',
        'depth': root / 'depth' / f'{i}.npy',
        'normals': root / 'normals' / f'{i}.{normals_ext}',
        'edge': root / 'edge' / f'{i}.{edge_ext}',
    }
    splits = {name: manual_data.read_ids(root / 'gt_sets' / f'{file}.txt')
              for name, file in (('train', 'train'), ('validation', 'val'))}
    manual_data.check_files(sorted({i for ids in splits.values() for i in ids}),
                            lambda i: files(i).values(),
                            f'NYUD-v2 ({config.name}) in {root}; {_LAYOUT_HINT}')
    manual_data.log_split_sizes(f'nyud_v2/{config.name}',
                                {k: len(v) for k, v in splits.items()}, PUBLISHED_SIZES)
    return {name: self._generate_examples(files, ids, name) for name, ids in splits.items()}

  def _generate_examples(self, files, ids: list[str], split: str):
    without_edges = 0
    for image_id in ids:
      paths = files(image_id)
      image, shape = manual_data.image_bytes(paths['image'])
      fit = lambda array, name, interp=cv2.INTER_NEAREST: manual_data.fit(array, shape, interp,
                                                                          paths[name])
      edge = fit(decode_edge(paths['edge']), 'edge')
      without_edges += not edge.any()
      yield image_id, {
          'image': image,
          'semseg': manual_data.png(fit(decode_semseg(paths['semseg']), 'semseg')),
          'depth': fit(load_depth(paths['depth'], self.builder_config.depth_scale),
                       'depth')[..., None],
          'normals': fit(decode_normals(paths['normals']), 'normals', cv2.INTER_CUBIC),
          'edge': manual_data.png(edge),
          'id': image_id,
      }
    if ids and without_edges == len(ids):
      logging.warning('nyud_v2: every edge map of split %r is empty (all-zero placeholders, as '
                      'the first prepare_nyudv2.py wrote?): edge labels are meaningless.', split)

  def _labeled_mat_splits(self, path: epath.Path):
    import h5py  # pylint: disable=g-import-not-at-top  (only this config reads HDF5)
    with manual_data.decoding(path):
      with h5py.File(path, 'r') as f:
        missing = [k for k in ('images', 'depths', 'labels', 'instances') if k not in f]
        num_frames = f['labels'].shape[0] if 'labels' in f else 0
    if missing:
      raise manual_data.ManualDataError(f'{path}: variables {missing} are missing (not the '
                                        'labelled NYU Depth V2 file?)')
    if num_frames != NUM_FRAMES:
      logging.warning('nyud_v2: %s has %d frames, the labelled dataset %d.', path, num_frames,
                      NUM_FRAMES)
    splits = labeled_mat_splits(path.parent, num_frames)
    manual_data.log_split_sizes('nyud_v2/labeled_mat', {k: len(v) for k, v in splits.items()},
                                PUBLISHED_SIZES)
    return {name: self._generate_from_mat(path, indices) for name, indices in splits.items()}

  def _generate_from_mat(self, path: epath.Path, indices: list[int]):
    import h5py  # pylint: disable=g-import-not-at-top
    with h5py.File(path, 'r') as f:
      for index in indices:
        example = labeled_mat_example(f, index)
        yield example['id'], example
