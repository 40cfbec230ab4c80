"""TFDS builder of PASCAL-Context multi-task (docs/datasets_metrics.md §1, §6.2).

Reads the archive that MLoRE / InvPT / ATRC / MTI-Net / MTLoRA train on (`PASCALContext.tar.gz` or
`PASCAL_MT.tgz`, same layout) from `--manual_dir` and decodes every task exactly as their loader
(`MLoRE:data/pascal_context.py`, docs/datasets_metrics.md §1.2) into the mtl_jax label format
(mtl_jax/tasks.py). The pipeline's `AddIgnoreRegions` later turns all-zero human-part maps and
zero normals into ignore (255), as the references do after loading. Build:

  python -m data_builders.build data_builders/pascal_context --manual_dir=DIR --data_dir=DATA_DIR

Splits: `train` (4998), `validation` (the reference's `val`, 5105) and `test_new` (the 2498 val
images on which the public boundary benchmark, SEISM's `gt_sets/PASCALContext/test_new.txt`,
computes odsF; §4.5 step 7).
"""

import json

from absl import logging
import cv2
from etils import epath
import numpy as np
import scipy.io
import tensorflow_datasets as tfds

from data_builders import features
from data_builders import manual_data

_DIR = epath.Path(__file__).parent
PERSON = 15  # VOC class index of 'person' (`class_ind` in the human_parts .mat files)
# The references' 6-part grouping (`HUMAN_PART[6]`, §1.2 step 3): part name -> id.
HUMAN_PARTS = {
    **dict.fromkeys(('hair', 'head', 'lear', 'rear', 'lebrow', 'rebrow', 'leye', 'reye', 'mouth',
                     'nose'), 1),
    **dict.fromkeys(('neck', 'torso'), 2),
    **dict.fromkeys(('luarm', 'ruarm'), 3),
    **dict.fromkeys(('llarm', 'rlarm', 'lhand', 'rhand'), 4),
    **dict.fromkeys(('luleg', 'ruleg'), 5),
    **dict.fromkeys(('llleg', 'rlleg', 'lfoot', 'rfoot'), 6),
}
SEMSEG_CLASSES = 21
CONTEXT_CLASSES = 459
PUBLISHED_SIZES = {'train': 4998, 'validation': 5105, 'test_new': 2498}
TEST_NEW_IDS = tuple(manual_data.read_ids(_DIR / 'test_new.txt'))


def normals_valid_classes() -> frozenset[int]:
  """The 170 PASCAL-Context ids whose normals are kept (§1.2 'normals', Appendix A).

  Every NYU class name that is also a PASCAL-Context class name (except 'unknown'), plus
  'tvmonitor', from the references' `db_info/{nyu,context}_classes.json` (shipped in db_info/).
  """
  nyu = json.loads((_DIR / 'db_info' / 'nyu_classes.json').read_text())
  context = json.loads((_DIR / 'db_info' / 'context_classes.json').read_text())
  return frozenset([context[n] for n in nyu if n in context and n != 'unknown']
                   + [context['tvmonitor']])


NORMALS_VALID_CLASSES = normals_valid_classes()

_FEATURE_DOCS = {
    'image': 'RGB uint8 (H, W, 3), JPEGImages/<id>.jpg (VOC2010, <= 500 px per side).',
    'semseg': 'uint8 (H, W, 1): 0 background, 1..20 the VOC classes, 255 void. From '
              'semseg/VOC12/<id>.png when it exists, else semseg/pascal-context/<id>.png.',
    'human_parts': 'uint8 (H, W, 1): 0 background, 1 head, 2 torso, 3 upper arm, 4 lower arm + '
                   'hand, 5 upper leg, 6 lower leg + foot (PASCAL-Part, 6-part grouping; later '
                   'parts and persons overwrite earlier ones). All zero when the image has no '
                   'person with parts: the pipeline then ignores the whole map.',
    'sal': 'uint8 (H, W, 1): 1 where sal_distill/<id>.png / 255 > 0.5 (raw >= 128), else 0.',
    'normals': 'float32 (H, W, 3): 2 v / 255 - 1 of normals_distill/<id>.png (x = R, y = G, z = '
               'B, not renormalised) on pixels whose PASCAL-Context class is one of the 170 '
               'normals-valid classes, 0 elsewhere (ignored by the pipeline).',
    'edge': 'uint8 (H, W, 1) {0, 1}: thin(|Laplacian(label_map)| > 0), 1 px wide.',
    'label_map': 'uint16 (H, W): the 459-class PASCAL-Context LabelMap (0 = unlabelled) of '
                 'pascal-context/trainval/<id>.mat; the boundary benchmark builds its ground truth '
                 'from it (docs/datasets_metrics.md §4.5 step 4).',
    'id': "image id, e.g. '2008_000002'.",
}


