"""Evaluation metrics as `clu.metrics` (docs/datasets_metrics.md §4, docs/mlore.md §6,
docs/mtlora.md §9).

Every metric accumulates dataset-level **sufficient statistics** (pixel counts and sums, or sums of
per-image values), exactly as the reference meters pool them, and turns them into numbers only in
`compute`. Contract with the trainer:

* `from_model_output(preds, batch)` runs under `jax.jit` on global (sharded) batches; its leaves are
  small replicated arrays: int32 counts and float32 sums of one batch, so the statistics are
  global over the devices and hosts of the mesh.
* On the host the per-batch metrics are `jax.device_get`-ed, integer leaves widened to int64 and
  float leaves to float64, and merged with `merge`, which only adds leaves (numpy or jax).
* `compute` runs on the host with numpy (float64) and returns a dict of Python floats; a
  `Collection` therefore computes to ``{task: {metric: value}}`` and `flatten` turns that into
  ``{'task/metric': value}`` for logging.

Examples whose ``batch['example_valid']`` is False (padding of the last eval batch) contribute
nothing. The evaluation *protocol* (`make_metrics`, ``config.eval_protocol``) picks the reported
keys, named as the reference prints them; the resolution the metrics see is the input
pipeline's (``config.input.augment``: 'mlore' pads to the original resolution, padding ignored;
'mtlora' resizes image and labels). The task registry's `main_metric` is one of the keys of the
protocol of the same name.

``'mlore'`` (MLoRE / InvPT meters, docs/mlore.md §6):

* segmentation: `miou` (x100, mean over all classes, absent classes count 0), `pixel_acc`.
* saliency: `maxf` (InvPT "maxF" incl. the double-sigmoid quirk, what the papers publish) and
  `maxf_correct` (the same pooled F-beta without the second sigmoid).
* normals: `mean` (the reference's only number) and the full ASTMT statistics `median`, `rmse`,
  `within_11.25`, `within_22.5`, `within_30` (degrees / %). The median comes from a histogram with
  0.01° bins centred on multiples of 0.01° (error <= 0.005°).
* depth: `rmse`, `log_rmse`, `abs_rel`, `sq_rel` (DepthMeter, valid 0 < gt < 80) and
  `rmse_predict_mean`, the RMSE of predicting the mean depth of the evaluated pixels (the trivial
  baseline).
* edge: `loss`, the references' loss proxy (not ODS-F; the trainer adds `odsF`, `oisF`, `ap`
  with ``config.eval_boundary``).

``'mtlora'`` (MTLoRA meters, docs/mtlora.md §9, docs/datasets_metrics.md §4.2-4.4):

* segmentation: `miou`, `pixel_acc`.
* saliency: `beta_maxf` (its "Beta maxF" = the quirk above), `maxf` (per-image protocol,
  beta^2 = 1) and `miou` (per-image Jaccard, max over 15 thresholds: the paper's number).
* normals: `mean` (v1: acos of the dot product with the label as is), `rmse` (= `mean`, the
  reference's bug), `mean_v2` (the InvPT angle), `rmse_v2` (= `mean_v2`).
* depth: `rmse`, `log_rmse` (valid gt > 0, no upper bound), `rmse_predict_mean`.
* edge: `loss`.
"""

import operator
from collections.abc import Mapping
from typing import ClassVar

from clu import metrics as clu_metrics
import flax
import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax import ConfigError
from mtl_jax.losses import weighted_bce_per_pixel
from mtl_jax.tasks import IGNORE_INDEX, Task

# InvPT/MLoRE SaliencyMeter thresholds, `torch.arange(0.05, 1, 0.05)` in float32 (19 values).
BETA_THRESHOLDS = np.arange(0.05, 1, 0.05).astype(np.float32)
BETA_SQUARED = 0.3
# MTLoRA/ASTMT SaliencyMeterWithNoBeta thresholds (15 values, compared in float32 with `>`).
MTLORA_THRESHOLDS = np.linspace(0.2, 0.9, 15).astype(np.float32)
NORMALS_BIN_DEG = 0.01
NORMALS_BINS = int(round(180 / NORMALS_BIN_DEG)) + 1
NORMALS_WITHIN_DEG = (11.25, 22.5, 30.0)
# MLoRE DepthMeter evaluation range (depth_min / depth_max of the NYUD configs).
DEPTH_MIN, DEPTH_MAX = 0.0, 80.0
PROTOCOLS = ('mlore', 'mtlora')


