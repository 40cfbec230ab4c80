r"""Predictions of a trained model on a folder of images: `python -m mtl_jax.tools.predict`.

  python -m mtl_jax.tools.predict --workdir=runs/demo --images=photos --output=out
  python -m mtl_jax.tools.predict --config=configs/demo.py --weights=runs/demo/checkpoints/2500 \
      --images=photos --output=out --batch_size=16

The model: RUN/config.json (written by the trainer) or ``--config`` (then ``--config.KEY=V``
overrides work) and RUN's latest checkpoint or ``--weights`` (a workdir, checkpoints directory,
step directory or weights-only checkpoint, mtl_jax/checkpoint.py). Built by `train.Trainer`
like `launch.py --mode=eval`, so the config's dataset must be built (its data sources are
opened, not read).

Every image (.jpg, .png, .bmp, .gif, .tif, .webp, .ppm; in subfolders too; pixels as stored,
EXIF orientation not applied, as TFDS decodes) goes through the eval chain of
``config.input.augment`` (`input_pipeline.eval_transform`: 'mlore' normalises and pads to
``config.input.crop_size``, 'mtlora' resizes; docs/datasets_metrics.md §3), in batches of
``--batch_size`` (default ``config.eval_batch_size``) through the jitted eval-mode model, and the
predictions come back to the image's size as the eval path's `to_original_size` does. Written,
for a task T and an image DIR/a/b.jpg (stem a/b):

* OUTPUT/T/a/b.npy: the raw model output, float32 (h, w, channels) logits (depth: metres);
* OUTPUT/T/a/b.png, (h, w): `predictions.encode_prediction`, i.e. what
  ``config.save_predictions`` writes (the references' `get_output`, docs/datasets_metrics.md §4):
  semseg / human_parts class ids as a palette PNG (colours: the PASCAL VOC map; the pixel
  values are the ids), sal and edge 8-bit grey, normals RGB; depth as colours of the image's
  own min..max (clamped at 0 for the 'mlore' convention), that range in the PNG text chunks
  ``depth_min_m`` / ``depth_max_m``;
* OUTPUT/overview/a/b.png: the input and every task side by side, the depth panel with its
  colour bar (images under 128 px high are enlarged).

Bad input (no images, an unreadable image, a missing workdir or checkpoint, an image larger
than the 'mlore' canvas, an output path under a file): one line ``error: ...`` on stderr, exit
status 1 and nothing written. Results are written to a temporary folder renamed to OUTPUT at
the end. One process (the devices of one host).
"""

import functools
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

# TensorFlow (imported by TFDS) only opens the data sources: keep its start-up logs quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from absl import app  # pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import flags  # pylint: disable=g-import-not-at-top
from absl import logging  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from PIL import Image  # pylint: disable=g-import-not-at-top
from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
from PIL import ImageFont  # pylint: disable=g-import-not-at-top
from PIL import PngImagePlugin  # pylint: disable=g-import-not-at-top

from mtl_jax import ConfigError  # pylint: disable=g-import-not-at-top
from mtl_jax import checkpoint  # pylint: disable=g-import-not-at-top
from mtl_jax import input_pipeline  # pylint: disable=g-import-not-at-top
from mtl_jax import sharding  # pylint: disable=g-import-not-at-top
from mtl_jax import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
from mtl_jax import train  # pylint: disable=g-import-not-at-top
from mtl_jax import transforms  # pylint: disable=g-import-not-at-top
from mtl_jax.evaluators import predictions  # pylint: disable=g-import-not-at-top
from mtl_jax.tools import tool_args  # pylint: disable=g-import-not-at-top

IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.ppm', '.tif', '.tiff', '.webp')
OVERVIEW = 'overview'
_MIN_OVERVIEW_HEIGHT = 128


# -- inputs ----------------------------------------------------------------------------------------

def find_images(directory) -> list[tuple[str, pathlib.Path]]:
  """[(stem, path)] of the images under `directory`, sorted; stem = relative path without the
  extension. Hidden files and folders are skipped."""
  root = pathlib.Path(directory).expanduser()
  if not root.is_dir():
    raise ConfigError(f'--images={directory} is not a directory; give a folder of images')
  found, stems = [], {}
  for path in sorted(root.rglob('*')):
    rel = path.relative_to(root)
    if (path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file()
        or any(part.startswith('.') for part in rel.parts)):
      continue
    stem = rel.with_suffix('').as_posix()
    if stem in stems:
      raise ConfigError(f'{stems[stem]} and {path} would write the same outputs ({stem}.*); '
                        'rename one of them')
    stems[stem] = path
    found.append((stem, path))
  if not found:
    raise ConfigError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in --images={directory}; '
                      'point it at a folder of images')
  return found


