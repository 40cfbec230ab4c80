r"""Boundary ODS-F / OIS-F / AP of saved edge predictions (docs/datasets_metrics.md §4.5).

  python -m mtl_jax.tools.eval_boundary --predictions=DIR --dataset=pascal_context \
      --gt=PASCALContext
  python -m mtl_jax.tools.eval_boundary --predictions=DIR --dataset=nyud_v2 \
      --tfds_data_dir=~/tensorflow_datasets --split=validation

Predictions: ``DIR/<id>.png``, single-channel 8-bit ``boundary.to_png(logits)`` at the original
image size (what the references save and SEISM reads).

Ground truth, one of:

* ``--gt``: the dataset folder in the reference layout, PASCAL-Context
  ``pascal-context/trainval/<id>.mat`` (``LabelMap``; also ``trainval/<id>.mat`` or
  ``<id>.mat``), NYUD ``edge/<id>.png`` (or ``<id>.png``). Images: ``--ids``, by default the
  benchmark's (SEISM's ``test_new``: data_builders/pascal_context/test_new.txt, 2498 ids;
  data_builders/nyud_v2/test_ids.txt, 654 frames);
* ``--tfds_data_dir``: the TFDS dataset built by data_builders/ (its ``label_map`` feature, else
  ``edge``); every example of ``--split`` (default: ``test_new`` PASCAL-Context, ``validation``
  otherwise; slices such as ``validation[:100]`` work).

Prints odsF / oisF / AP (x100) and writes them, with the per-threshold curve, as JSON to
``--output`` (default ``DIR/boundary_metrics.json``) once every image is evaluated. Bad input:
one line ``error: ...`` on stderr, exit status 1, nothing written.
"""

import json
import os
import pathlib
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
import numpy as np
from PIL import Image
import scipy.io

from mtl_jax import ConfigError
from mtl_jax import boundary
from mtl_jax import tasks as tasks_lib

_REPO = pathlib.Path(__file__).resolve().parents[2]
BENCHMARK_IDS = {
    'pascal_context': _REPO / 'data_builders' / 'pascal_context' / 'test_new.txt',
    'nyud_v2': _REPO / 'data_builders' / 'nyud_v2' / 'test_ids.txt',
}
# Where the reference layout keeps an id's ground truth, relative to --gt, first match wins.
GT_PATTERNS = {
    'pascal_context': ('pascal-context/trainval/{}.mat', 'trainval/{}.mat', '{}.mat'),
    'nyud_v2': ('edge/{}.png', '{}.png'),
}
DEFAULT_SPLITS = {'pascal_context': 'test_new'}


def read_prediction(path: pathlib.Path) -> np.ndarray:
  """The uint8 (H, W) prediction PNG."""
  if not path.is_file():
    raise ConfigError(f'prediction {path} is missing (write <id>.png for every evaluated id)')
  try:
    with Image.open(path) as image:
      mode, png = image.mode, np.asarray(image)
  except (OSError, ValueError) as e:
    raise ConfigError(f'prediction {path} is not a readable PNG: {e}') from e
  if mode != 'L':
    raise ConfigError(f'prediction {path} has PIL mode {mode!r}; save single-channel 8-bit PNGs '
                      '(mode L) of mtl_jax.boundary.to_png(logits)')
  return png


def gt_path(gt_dir: pathlib.Path, dataset: str, image_id: str) -> pathlib.Path:
  """The id's ground-truth file in the reference layout (`GT_PATTERNS`)."""
  paths = [gt_dir / p.format(image_id) for p in GT_PATTERNS[dataset]]
  path = next((p for p in paths if p.is_file()), None)
  if path is None:
    raise ConfigError(f'no ground truth for id {image_id!r} under {gt_dir} (looked for '
                      f'{", ".join(p.relative_to(gt_dir).as_posix() for p in paths)})')
  return path


