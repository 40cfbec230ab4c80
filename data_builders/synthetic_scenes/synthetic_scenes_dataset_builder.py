"""TFDS builder of `synthetic_scenes`: procedurally rendered rooms labelled for all six tasks.

The embedded demo dataset: nothing is downloaded, every example is rendered by `render.py` (numpy
only) from a generator seeded by (config seed, split, index). Labels follow the mtl_jax label
format (mtl_jax/tasks.py, docs/datasets_metrics.md §1.2); the conventions are in render.py.

Build (TensorFlow is not needed to build or read; records are array_record), from the repo root:

  python -m data_builders.build data_builders/synthetic_scenes --config=small --data_dir=DIR

(TFDS's `tfds build` command run without the parts of the `tfds` launcher that need Apache Beam,
see data_builders/build.py; without --config it builds every config, `large` included). The demo
config builds it on first use. Then, after `import data_builders.synthetic_scenes`:

  tfds.data_source('synthetic_scenes/small', split='train', data_dir=DIR)
"""

import dataclasses
import io

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from data_builders import features
from . import render


@dataclasses.dataclass(eq=False)
class SyntheticScenesConfig(tfds.core.BuilderConfig):
  """Image size, example counts and seed of one config."""
  height: int = 64
  width: int = 80
  num_train: int = 2000
  num_validation: int = 250
  seed: int = 0


def _png(array: np.ndarray) -> bytes:
  """PNG bytes of a uint8 (H, W, 1|3) map (the Image feature then needs no TensorFlow)."""
  buffer = io.BytesIO()
  Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format='PNG')
  return buffer.getvalue()


_SEG_DOC = 'uint8 (H, W, 1); {}'
_FEATURE_DOCS = {
    'image': 'RGB uint8 (H, W, 3): textured, Lambertian point light + ambient, hard shadows, '
             'sensor noise.',
    'semseg': _SEG_DOC.format('classes ' + ', '.join(
        f'{i} {n}' for i, n in enumerate(render.CLASS_NAMES)) + ' (walls include the ceiling).'),
    'human_parts': _SEG_DOC.format(', '.join(
        f'{i} {n}' for i, n in enumerate(render.PART_NAMES)) + ' (0 = not on a figure; all zero '
                                   'when the image has no figure).'),
    'sal': _SEG_DOC.format('1 on objects (semseg >= 2), 0 on floor and walls.'),
    'edge': _SEG_DOC.format('{0, 1}; 1 where the right or bottom neighbour has another class or '
                            'object, or is a self-occluding part of the same object.'),
    'normals': 'float32 (H, W, 3): unit surface normals in the camera frame, x right, y up, z '
               'towards the camera.',
    'depth': 'float32 (H, W, 1): z-depth in metres (distance along the optical axis), > 0.',
    'id': "'<split>_<index>' (e.g. 'train_000123'); the example is rendered from seed "
          '(config seed, split, index).',
}


class Builder(features.ArrayRecordByDefault, tfds.core.GeneratorBasedBuilder):
  """Procedural indoor scenes with exact semseg/parts/saliency/normals/depth/edge labels."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      SyntheticScenesConfig(name='small', description='64x80, 2000 train / 250 validation.'),
      SyntheticScenesConfig(name='large', height=128, width=160, num_train=10000,
                            num_validation=1000, description='128x160, 10000 / 1000.'),
      SyntheticScenesConfig(name='tiny', height=24, width=32, num_train=8, num_validation=4,
                            description='24x32, 8 / 4: for tests and smoke runs.'),
      SyntheticScenesConfig(name='ci', height=32, width=40, num_train=512, num_validation=96,
                            description='32x40, 512 / 96: the shortened demo of the test suite.'),
  ]
  DEFAULT_CONFIG_NAME = 'small'
  # TFDS 4.9.10 locates a packaged builder's file via `importlib_resources`, which it does not
  # install on Python >= 3.9 (ModuleNotFoundError in download_and_prepare): give the path.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    doc = _FEATURE_DOCS
    return tfds.core.DatasetInfo(
        builder=self,
        description=('Procedurally rendered rooms (numpy ray casting) with exact labels for '
                     'semseg, human_parts, sal, normals, depth and edge; the mtl_jax demo '
                     'dataset. Conventions: data_builders/synthetic_scenes/render.py.'),
        features=tfds.features.FeaturesDict({
            'image': features.image(doc['image'], encoding_format='png'),
            **{t: features.label(doc[t]) for t in ('semseg', 'human_parts', 'sal', 'edge')},
            'normals': features.dense(doc['normals'], 3),
            'depth': features.dense(doc['depth'], 1),
            'id': features.text(doc['id']),
        }),
        disable_shuffling=True,  # record i of a split is example i (grain shuffles when reading)
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    config = self.builder_config
    return {'train': self._generate_examples('train', config.num_train),
            'validation': self._generate_examples('validation', config.num_validation)}

  def _generate_examples(self, split: str, num_examples: int):
    config = self.builder_config
    for index in range(num_examples):
      maps = render.render_example(config.seed, split, index, config.height, config.width).maps
      key = f'{split}_{index:06d}'
      example = {name: _png(maps[name]) for name in ('image', 'semseg', 'human_parts', 'sal',
                                                     'edge')}
      yield key, {**example, 'normals': maps['normals'], 'depth': maps['depth'], 'id': key}