def _isum(x: jax.Array, axis=None) -> jax.Array:
  return jnp.sum(x, axis=axis, dtype=jnp.int32)


def _divide(a, b):
  """a / b in float64 with 0/0 -> nan and no warnings (host side)."""
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.asarray(a, np.float64) / np.asarray(b, np.float64)


@flax.struct.dataclass
class TaskMetric(clu_metrics.Metric):
  """Base class: a metric of one task; `for_task` binds the task name (like clu's `from_output`)."""
  task: ClassVar[str] = ''
  protocol: ClassVar[str] = 'mlore'  # one of PROTOCOLS: picks the keys `compute` returns

  @classmethod
  def for_task(cls, task: Task, **options):
    """Subclass reading ``preds[task.name]``, ``batch[task.name]``; `options`: class attributes."""
    attrs = {'task': task.name, **options}
    return flax.struct.dataclass(type(f'{cls.__name__}_{task.name}', (cls,), attrs))

  @classmethod
  def _inputs(cls, preds: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]):
    """(float32 prediction, label, (B, 1, 1) example mask)."""
    if 'example_valid' not in batch:
      raise KeyError("batch has no 'example_valid' (bool (B,), False for padding examples); the "
                     'eval input pipeline must provide it')
    example = jnp.asarray(batch['example_valid'], bool)[:, None, None]
    return jnp.asarray(preds[cls.task], jnp.float32), jnp.asarray(batch[cls.task]), example

  def merge(self, other):
    return jax.tree.map(operator.add, self, other)


