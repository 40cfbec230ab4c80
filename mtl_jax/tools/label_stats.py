r"""Label statistics of a dataset split: `python -m mtl_jax.tools.label_stats --config=...`.

  python -m mtl_jax.tools.label_stats --config=configs/demo.py --split=train
  python -m mtl_jax.tools.label_stats --config=configs/demo.py --split=validation \
      --max_examples=200 --config.tasks=semseg,depth

Reads the split through the input pipeline's data source (`input_pipeline.open_data_source`, so
the same TFDS dataset as training) and looks at each task of ``config.tasks`` as the pipeline sees
it before any augmentation: `transforms.select` + `transforms.add_ignore_regions` (the decoded
labels with the references' ignore regions: human-part maps without parts and zero normals become
255), no resize and no padding. Per task it prints (the port of the user's fork's
`scripts/label_stats.py`, docs/user_fork.md §7):

* segmentation, saliency, edge: pixels, ignore (255) fraction, range of the other values, values
  outside 0..classes-1 (a decoding bug if any), the class histogram, and examples whose whole map
  is ignored;
* normals: ignored pixels, range of the vector norm and of each channel over the valid pixels;
* depth: invalid (<= 0 or non-finite) fraction, min / mean / max over the valid pixels, and
  pixels beyond MLoRE's 80 m evaluation cap.
"""

import os
import sys

# TensorFlow (imported by TFDS) only reads data here: keep its start-up logs quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top,g-bad-import-order
from absl import flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from mtl_jax import ConfigError  # pylint: disable=g-import-not-at-top
from mtl_jax import input_pipeline  # pylint: disable=g-import-not-at-top
from mtl_jax import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
from mtl_jax import transforms  # pylint: disable=g-import-not-at-top

MAX_DEPTH_M = 80.0  # MLoRE's depth evaluation mask 0 < gt < 80 (docs/datasets_metrics.md §4.4)


def _new_stats(task: tasks_lib.Task) -> dict:
  if task.kind == 'normals':
    return {'pixels': 0, 'ignore': 0, 'norm_min': np.inf, 'norm_max': -np.inf,
            'channel_min': np.full(3, np.inf), 'channel_max': np.full(3, -np.inf)}
  if task.kind == 'depth':
    return {'pixels': 0, 'valid': 0, 'non_finite': 0, 'sum': 0.0, 'min': np.inf,
            'max': -np.inf, 'beyond_cap': 0}
  return {'pixels': 0, 'ignore': 0, 'histogram': np.zeros(256, np.int64),
          'all_ignore_examples': 0,
          'classes': task.num_classes if task.kind == 'segmentation' else 2}


def _update(stats: dict, task: tasks_lib.Task, label: np.ndarray) -> None:
  stats['pixels'] += label.shape[0] * label.shape[1]
  if task.kind == 'normals':
    ignore = np.all(label == tasks_lib.IGNORE_INDEX, axis=-1)
    stats['ignore'] += int(ignore.sum())
    valid = label[~ignore].astype(np.float64)
    if valid.size:
      norm = np.linalg.norm(valid, axis=-1)
      stats['norm_min'] = min(stats['norm_min'], float(norm.min()))
      stats['norm_max'] = max(stats['norm_max'], float(norm.max()))
      stats['channel_min'] = np.minimum(stats['channel_min'], valid.min(0))
      stats['channel_max'] = np.maximum(stats['channel_max'], valid.max(0))
  elif task.kind == 'depth':
    depth = label[..., 0].astype(np.float64)
    finite = np.isfinite(depth)
    valid = depth[finite & (depth > 0)]
    stats['non_finite'] += int((~finite).sum())
    stats['valid'] += valid.size
    stats['beyond_cap'] += int((valid >= MAX_DEPTH_M).sum())
    if valid.size:
      stats['sum'] += float(valid.sum())
      stats['min'] = min(stats['min'], float(valid.min()))
      stats['max'] = max(stats['max'], float(valid.max()))
  else:
    histogram = np.bincount(label.ravel(), minlength=256)
    stats['histogram'] += histogram
    stats['ignore'] += int(histogram[tasks_lib.IGNORE_INDEX])
    stats['all_ignore_examples'] += int(histogram[tasks_lib.IGNORE_INDEX] == label.size)