def load_image(path) -> np.ndarray:
  """(h, w, 3) uint8 RGB pixels of an image file, as stored; ConfigError naming unreadable ones."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('RGB'))
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ConfigError(f'cannot read image {path}: {e}; remove or replace the file') from e


def _tuples(value):
  """JSON lists back to the tuples of the config files."""
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def _merge(defaults: dict, values: dict) -> dict:
  out = dict(defaults)
  for k, v in values.items():
    out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out


def load_config(workdir) -> ml_collections.ConfigDict:
  """WORKDIR/config.json (the trainer's copy of the run's config) over configs/common.py's
  defaults, so keys added since the run was trained have their default values."""
  from configs import common  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(workdir).expanduser() / 'config.json'
  if not path.parent.is_dir():
    raise ConfigError(f'--workdir={workdir} does not exist; give the workdir of a training run')
  if not path.is_file():
    raise ConfigError(f'no config.json in --workdir={workdir}; give the workdir of a training '
                      'run (launch.py writes it there) or pass --config=configs/<file>.py')
  try:
    values = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(f'cannot read {path}: {e}; pass --config=configs/<file>.py instead') from e
  return ml_collections.ConfigDict(_merge(common.get_config().to_dict(), _tuples(values)))


def check_weights(path, flag: str) -> str:
  """`path` if it holds a finished checkpoint (checkpoint.locate), else ConfigError."""
  try:
    checkpoint.locate(pathlib.Path(path).expanduser(), flag)
  except FileNotFoundError as e:
    raise ConfigError(str(e)) from e
  return os.fspath(pathlib.Path(path).expanduser())


def check_output(output, overwrite: bool, images_dir) -> tuple[pathlib.Path, pathlib.Path]:
  """(absolute OUTPUT, the existing folder the temporary output goes to) for a new path, an
  empty folder or (`overwrite`) any folder."""
  out = pathlib.Path(output).expanduser().absolute()
  existing = out
  while not existing.exists():
    existing = existing.parent
  if existing == out:
    if not out.is_dir():
      raise ConfigError(f'--output={output} is a file; choose a directory path')
    if any(out.iterdir()) and not overwrite:
      raise ConfigError(f'--output={output} exists and is not empty; choose a new path or pass '
                        '--overwrite')
    existing = out.parent
  elif not existing.is_dir():
    raise ConfigError(f'--output={output} is under the regular file {existing}; choose a path '
                      'in a directory')
  if not os.access(existing, os.W_OK):
    raise ConfigError(f'cannot write to {existing}; choose another --output')
  images = pathlib.Path(images_dir).expanduser().absolute()
  if out == images or images in out.parents:
    raise ConfigError(f'--output={output} is inside --images={images_dir}; choose a path outside '
                      'it (a second run would read the outputs as images)')
  return out, existing


def image_sizes(files) -> list[tuple[int, int]]:
  """(h, w) of every image, each decoded once: an unreadable one fails before anything runs."""
  return [load_image(path).shape[:2] for _, path in files]


def check_sizes(config, files, sizes) -> None:
  """The 'mlore' eval pads and never resizes: every image must fit ``config.input.crop_size``."""
  canvas = tuple(int(s) for s in config.input.crop_size)
  for (_, path), (h, w) in zip(files, sizes):
    if config.input.augment == 'mlore' and (h > canvas[0] or w > canvas[1]):
      raise ConfigError(
          f'image {path} is {h}x{w}, larger than config.input.crop_size {canvas}: the mlore eval '
          'pads and never resizes (docs/datasets_metrics.md §3.1); resize the image or pass '
          '--config=configs/<file>.py --config.input.crop_size="(H, W)"')


# -- the model -------------------------------------------------------------------------------------

class Predictor:
  """The eval-mode model of `config` with the weights of checkpoint `weights`, batched.

  `trainer`: the `train.Trainer` (mesh, eval graph, state shardings); `predict(images)` returns
  each image's {task: (h, w, channels) float32} at its original size.
  """

  def __init__(self, config, weights, batch_size: int = 0, workdir=None):
    self.trainer = trainer = train.Trainer(config, workdir or weights)
    self.config, self.tasks, mesh = trainer.config, trainer.tasks, trainer.mesh
    self.batch_size = int(batch_size or self.config.get('eval_batch_size')
                          or self.config.batch_size)
    if self.batch_size <= 0 or self.batch_size % mesh.size:
      raise ConfigError(f'--batch_size={self.batch_size} is not a positive multiple of the '
                        f'{mesh.size} devices; use a multiple of {mesh.size}')
    self.transform = input_pipeline.eval_transform(self.config, {})
    self.canvas = tuple(int(s) for s in self.config.input.crop_size)
    self.state = trainer.init_state(weights)
    batch = sharding.batch_sharding(mesh)
    self._forward = jax.jit(self._forward_fn, out_shardings=batch, in_shardings=(
        trainer.state_sharding, sharding.replicated(mesh), batch))

  def _forward_fn(self, state, rest, image):
    preds, _ = self.trainer.model(self.trainer.eval_graph, state, rest)(image)
    return {name: preds[name] for name in self.tasks}

  def preprocess(self, image: np.ndarray) -> np.ndarray:
    """The eval chain's model input of one (h, w, 3) uint8 image."""
    return self.transform.map({'image': image})['image']

  def predict(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Predictions of `images`, `batch_size` at a time (the last batch padded)."""
    pad = transforms.dummy_example({}, self.canvas)['image']
    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      batch = [self.preprocess(image) for image in chunk]
      batch += [pad] * (self.batch_size - len(batch))
      inputs = sharding.global_batch({'image': np.stack(batch)}, self.trainer.mesh)['image']
      preds = jax.device_get(self._forward(self.state, self.trainer.rest, inputs))
      for i, image in enumerate(chunk):
        out.append({name: predictions.to_original_size(p[i], image.shape[:2],
                                                       self.config.input.augment)
                    for name, p in preds.items()})
    return out


# -- outputs ---------------------------------------------------------------------------------------

def task_png(task: tasks_lib.Task, pred: np.ndarray, convention: str
             ) -> tuple[Image.Image, tuple[float, float] | None]:
  """(the task's PNG of one (h, w, C) prediction, depth's (min, max) metres or None)."""
  value = predictions.encode_prediction(task, pred, convention)
  if task.kind == 'segmentation':
    image = Image.fromarray(value)
    image.putpalette(tasks_lib.palette(256).ravel().tolist())  # 'L' -> 'P': values stay the ids
    return image, None
  if task.kind != 'depth':
    return Image.fromarray(value), None
  finite = value[np.isfinite(value)]
  depth_range = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
  image = Image.fromarray(tasks_lib.render(task, value[..., None], depth_range=depth_range))
  image.info.update(depth_min_m=f'{depth_range[0]:.6g}', depth_max_m=f'{depth_range[1]:.6g}')
  return image, depth_range


def _save_png(path: pathlib.Path, image: Image.Image) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  info = PngImagePlugin.PngInfo()
  for key, value in image.info.items():
    if isinstance(value, str):
      info.add_text(key, value)
  image.save(path, format='PNG', pnginfo=info)


@functools.cache
def _font():
  return ImageFont.load_default()


def _colour_bar(task: tasks_lib.Task, height: int, depth_range: tuple[float, float],
                font) -> np.ndarray:
  """A vertical ramp (max at the top) labelled with the range in metres."""
  lo, hi = depth_range
  bar = np.full((height, 64, 3), 255, np.uint8)
  ramp = np.linspace(hi, lo, height, dtype=np.float32)[:, None, None] * np.ones((1, 10, 1))
  bar[:, 2:12] = tasks_lib.render(task, ramp, depth_range=depth_range)
  image = Image.fromarray(bar)
  draw = ImageDraw.Draw(image)
  draw.text((15, 0), f'{hi:.3g} m', fill=(0, 0, 0), font=font)
  draw.text((15, height - 12), f'{lo:.3g} m', fill=(0, 0, 0), font=font)
  return np.asarray(image)


def overview(image: np.ndarray, panels: list[tuple[str, np.ndarray]], tasks,
             depth_range: tuple[float, float] | None) -> np.ndarray:
  """The input, then each (title, (h, w, 3)) panel, titled; depth followed by its colour bar."""
  scale = -(-_MIN_OVERVIEW_HEIGHT // image.shape[0])  # nearest-neighbour enlargement of tiny ones
  enlarge = lambda x: np.repeat(np.repeat(x, scale, 0), scale, 1)
  font = _font()
  columns = []
  for title, panel in [('input', image)] + panels:
    panel = enlarge(panel)
    if depth_range is not None and title in tasks and tasks[title].kind == 'depth':
      panel = np.concatenate([panel, _colour_bar(tasks[title], panel.shape[0], depth_range,
                                                 font)], axis=1)
    header = Image.new('RGB', (panel.shape[1], 14), (255, 255, 255))
    ImageDraw.Draw(header).text((2, 1), title, fill=(0, 0, 0), font=font)
    columns.append(np.concatenate([np.asarray(header), panel], axis=0))
  gap = np.full((columns[0].shape[0], 4, 3), 255, np.uint8)
  return np.concatenate([c for column in columns for c in (column, gap)][:-1], axis=1)


def save_outputs(root: pathlib.Path, stem: str, image: np.ndarray, preds: dict, tasks: dict,
                 convention: str) -> None:
  """ROOT/<task>/<stem>.npy and .png for every task, ROOT/overview/<stem>.png."""
  panels, depth_range = [], None
  for name, task in tasks.items():
    pred = np.asarray(preds[name], np.float32)
    (root / name / stem).parent.mkdir(parents=True, exist_ok=True)
    np.save(root / name / f'{stem}.npy', pred)
    png, task_range = task_png(task, pred, convention)
    _save_png(root / name / f'{stem}.png', png)
    depth_range = task_range or depth_range
    panels.append((name, np.asarray(png.convert('RGB'))))
  _save_png(root / OVERVIEW / f'{stem}.png',
            Image.fromarray(overview(image, panels, tasks, depth_range)))


def _publish(tmp: pathlib.Path, out: pathlib.Path) -> None:
  """Renames the finished `tmp` folder to `out` (replacing an existing folder)."""
  out.parent.mkdir(parents=True, exist_ok=True)
  old = None
  if out.exists():
    old = pathlib.Path(f'{tmp}.old')
    os.rename(out, old)
  shutil.move(os.fspath(tmp), os.fspath(out))
  if old is not None:
    shutil.rmtree(old)


# -- the tool --------------------------------------------------------------------------------------

def run(images, output, *, config=None, workdir=None, weights=None, batch_size: int = 0,
        overwrite: bool = False) -> int:
  """Writes the predictions of every image under `images` to `output` (module docstring);
  returns the number of images. Every input is checked before anything is written."""
  if workdir is None and (config is None or weights is None):
    raise ConfigError('give --workdir=RUN (a training run: its config.json and latest '
                      'checkpoint), or --config=configs/<file>.py and --weights=CHECKPOINT')
  files = find_images(images)
  out, tmp_parent = check_output(output, overwrite, images)
  logging.info('Reading %d images under %s', len(files), images)
  sizes = image_sizes(files)
  if config is None:
    config = load_config(workdir)
  check_sizes(config, files, sizes)
  weights = check_weights(weights or workdir, '--weights' if weights else '--workdir')

  predictor = Predictor(config, weights, batch_size, workdir=workdir)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'{out.name}.tmp-', dir=tmp_parent))
  try:
    start, done = time.perf_counter(), 0
    for first in range(0, len(files), predictor.batch_size):
      chunk = files[first:first + predictor.batch_size]
      images_np = [load_image(path) for _, path in chunk]
      for (stem, _), image, preds in zip(chunk, images_np, predictor.predict(images_np)):
        save_outputs(tmp, stem, image, preds, predictor.tasks, predictor.config.convention)
      done += len(chunk)
      logging.info('predict: %d/%d images (%.1f img/s)', done, len(files),
                   done / max(time.perf_counter() - start, 1e-9))
    _publish(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return len(files)


def _parse_flags(argv):
  """absl flag parsing: --help exits 0, bad flags print one `error:` line and exit 1."""
  if any(a in ('-h', '-?', '--help', '-help', '--helpshort') for a in argv[1:]):
    module_flags = flags.FLAGS.module_help(sys.modules[__name__]).split('\n', 1)[-1]
    print(f'{__doc__.rstrip()}\n\nflags:\n{module_flags}')
    sys.exit(0)
  # A config file that failed to load raises when read.
  return tool_args.parse_absl_flags(argv, check=lambda: flags.FLAGS.config)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    count = run(f.images, f.output, config=f.config, workdir=f.workdir, weights=f.weights,
                batch_size=f.batch_size, overwrite=f.overwrite)
  except ConfigError as e:
    print('error: ' + '; '.join(l.strip() for l in str(e).splitlines() if l.strip()),
          file=sys.stderr)
    sys.exit(1)
  print(f'wrote the predictions of {count} images to {os.path.abspath(f.output)}')


def cli():
  """Entry point of the console script (pyproject.toml) and of `python -m`."""
  # Flags are defined only when run as a program (importing `run` defines none).
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:args]); default: '
                                  'WORKDIR/config.json.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Training run: its config.json and latest checkpoint.')
  flags.DEFINE_string('weights', None, 'Checkpoint to use instead (workdir, checkpoints dir, '
                      'step dir or weights-only checkpoint).')
  flags.DEFINE_string('images', None, 'Folder of images (subfolders included).')
  flags.DEFINE_string('output', None, 'Output folder (new, empty, or with --overwrite).')
  flags.DEFINE_integer('batch_size', 0, 'Images per forward pass, a multiple of the devices '
                       '(0: config.eval_batch_size or config.batch_size).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing non-empty --output folder.')
  flags.mark_flags_as_required(['images', 'output'])
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  cli()