@flax.struct.dataclass
class SegmentationMetric(TaskMetric):
  """Confusion counts (rows GT, columns prediction) -> mIoU, pixel accuracy (§4.1)."""
  confusion: jax.Array  # (K, K)
  num_classes: ClassVar[int] = 0

  @classmethod
  def from_model_output(cls, preds, batch, **_):
    pred, label, example = cls._inputs(preds, batch)
    label = label[..., 0].astype(jnp.int32)
    valid = (label != IGNORE_INDEX) & example
    k = cls.num_classes
    # One-hot matmul per image (exact: 0/1 inputs, per-image counts < 2^24 in f32 accumulation).
    gt = jax.nn.one_hot(jnp.where(valid, label, -1), k, dtype=jnp.bfloat16)
    pr = jax.nn.one_hot(jnp.argmax(pred, axis=-1), k, dtype=jnp.bfloat16)
    confusion = jnp.einsum('bhwk,bhwl->bkl', gt, pr, preferred_element_type=jnp.float32)
    return cls(confusion=_isum(confusion.astype(jnp.int32), axis=0))

  @classmethod
  def empty(cls):
    return cls(confusion=np.zeros((cls.num_classes,) * 2, np.int64))

  def compute(self):
    conf = np.asarray(self.confusion, np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    iou = tp / np.maximum(union, 1e-8)
    return {'miou': 100 * float(iou.mean()),
            'pixel_acc': 100 * float(tp.sum() / max(conf.sum(), 1.0))}


@flax.struct.dataclass
class SaliencyMetric(TaskMetric):
  """Saliency maxF of both families (§4.2).

  prob = softmax[..., 1] (2 channels, MLoRE) or sigmoid (1 channel, MTLoRA); valid = label != 255.
  Pooled counts per threshold t of BETA_THRESHOLDS (`>=`): TP, predicted positives PP (for
  sigmoid(prob), the quirk, and for prob), actual positives AP. Per image and threshold of
  MTLORA_THRESHOLDS (`>`): Jaccard (1 if GT and prediction are both empty), precision
  tp/(tp+fp+1e-12) and recall tp/(tp+fn+1e-12), summed over images.
  """
  tp_quirk: jax.Array  # (19,)
  pp_quirk: jax.Array  # (19,)
  tp: jax.Array  # (19,)
  pp: jax.Array  # (19,)
  ap: jax.Array  # ()
  jaccard: jax.Array  # (15,) sums over images
  precision: jax.Array  # (15,)
  recall: jax.Array  # (15,)
  num_images: jax.Array  # ()

  @classmethod
  def from_model_output(cls, preds, batch, **_):
    pred, label, example = cls._inputs(preds, batch)
    if pred.shape[-1] == 2:
      prob = jax.nn.softmax(pred, axis=-1)[..., 1]
    else:
      prob = jax.nn.sigmoid(pred[..., 0])
    label = label[..., 0]
    valid = (label != IGNORE_INDEX) & example
    gt = valid & (label > 0)

    def pooled(p):  # (TP, PP) over all pixels, per beta threshold
      above = (p[..., None] >= BETA_THRESHOLDS) & valid[..., None]
      return _isum(above & gt[..., None], (0, 1, 2)), _isum(above, (0, 1, 2))

    tp_quirk, pp_quirk = pooled(jax.nn.sigmoid(prob))
    tp, pp = pooled(prob)

    above = (prob[..., None] > MTLORA_THRESHOLDS) & valid[..., None]  # (B, H, W, 15)
    img_tp = _isum(above & gt[..., None], (1, 2)).astype(jnp.float32)
    img_pp = _isum(above, (1, 2)).astype(jnp.float32)
    img_ap = _isum(gt, (1, 2)).astype(jnp.float32)[:, None]
    union = img_pp + img_ap - img_tp
    jaccard = jnp.where(union == 0, 1.0, img_tp / jnp.maximum(union, 1.0))
    precision = img_tp / (img_pp + 1e-12)
    recall = img_tp / (img_ap + 1e-12)
    image = example[:, 0]  # (B, 1)
    per_image_sum = lambda v: jnp.sum(jnp.where(image, v, 0.0), axis=0)
    return cls(tp_quirk=tp_quirk, pp_quirk=pp_quirk, tp=tp, pp=pp, ap=_isum(gt),
               jaccard=per_image_sum(jaccard), precision=per_image_sum(precision),
               recall=per_image_sum(recall), num_images=_isum(image))

  @classmethod
  def empty(cls):
    nb, nm = len(BETA_THRESHOLDS), len(MTLORA_THRESHOLDS)
    zi, zf = np.zeros(nb, np.int64), np.zeros(nm, np.float64)
    return cls(tp_quirk=zi, pp_quirk=zi, tp=zi, pp=zi, ap=np.int64(0), jaccard=zf, precision=zf,
               recall=zf, num_images=np.int64(0))

  def compute(self):
    def max_fbeta(tp, pp):
      p, r = _divide(tp, pp), _divide(tp, self.ap)
      with np.errstate(invalid='ignore'):
        f = (1 + BETA_SQUARED) * p * r / (BETA_SQUARED * p + r)
      return 100 * float(np.max(np.nan_to_num(f, nan=0.0)))

    quirk = max_fbeta(self.tp_quirk, self.pp_quirk)
    if self.protocol == 'mlore':
      return {'maxf': quirk, 'maxf_correct': max_fbeta(self.tp, self.pp)}
    m_prec = _divide(self.precision, self.num_images)
    m_rec = _divide(self.recall, self.num_images)
    f_mtlora = 2 * m_prec * m_rec / (m_prec + m_rec + 1e-12)
    return {'beta_maxf': quirk, 'maxf': 100 * float(np.max(f_mtlora)),
            'miou': 100 * float(np.max(_divide(self.jaccard, self.num_images)))}


def _unit(x: jax.Array) -> jax.Array:
  """L2-normalise over the last axis; zero vectors stay 0 (reference `normalize_tensor`)."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return jnp.where(norm == 0, 0.0, x / jnp.where(norm == 0, 1.0, norm))


@flax.struct.dataclass
class NormalsMetric(TaskMetric):
  """Angular error 2·atan2(|p-g|, |p+g|) of the unit vectors, in degrees (§4.3, InvPT formula).

  Valid = no GT channel equals 255. Sums, counts below 11.25/22.5/30° (strict `<`) and a
  histogram of 0.01° bins for the median. Plus MTLoRA's v1 angle: acos(clip(p·g, -1, 1)) with p
  the unit prediction after the 0-255 encoding round trip, g the label as is, both zeroed on
  channels where the label is 255; valid = label channel 0 != 255.
  """
  sum_deg_v1: jax.Array
  count_v1: jax.Array
  sum_deg: jax.Array
  sum_deg_sq: jax.Array
  count: jax.Array
  within: jax.Array  # (3,)
  hist: jax.Array  # (NORMALS_BINS,)

  @classmethod
  def from_model_output(cls, preds, batch, **_):
    pred, label, example = cls._inputs(preds, batch)
    label = label.astype(jnp.float32)
    valid = jnp.all(label != IGNORE_INDEX, axis=-1) & example
    p, g = _unit(pred), _unit(label)
    deg = jnp.rad2deg(2 * jnp.arctan2(jnp.linalg.norm(p - g, axis=-1),
                                      jnp.linalg.norm(p + g, axis=-1)))
    deg = jnp.where(valid, deg, 0.0)
    # MTLoRA v1 (get_output's F.normalize, eps 1e-12, then `2 * (255 (u + 1) / 2) / 255 - 1`).
    unit = pred / jnp.maximum(jnp.linalg.norm(pred, axis=-1, keepdims=True), 1e-12)
    decoded = 2 * (255 * (unit + 1) / 2) / 255 - 1
    channel_valid = label != IGNORE_INDEX
    dot = jnp.sum(jnp.where(channel_valid, decoded * label, 0.0), axis=-1)
    valid_v1 = channel_valid[..., 0] & example
    deg_v1 = jnp.where(valid_v1, jnp.rad2deg(jnp.arccos(jnp.clip(dot, -1.0, 1.0))), 0.0)
    # Per-image histograms summed over the batch: the batch axis stays local to each device (a
    # single scatter over the whole sharded batch needs an explicit output sharding).
    bins = jnp.clip(jnp.round(deg / NORMALS_BIN_DEG), 0, NORMALS_BINS - 1).astype(jnp.int32)
    hist = jax.vmap(lambda b, w: jnp.bincount(b, weights=w, length=NORMALS_BINS))(
        bins.reshape(bins.shape[0], -1), valid.reshape(valid.shape[0], -1).astype(jnp.int32))
    hist = _isum(hist, axis=0)
    within = jnp.stack([_isum(valid & (deg < t)) for t in NORMALS_WITHIN_DEG])
    return cls(sum_deg_v1=jnp.sum(deg_v1), count_v1=_isum(valid_v1), sum_deg=jnp.sum(deg),
               sum_deg_sq=jnp.sum(jnp.square(deg)), count=_isum(valid), within=within, hist=hist)

  @classmethod
  def empty(cls):
    return cls(sum_deg_v1=np.float64(0), count_v1=np.int64(0), sum_deg=np.float64(0),
               sum_deg_sq=np.float64(0), count=np.int64(0),
               within=np.zeros(len(NORMALS_WITHIN_DEG), np.int64),
               hist=np.zeros(NORMALS_BINS, np.int64))

  def compute(self):
    n = int(self.count)
    if self.protocol == 'mtlora':
      mean_v1, mean_v2 = float(_divide(self.sum_deg_v1, self.count_v1)), float(_divide(
          self.sum_deg, n))
      return {'mean': mean_v1, 'rmse': mean_v1, 'mean_v2': mean_v2, 'rmse_v2': mean_v2}
    cdf = np.cumsum(np.asarray(self.hist, np.int64))
    # numpy's median: mean of the values of (0-based) ranks (n-1)//2 and n//2.
    ranks = np.array([(n - 1) // 2, n // 2]) + 1
    median = NORMALS_BIN_DEG * float(np.searchsorted(cdf, ranks).mean()) if n else np.nan
    out = {'mean': float(_divide(self.sum_deg, n)), 'median': median,
           'rmse': float(np.sqrt(_divide(self.sum_deg_sq, n)))}
    for t, c in zip(NORMALS_WITHIN_DEG, _divide(self.within, n)):
      out[f'within_{t:g}'] = 100 * float(c)
    return out


@flax.struct.dataclass
class DepthMetric(TaskMetric):
  """Depth meters (§4.4): pred clamped >= 0 (then <= 0 -> 1e-9), valid = 0 < gt < `max_depth`
  (MLoRE DepthMeter: 80; MTLoRA: gt != 255 after 0 -> 255, i.e. no upper bound), pixel-pooled
  sums; plus sums of gt and gt^2 for the predict-the-mean baseline."""
  sum_sq: jax.Array
  sum_log_sq: jax.Array
  sum_abs_rel: jax.Array
  sum_sq_rel: jax.Array
  sum_gt: jax.Array
  sum_gt_sq: jax.Array
  count: jax.Array
  max_depth: ClassVar[float] = DEPTH_MAX

  @classmethod
  def from_model_output(cls, preds, batch, **_):
    pred, label, example = cls._inputs(preds, batch)
    p = jnp.maximum(pred[..., 0], 0.0)
    p = jnp.where(p <= 0, 1e-9, p)
    g = label[..., 0].astype(jnp.float32)
    valid = (g > DEPTH_MIN) & (g < cls.max_depth) & example
    g = jnp.where(valid, g, 1.0)
    masked_sum = lambda v: jnp.sum(jnp.where(valid, v, 0.0))
    sq = jnp.square(g - p)
    return cls(sum_sq=masked_sum(sq), sum_log_sq=masked_sum(jnp.square(jnp.log(g) - jnp.log(p))),
               sum_abs_rel=masked_sum(jnp.abs(g - p) / g), sum_sq_rel=masked_sum(sq / g),
               sum_gt=masked_sum(g), sum_gt_sq=masked_sum(jnp.square(g)), count=_isum(valid))

  @classmethod
  def empty(cls):
    z = np.float64(0)
    return cls(sum_sq=z, sum_log_sq=z, sum_abs_rel=z, sum_sq_rel=z, sum_gt=z, sum_gt_sq=z,
               count=np.int64(0))

  def compute(self):
    mean = lambda v: float(_divide(v, self.count))
    var = mean(self.sum_gt_sq) - mean(self.sum_gt) ** 2
    out = {'rmse': float(np.sqrt(mean(self.sum_sq))),
           'log_rmse': float(np.sqrt(mean(self.sum_log_sq)))}
    if self.protocol == 'mlore':
      out.update(abs_rel=mean(self.sum_abs_rel), sq_rel=mean(self.sum_sq_rel))
    out['rmse_predict_mean'] = float(np.sqrt(max(var, 0.0))) if self.count else np.nan
    return out


@flax.struct.dataclass
class EdgeMetric(TaskMetric):
  """Edge loss proxy (§4.6): sigmoid(logit) fed *as a logit* into the weighted BCE with weight
  `edge_w` on gt != 255; pooled over pixels (= the meters' sum(numel * loss) / sum(numel))."""
  loss_sum: jax.Array
  count: jax.Array
  edge_w: ClassVar[float] = 0.0

  @classmethod
  def from_model_output(cls, preds, batch, **_):
    pred, label, example = cls._inputs(preds, batch)
    per_pixel, valid = weighted_bce_per_pixel(jax.nn.sigmoid(pred[..., 0]), label[..., 0],
                                              cls.edge_w)
    valid = valid & example
    return cls(loss_sum=jnp.sum(jnp.where(valid, per_pixel, 0.0)), count=_isum(valid))

  @classmethod
  def empty(cls):
    return cls(loss_sum=np.float64(0), count=np.int64(0))

  def compute(self):
    return {'loss': float(_divide(self.loss_sum, self.count))}


_METRICS = {
    'segmentation': SegmentationMetric,
    'saliency': SaliencyMetric,
    'normals': NormalsMetric,
    'depth': DepthMetric,
    'edge': EdgeMetric,
}


def make_metrics(tasks: Mapping[str, Task], *, edge_w: float,
                 protocol: str = 'mlore') -> type[clu_metrics.Collection]:
  """A `clu.metrics.Collection` with one field per task name, reporting the keys of `protocol`
  (see the module docstring). Raises ConfigError for an unknown protocol."""
  if protocol not in PROTOCOLS:
    raise ConfigError(f'unknown evaluation protocol {protocol!r}; known: {", ".join(PROTOCOLS)} '
                      '(set --config.eval_protocol)')
  fields = {}
  for name, task in tasks.items():
    options = {'segmentation': {'num_classes': task.num_classes},
               'depth': {'max_depth': DEPTH_MAX if protocol == 'mlore' else np.inf},
               'edge': {'edge_w': edge_w}}.get(task.kind, {})
    fields[name] = _METRICS[task.kind].for_task(task, protocol=protocol, **options)
  return clu_metrics.Collection.create(**fields)


def flatten(computed: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
  """``{task: {metric: v}}`` (Collection.compute) -> ``{'task/metric': v}``."""
  return {f'{task}/{key}': value for task, values in computed.items()
          for key, value in values.items()}