def semseg_path(root: epath.Path, image_id: str) -> epath.Path:
  """semseg/VOC12/<id>.png when it exists (VOC2012 official), else semseg/pascal-context/."""
  voc = root / 'semseg' / 'VOC12' / f'{image_id}.png'
  return voc if voc.exists() else root / 'semseg' / 'pascal-context' / f'{image_id}.png'


def decode_semseg(path: epath.Path) -> np.ndarray:
  """Raw PNG values (palette indices), 0..20 or 255."""
  semseg = manual_data.load_png(path, channels=1)
  bad = np.setdiff1d(np.unique(semseg), [*range(SEMSEG_CLASSES), 255])
  if bad.size:
    raise manual_data.ManualDataError(f'{path}: values {bad.tolist()} are not classes 0..20 or '
                                      '255 (not a label PNG?)')
  return semseg.astype(np.uint8)


def load_label_map(path: epath.Path) -> np.ndarray:
  """The `LabelMap` variable of pascal-context/trainval/<id>.mat as uint16."""
  with manual_data.decoding(path):
    label_map = scipy.io.loadmat(path)['LabelMap']
  if label_map.ndim != 2 or label_map.min() < 0 or label_map.max() > CONTEXT_CLASSES:
    raise manual_data.ManualDataError(f'{path}: LabelMap must be a 2-D map of ids 0..459, got '
                                      f'shape {label_map.shape}, range {label_map.min()}..'
                                      f'{label_map.max()}')
  return label_map.astype(np.uint16)


def edges(label_map: np.ndarray) -> np.ndarray:
  """`thin(|cv2.Laplacian(LabelMap, CV_64F)| > 0)` (ksize 1, border REFLECT_101), uint8 {0, 1}.

  The Laplacian of the ids, not a neighbour test: a pixel between ids a and b with a + b = 2 x
  its own id and equal vertical neighbours is not marked, as in the reference.
  """
  laplacian = cv2.Laplacian(label_map.astype(np.float64), cv2.CV_64F)
  return manual_data.thin(np.abs(laplacian) > 0)


def decode_normals(path: epath.Path, label_map: np.ndarray) -> np.ndarray:
  """`2 * v / 255 - 1` (float32, per RGB channel) where the class is normals-valid, else 0."""
  png = manual_data.load_png(path, channels=3).astype(np.float32)
  normals = np.float32(2.0) * png / np.float32(255.0) - np.float32(1.0)
  if label_map.shape != normals.shape[:2]:
    raise manual_data.ManualDataError(f'{path}: size {normals.shape[:2]} differs from its '
                                      f'LabelMap {label_map.shape}')
  valid = np.isin(label_map, list(NORMALS_VALID_CLASSES))
  return np.where(valid[..., None], normals, np.float32(0.0))


def decode_sal(path: epath.Path) -> np.ndarray:
  """`v / 255 > 0.5` of the distilled saliency PNG as uint8 {0, 1}."""
  sal = manual_data.load_png(path, channels=1).astype(np.float32)
  return (sal / np.float32(255.0) > 0.5).astype(np.uint8)


def decode_human_parts(path: epath.Path, shape: tuple[int, int]) -> np.ndarray:
  """The 6-part map of a PASCAL-Part `anno` struct (§1.2 'human_parts', §6.2 for the layout).

  Parts are drawn only when the image has a person of non-zero area (the references' `area_thres
  = 0` object list); then every person object with parts paints its parts in file order, later
  ones overwriting earlier ones. Otherwise the map is all zero.
  """
  with manual_data.decoding(path):
    objects = scipy.io.loadmat(path)['anno'][0][0][1][0]
    has_person = any(int(obj[1].item()) == PERSON and np.sum(obj[2]) > 0 for obj in objects)
    target = None
    for obj in objects if has_person else ():
      if int(obj[1].item()) != PERSON or len(obj[3]) == 0:
        continue
      if target is None:
        target = np.zeros(obj[2].shape, np.uint8)
      for part in obj[3][0]:
        name = str(part[0][0])
        if name not in HUMAN_PARTS:
          raise manual_data.ManualDataError(f'{path}: unknown part name {name!r}')
        target[part[1].astype(bool)] = HUMAN_PARTS[name]
  if target is None:
    return np.zeros(shape, np.uint8)
  return manual_data.fit(target, shape, cv2.INTER_NEAREST, path)


def id_files(root: epath.Path, image_id: str) -> dict[str, epath.Path]:
  """The files of one id, by what they are decoded into."""
  return {
      'image': root / 'JPEGImages' / f'{image_id}.jpg',
      'semseg': semseg_path(root, image_id),
      'human_parts': root / 'human_parts' / f'{image_id}.mat',
      'sal': root / 'sal_distill' / f'{image_id}.png',
      'normals': root / 'normals_distill' / f'{image_id}.png',
      'label_map': root / 'pascal-context' / 'trainval' / f'{image_id}.mat',
  }