def read_gt(path: pathlib.Path) -> np.ndarray:
  """The LabelMap of a .mat (PASCAL-Context) or the raw values of an edge PNG (NYUD), as SEISM's
  db_gt reads them."""
  try:
    if path.suffix == '.mat':
      labels = scipy.io.loadmat(path, variable_names=['LabelMap']).get('LabelMap')
      if labels is None:
        raise ValueError('no LabelMap variable')
    else:
      with Image.open(path) as image:
        labels = np.asarray(image)
  except (OSError, ValueError) as e:
    raise ConfigError(f'ground truth {path} cannot be read: {e}') from e
  if labels.ndim != 2:
    raise ConfigError(f'ground truth {path} has shape {labels.shape}; expected an (H, W) map')
  return labels


def read_ids(spec: str, dataset: str, predictions: pathlib.Path) -> list[str]:
  """Ids of --ids: 'benchmark', 'predictions' or a file with one id per line."""
  if spec == 'predictions':
    ids = sorted(p.stem for p in predictions.glob('*.png'))
  else:
    path = BENCHMARK_IDS[dataset] if spec == 'benchmark' else pathlib.Path(spec)
    if not path.is_file():
      raise ConfigError(f'--ids: {path} is not a file (give benchmark, predictions or an id list)')
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if not ids:
    raise ConfigError(f'--ids={spec} names no image')
  return ids


def _check_size(image_id: str, png: np.ndarray, labels: np.ndarray):
  if png.shape != labels.shape[:2]:
    raise ConfigError(f'id {image_id!r}: prediction {png.shape} and ground truth '
                      f'{labels.shape[:2]} differ in size; save predictions at the original image '
                      'size (centre-crop the padding)')
  return png, labels


def _check_predictions(predictions: pathlib.Path, ids: list[str], fix: str) -> None:
  missing = [i for i in ids if not (predictions / f'{i}.png').is_file()]
  if missing:
    raise ConfigError(f'{len(missing)} of {len(ids)} predictions are missing from {predictions}, '
                      f'e.g. {missing[0]}.png ({fix})')


def dir_items(predictions: pathlib.Path, gt_dir: pathlib.Path, dataset: str, ids: list[str]):
  """(prediction, GT labels) of each id, read lazily once every file is known to exist."""
  if not gt_dir.is_dir():
    raise ConfigError(f'--gt {gt_dir} is not a directory')
  _check_predictions(predictions, ids, 'pick the images with --ids')
  paths = [gt_path(gt_dir, dataset, i) for i in ids]
  return (_check_size(i, read_prediction(predictions / f'{i}.png'), read_gt(path))
          for i, path in zip(ids, paths))


def tfds_source(dataset: str, data_dir: str, split: str):
  """The random-access TFDS source of the dataset built by data_builders/."""
  import ml_collections  # pylint: disable=g-import-not-at-top  (TFDS is slow to import)
  from mtl_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict({'name': dataset, 'data_dir': data_dir,
                                   'build_if_missing': False})
  return input_pipeline.open_data_source(cfg, split)