def compute(config, split: str, max_examples: int = 0) -> dict:
  """`summarize` of the first `max_examples` (0: all) examples of the configured `split`."""
  tasks = tasks_lib.config_tasks(config)
  source = input_pipeline.open_data_source(config.dataset, split)
  count = min(max_examples, len(source)) if max_examples > 0 else len(source)
  return summarize(source, tasks, count)


def summarize(source, tasks: dict[str, tasks_lib.Task], count: int) -> dict:
  """{'examples': count, 'sizes': {(H, W): examples}, task: stats} of source[:count]."""
  out = {'examples': count, 'sizes': {}, **{name: _new_stats(t) for name, t in tasks.items()}}
  for i in range(count):
    sample = transforms.add_ignore_regions(transforms.select(source[i], tasks))
    size = sample['image'].shape[:2]
    out['sizes'][size] = out['sizes'].get(size, 0) + 1
    for name, task in tasks.items():
      _update(out[name], task, sample[name])
  return out


def _percent(part: int, whole: int) -> str:
  return f'{100.0 * part / max(whole, 1):.2f}%'


def format_report(stats: dict, title: str) -> str:
  """The printed report of `compute`'s result."""
  sizes = stats['sizes']
  lines = [f'{title}: {stats["examples"]} examples']
  if sizes:
    lines[0] += (f', image sizes (H x W) {min(sizes)[0]}..{max(sizes)[0]} x '
                 f'{min(s[1] for s in sizes)}..{max(s[1] for s in sizes)}, {len(sizes)} distinct')
  for name, s in stats.items():
    if name in ('examples', 'sizes'):
      continue
    px = s['pixels']
    if 'histogram' in s:
      hist, classes = s['histogram'], s['classes']
      values = np.nonzero(hist)[0]
      labelled = values[values != tasks_lib.IGNORE_INDEX]
      outside = labelled[labelled >= classes]
      lines.append(
          f'{name} ({classes} classes): {px} px, ignore (255) {_percent(s["ignore"], px)}, '
          f'values {labelled.min() if labelled.size else "-"}..'
          f'{labelled.max() if labelled.size else "-"}, outside 0..{classes - 1}: '
          f'{int(hist[outside].sum())} px' + (f' (values {outside.tolist()[:10]})'
                                               if outside.size else '') +
          f', maps fully ignored: {s["all_ignore_examples"]} / {stats["examples"]} examples')
      valid = max(px - s['ignore'], 1)
      lines.append('  class %: ' + '  '.join(f'{v}: {100.0 * hist[v] / valid:.2f}'
                                            for v in labelled))
    elif 'norm_min' in s:
      lines.append(f'{name}: {px} px, ignore (255) {_percent(s["ignore"], px)}')
      if s['ignore'] < px:
        lines.append(f'  valid norm {s["norm_min"]:.4f}..{s["norm_max"]:.4f}, channel ranges '
                     + ', '.join(f'{a:.3f}..{b:.3f}'
                                 for a, b in zip(s['channel_min'], s['channel_max'])))
    else:
      line = (f'{name}: {px} px, invalid (<= 0) {_percent(px - s["valid"], px)}, non-finite '
              f'{s["non_finite"]} px')
      if s['valid']:
        line += (f', valid {s["min"]:.4f}..{s["max"]:.4f} m (mean {s["sum"] / s["valid"]:.4f}),'
                 f' >= {MAX_DEPTH_M:g} m: {s["beyond_cap"]} px')
      lines.append(line)
  return '\n'.join(lines)


def main(argv):
  del argv
  config = flags.FLAGS.config
  split = flags.FLAGS.split or config.dataset.train_split
  try:
    stats = compute(config, split, flags.FLAGS.max_examples)
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(format_report(stats, f'{config.dataset.name} {split}'))
  return 0


def cli():
  """Entry point of the console script (pyproject.toml) and of `python -m`."""
  # Flags are defined only when run as a program, so that importing `compute` (tests, notebooks)
  # does not clash with other tools' --config flag.
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:args]).',
                                  lock_config=True)
  flags.DEFINE_string('split', None, 'TFDS split (default: config.dataset.train_split).')
  flags.DEFINE_integer('max_examples', 0, 'Read at most this many examples (0: the whole split).')
  flags.mark_flags_as_required(['config'])
  app.run(main)


if __name__ == '__main__':
  cli()