def decode_example(root: epath.Path, image_id: str) -> dict[str, object]:
  """The TFDS example of one id (labels decoded as §1.2, at the image size)."""
  files = id_files(root, image_id)
  image, shape = manual_data.image_bytes(files['image'])
  label_map = load_label_map(files['label_map'])
  nearest = lambda array, name: manual_data.fit(array, shape, cv2.INTER_NEAREST, files[name])
  return {
      'image': image,
      'semseg': manual_data.png(nearest(decode_semseg(files['semseg']), 'semseg')),
      'human_parts': manual_data.png(decode_human_parts(files['human_parts'], shape)),
      'sal': manual_data.png(nearest(decode_sal(files['sal']), 'sal')),
      'normals': manual_data.fit(decode_normals(files['normals'], label_map), shape,
                                 cv2.INTER_CUBIC, files['normals']),
      'edge': manual_data.png(nearest(edges(label_map), 'label_map')),
      'label_map': nearest(label_map, 'label_map'),
      'id': image_id,
  }


class Builder(features.ArrayRecordByDefault, tfds.core.GeneratorBasedBuilder):
  """PASCAL-Context multi-task: semseg, human_parts, sal, normals, edge (+ the 459-class map)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Put ONE of these into --manual_dir (the archive does not need to be extracted):
  * PASCALContext.tar.gz: the archive of InvPT / MLoRE / TaskPrompter, linked from the InvPT
    README (github.com/prismformore/Multi-Task-Transformer, InvPT/README.md, "Data");
  * PASCAL_MT.tgz: the same data as used by ASTMT / MTI-Net / ATRC / MTLoRA,
    https://data.vision.ee.ethz.ch/kmaninis/share/MTL/PASCAL_MT.tgz;
  * the extracted folder PASCALContext/ or PASCAL_MT/ (or --manual_dir pointing into it), holding
    JPEGImages/, ImageSets/Context/{train,val}.txt, semseg/{VOC12,pascal-context}/,
    human_parts/, normals_distill/, sal_distill/ and pascal-context/trainval/.
See data_builders/pascal_context/README.md."""
  # TFDS 4.9.10 locates a packaged builder's file via `importlib_resources`, which it does not
  # install on Python >= 3.9: give the path (as data_builders/synthetic_scenes does).
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    doc = _FEATURE_DOCS
    return tfds.core.DatasetInfo(
        builder=self,
        description=('PASCAL-Context multi-task (ASTMT / MTI-Net / InvPT / MLoRE / MTLoRA data): '
                     'VOC2010 images with semantic segmentation (21 classes), human parts (7), '
                     'distilled saliency and surface normals, and boundaries of the 459-class '
                     'PASCAL-Context labels. Decoding: docs/datasets_metrics.md §1.2.'),
        features=tfds.features.FeaturesDict({
            'image': features.image(doc['image'], encoding_format='jpeg'),
            **{t: features.label(doc[t]) for t in ('semseg', 'human_parts', 'sal')},
            'normals': features.dense(doc['normals'], 3),
            'edge': features.label(doc['edge']),
            'label_map': features.dense(doc['label_map'], None, np.uint16),
            'id': features.text(doc['id']),
        }),
        homepage='https://cs.stanford.edu/~roozbeh/pascal-context/',
        disable_shuffling=True,  # record i of a split is the i-th id of its split file
    )

  def _split_generators(self, dl_manager):
    root = manual_data.find_root(
        dl_manager, lambda p: (p / 'JPEGImages').is_dir(), folders=('PASCALContext', 'PASCAL_MT'),
        archives=('PASCALContext.tar.gz', 'PASCAL_MT.tgz', 'PASCAL_MT.tar.gz'),
        instructions=self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    splits = {name: manual_data.read_ids(root / 'ImageSets' / 'Context' / f'{file}.txt')
              for name, file in (('train', 'train'), ('validation', 'val'))}
    val = set(splits['validation'])
    splits['test_new'] = [i for i in TEST_NEW_IDS if i in val]
    manual_data.check_files(sorted({i for ids in splits.values() for i in ids}),
                            lambda i: id_files(root, i).values(), f'PASCAL-Context in {root}')
    manual_data.log_split_sizes('pascal_context', {k: len(v) for k, v in splits.items()},
                                PUBLISHED_SIZES)
    if not splits['test_new']:
      logging.warning('pascal_context: no val image is in the boundary benchmark subset '
                      '(test_new.txt); the test_new split is not built.')
      del splits['test_new']
    return {name: self._generate_examples(root, ids) for name, ids in splits.items()}

  def _generate_examples(self, root: epath.Path, ids: list[str]):
    for image_id in ids:
      yield image_id, decode_example(root, image_id)