def tfds_items(predictions: pathlib.Path, source):
  """(prediction, GT labels) of every example of a TFDS source (`label_map`, else `edge`)."""
  ids = [_text(source[i]['id']) for i in range(len(source))]
  if not ids:
    raise ConfigError('the TFDS split has no examples')
  _check_predictions(predictions, ids, 'a slice such as --split=validation[:100] evaluates fewer')

  def items():
    for i, image_id in enumerate(ids):
      example = source[i]
      labels = example['label_map'] if 'label_map' in example else example['edge'][..., 0]
      yield _check_size(image_id, read_prediction(predictions / f'{image_id}.png'), labels)
  return items()


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def evaluate(predictions: str, dataset: str, *, gt: str | None = None,
             tfds_data_dir: str | None = None, split: str | None = None,
             ids: str = 'benchmark', num_workers: int = 1) -> dict:
  """The metrics dict the CLI prints and saves (see the module docstring)."""
  predictions_dir = pathlib.Path(predictions).expanduser()
  if dataset not in tasks_lib.DATASETS or 'edge' not in tasks_lib.DATASETS[dataset].tasks:
    raise ConfigError(f'--dataset={dataset!r} has no edge task; use pascal_context or nyud_v2')
  if not predictions_dir.is_dir():
    raise ConfigError(f'--predictions {predictions_dir} is not a directory')
  if (gt is None) == (tfds_data_dir is None):
    raise ConfigError('give exactly one ground-truth source: --gt (reference layout) or '
                      '--tfds_data_dir (TFDS dataset built by data_builders/)')
  max_dist = tasks_lib.DATASETS[dataset].edge_max_dist
  if gt is not None:
    if dataset not in GT_PATTERNS:
      raise ConfigError(f'--gt reads the reference layout of {" / ".join(GT_PATTERNS)} only; '
                        f'use --tfds_data_dir for {dataset}')
    image_ids = read_ids(ids, dataset, predictions_dir)
    items = dir_items(predictions_dir, pathlib.Path(gt).expanduser(), dataset, image_ids)
    source_text = f'{gt} ({len(image_ids)} ids from --ids={ids})'
  else:
    split = split or DEFAULT_SPLITS.get(dataset, 'validation')
    source = tfds_source(dataset, os.path.expanduser(tfds_data_dir), split)
    items = tfds_items(predictions_dir, source)
    source_text = f'TFDS {dataset} {split} in {tfds_data_dir}'
  counts = boundary.evaluate_images(items, max_dist, num_workers)
  totals, ois = boundary.reduce_counts(counts)
  rec, prec = boundary.pr_curve(totals)
  return {'dataset': dataset, 'max_dist': max_dist, 'ground_truth': source_text,
          'num_images': len(counts), **boundary.scores(totals, ois),
          'curve': {'thresholds': boundary.THRESHOLDS.tolist(), 'recall': rec.tolist(),
                    'precision': prec.tolist()}}


def write_json(path: pathlib.Path, result: dict) -> None:
  """Writes `result` to `path` atomically (a temporary file renamed into place)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(result, f, indent=1)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  f = flags.FLAGS
  logging.set_verbosity(logging.ERROR)  # TFDS's INFO / WARNING lines would bury the result
  try:
    result = evaluate(f.predictions, f.dataset, gt=f.gt, tfds_data_dir=f.tfds_data_dir,
                      split=f.split, ids=f.ids, num_workers=f.num_workers)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  output = pathlib.Path(f.output or os.path.join(f.predictions, 'boundary_metrics.json'))
  write_json(output.expanduser(), result)
  print(f'{result["dataset"]}: odsF {result["odsF"]:.2f}  oisF {result["oisF"]:.2f}  '
        f'AP {result["ap"]:.2f}  (ODS threshold {result["ods_threshold"]:g}, '
        f'{result["num_images"]} images, maxDist {result["max_dist"]})')
  print(f'wrote {output}')


def cli():
  """Entry point of the console script (pyproject.toml) and of `python -m`."""
  # Flags are defined only when run as a program (importing `evaluate` defines none).
  flags.DEFINE_string('predictions', None, 'Directory of <id>.png edge predictions.')
  flags.DEFINE_enum('dataset', None, ['pascal_context', 'nyud_v2', 'synthetic_scenes'],
                    'Dataset: picks maxDist (0.0075 / 0.011) and the ground truth.')
  flags.DEFINE_string('gt', None, 'Dataset folder in the reference layout (module docstring).')
  flags.DEFINE_string('tfds_data_dir', None, 'TFDS data dir holding the built dataset.')
  flags.DEFINE_string('split', None, 'TFDS split (default test_new PASCAL-Context, else '
                      'validation).')
  flags.DEFINE_string('ids', 'benchmark', "With --gt: 'benchmark', 'predictions' (every PNG "
                      'in --predictions) or a file of ids.')
  flags.DEFINE_integer('num_workers', os.cpu_count() or 1, 'Processes evaluating images.')
  flags.DEFINE_string('output', None, 'JSON path (default PREDICTIONS/boundary_metrics.json).')
  flags.mark_flags_as_required(['predictions', 'dataset'])
  app.run(main)


if __name__ == '__main__':
  cli()
