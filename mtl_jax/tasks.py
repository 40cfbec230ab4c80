"""Task registry shared by the models, losses, metrics, input pipeline and reports.

One `Task` per dense-prediction task. Output channels depend on the dataset (number of classes)
and on the convention of the reference code being reproduced:

* ``'mlore'`` (MLoRE / InvPT / TaskPrompter, docs/mlore.md §1): saliency is a 2-way softmax
  (2 channels), losses of docs/mlore.md §4.
* ``'mtlora'`` (MTLoRA / MTI-Net, docs/mtlora.md §0, §8): saliency is 1 sigmoid channel, losses of
  docs/mtlora.md §8.

Label format everywhere in mtl_jax (NHWC, docs/datasets_metrics.md §1-2): ``semseg``,
``human_parts``, ``sal``, ``edge`` are uint8 (H, W, 1) with 255 = ignore; ``normals`` float32
(H, W, 3) in [-1, 1] with all three channels 255 = ignore; ``depth`` float32 (H, W, 1) in metres,
0 = invalid.
"""

import dataclasses

import numpy as np

from mtl_jax import ConfigError

IGNORE_INDEX = 255
CONVENTIONS = ('mlore', 'mtlora')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Class counts and task set of a dataset (docs/datasets_metrics.md §1.3, §2)."""
  tasks: tuple[str, ...]
  semseg_classes: int
  human_parts_classes: int = 0
  # Boundary-evaluation tolerance (fraction of the diagonal, docs/datasets_metrics.md §4.5).
  edge_max_dist: float = 0.0075


DATASETS = {
    'pascal_context': DatasetInfo(
        tasks=('semseg', 'human_parts', 'sal', 'normals', 'edge'),
        semseg_classes=21, human_parts_classes=7, edge_max_dist=0.0075),
    'nyud_v2': DatasetInfo(
        tasks=('semseg', 'depth', 'normals', 'edge'), semseg_classes=40, edge_max_dist=0.011),
    # The embedded demo dataset (data_builders/synthetic_scenes): every task, exact labels.
    'synthetic_scenes': DatasetInfo(
        tasks=('semseg', 'human_parts', 'sal', 'normals', 'depth', 'edge'),
        semseg_classes=7, human_parts_classes=5, edge_max_dist=0.0075),
}

# kind, label channels, label dtype, value used to pad labels (PadImage, docs/mlore.md §5.1 step 6),
# main metric and whether higher is better (used for Δm signs and "did it learn" checks).
_KINDS = {
    'semseg': ('segmentation', 1, 'uint8', IGNORE_INDEX, 'miou', True),
    'human_parts': ('segmentation', 1, 'uint8', IGNORE_INDEX, 'miou', True),
    'sal': ('saliency', 1, 'uint8', IGNORE_INDEX, 'maxf', True),
    'normals': ('normals', 3, 'float32', 0.0, 'mean', False),
    'depth': ('depth', 1, 'float32', 0.0, 'rmse', False),
    'edge': ('edge', 1, 'uint8', IGNORE_INDEX, 'loss', False),
}
TASK_NAMES = tuple(_KINDS)


@dataclasses.dataclass(frozen=True)
class Task:
  """One dense prediction task as configured for a dataset and convention."""
  name: str
  kind: str
  num_outputs: int
  label_channels: int
  label_dtype: str
  pad_value: float
  main_metric: str
  higher_is_better: bool
  num_classes: int = 0  # segmentation tasks only


def dataset_kind(name: str) -> str:
  """Registry key of a TFDS dataset name: 'pascal_context/full:1.0.0' -> 'pascal_context'.

  The one place that parses `config.dataset.name` for the registry (a bare key passes through).
  """
  return name.split(':')[0].split('/')[0]


def config_tasks(config) -> dict[str, 'Task']:
  """The tasks of a config: `config.tasks` on `config.dataset.name`, `config.convention`."""
  return get_tasks(config.tasks, config.dataset.name, config.convention)


def num_outputs(name: str, dataset: str, convention: str = 'mlore') -> int:
  """Prediction channels of `name` (docs/mlore.md §1, docs/mtlora.md §0)."""
  info = DATASETS[dataset_kind(dataset)]
  return {
      'semseg': info.semseg_classes,
      'human_parts': info.human_parts_classes,
      'sal': 2 if convention == 'mlore' else 1,
      'normals': 3,
      'depth': 1,
      'edge': 1,
  }[name]


def get_tasks(names, dataset: str, convention: str = 'mlore') -> dict[str, Task]:
  """Tasks in the order given; `dataset` a registry key or a TFDS name (`dataset_kind`).
  Raises ConfigError naming the fix for unknown inputs."""
  dataset = dataset_kind(dataset)
  if dataset not in DATASETS:
    raise ConfigError(f'unknown dataset {dataset!r}; known: {", ".join(DATASETS)} '
                     '(set --config.dataset.name)')
  if convention not in CONVENTIONS:
    raise ConfigError(f'unknown convention {convention!r}; known: {", ".join(CONVENTIONS)} '
                     '(set --config.convention)')
  if isinstance(names, str):
    names = [n for n in names.split(',') if n]
  if not names:
    raise ConfigError('config.tasks is empty; list at least one task (e.g. --config.tasks=semseg)')
  info = DATASETS[dataset]
  tasks = {}
  for name in names:
    if name not in _KINDS:
      raise ConfigError(f'unknown task {name!r} in config.tasks; known tasks: '
                       f'{", ".join(TASK_NAMES)} (fix --config.tasks)')
    if name not in info.tasks:
      raise ConfigError(f'task {name!r} is not labelled in dataset {dataset!r}, which has '
                       f'{", ".join(info.tasks)} (fix --config.tasks)')
    if name in tasks:
      raise ConfigError(f'task {name!r} is listed twice in config.tasks')
    kind, channels, dtype, pad, metric, higher = _KINDS[name]
    if name == 'sal' and convention == 'mtlora':
      metric = 'miou'  # MTLoRA's tables and Δm use the per-image saliency mIoU (mtlora.md §9)
    n_out = num_outputs(name, dataset, convention)
    tasks[name] = Task(name=name, kind=kind, num_outputs=n_out, label_channels=channels,
                       label_dtype=dtype, pad_value=pad, main_metric=metric,
                       higher_is_better=higher,
                       num_classes=n_out if kind == 'segmentation' else 0)
  return tasks


# ------------------------------------------------------------------------------------------------
# Rendering predictions and labels as RGB uint8 images (for TensorBoard and PNG grids).

def palette(n: int) -> np.ndarray:
  """The PASCAL VOC colour map (bit-interleaved), extended to n entries: (n, 3) uint8."""
  pal = np.zeros((n, 3), np.uint8)
  for i in range(n):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    pal[i] = (r, g, b)
  return pal


def _ramp(x: np.ndarray) -> np.ndarray:
  """A perceptually ordered dark-blue -> yellow ramp for x in [0, 1]."""
  stops = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
                   np.float32)
  x = np.clip(x, 0.0, 1.0) * (len(stops) - 1)
  lo = np.floor(x).astype(int).clip(0, len(stops) - 2)
  w = (x - lo)[..., None]
  return ((1 - w) * stops[lo] + w * stops[lo + 1]).astype(np.uint8)


def render(task: Task, pred: np.ndarray, *, is_label: bool = False,
           depth_range: tuple[float, float] | None = None) -> np.ndarray:
  """Renders a prediction (raw logits, (H, W, num_outputs)) or a label as (H, W, 3) uint8.

  Ignored label pixels are drawn black.
  """
  pred = np.asarray(pred)
  if task.kind == 'segmentation':
    ids = pred[..., 0].astype(np.int64) if is_label else pred.argmax(-1)
    out = palette(256)[np.clip(ids, 0, 255)]
    out[ids == IGNORE_INDEX] = 0
    return out
  if task.kind in ('saliency', 'edge'):
    if is_label:
      lab = pred[..., 0]
      p = np.where(lab == IGNORE_INDEX, 0.0, lab.astype(np.float32))
    elif pred.shape[-1] == 2:  # 2-way softmax (mlore saliency)
      e = np.exp(pred - pred.max(-1, keepdims=True))
      p = e[..., 1] / e.sum(-1)
    else:
      p = 1.0 / (1.0 + np.exp(-pred[..., 0]))
    return np.repeat((p * 255).astype(np.uint8)[..., None], 3, axis=-1)
  if task.kind == 'normals':
    n = pred.astype(np.float32)
    invalid = np.all(n == IGNORE_INDEX, axis=-1) if is_label else np.zeros(n.shape[:-1], bool)
    n = n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    out = ((n + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    out[invalid] = 0
    return out
  if task.kind == 'depth':
    d = pred[..., 0].astype(np.float32)
    lo, hi = depth_range if depth_range else (0.0, max(float(d.max()), 1e-6))
    out = _ramp((d - lo) / max(hi - lo, 1e-6))
    if is_label:
      out[d <= 0] = 0
    return out
  raise ValueError(f'cannot render task kind {task.kind!r}')
