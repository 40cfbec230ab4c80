"""Training losses of the two reference codebases (docs/mlore.md §4, docs/mtlora.md §8).

Everything is pure `jax.numpy` on NHWC predictions at label resolution and labels in the
mtl_jax format (mtl_jax/tasks.py docstring), so it jits and works on globally sharded batches:
every mean is a global sum divided by a global count, never a mean of per-device means.

Per task kind, for the two conventions ("valid" excludes label 255, for depth label 0):

* segmentation (both): softmax CE, sum / #valid.
* saliency: 'mlore' 2-channel CE with class weights (1 - w, w), w = #neg / #valid over the batch,
  sum / #valid; 'mtlora' 1-channel balanced BCE-with-logits with the same w, sum / #valid.
* edge (both): BCE-with-logits with weights (w, 1 - w) for (positive, negative) pixels,
  w = `edge_w`, sum / #valid (MLoRE's BalancedBinaryCrossEntropyLoss, MTLoRA's
  BalancedCrossEntropyLoss(pos_weight=edge_w)).
* normals: 'mlore' L1 of x / max(|x|, 1e-12) over pixels with no label channel == 255, divided by
  #valid **pixels**; 'mtlora' L1 of x / (|x| + 1e-12) over label elements != 255, divided by
  #valid **elements** (a factor 3 apart).
* depth (both): L1 over label != 0, sum / #valid (MTLoRA maps 0 to 255 first: same pixels).

The only deviation: MTLoRA's saliency and edge losses have no ignore region (their labels never
contain 255); here pixels labelled 255 are excluded and the sums are divided by the number of valid
pixels, which equals the reference's `numel` whenever the labels contain no 255.

`compute_losses` adds MLoRE's load-balancing term L_cv over the router gates (docs/mlore.md §4).
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from mtl_jax.tasks import CONVENTIONS, IGNORE_INDEX, Task


def _count(mask: jax.Array) -> jax.Array:
  """Number of True entries as float32, at least 1 (so empty masks give a 0 loss)."""
  return jnp.maximum(jnp.sum(mask, dtype=jnp.float32), 1.0)


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  class_weights: jax.Array | None = None) -> jax.Array:
  """(Weighted) softmax CE over non-255 pixels, sum / #valid (docs/mlore.md §4).

  Args:
    logits: (B, H, W, K).
    labels: (B, H, W, 1) integer class ids, 255 = ignore.
    class_weights: optional (K,) per-class weights; the sum is still divided by the plain number
      of valid pixels (not by the sum of weights), as in the reference.
  """
  labels = labels[..., 0].astype(jnp.int32)
  valid = labels != IGNORE_INDEX
  safe_labels = jnp.where(valid, labels, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe_labels)
  if class_weights is not None:  # one-hot product, not a gather: works on sharded labels
    ce = ce * jnp.sum(jax.nn.one_hot(safe_labels, logits.shape[-1]) * class_weights, axis=-1)
  return jnp.sum(jnp.where(valid, ce, 0.0)) / _count(valid)


def mlore_saliency_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """2-class CE, batch-adaptive class weights (1 - w, w), w = #neg / #valid (docs/mlore.md §4)."""
  valid = labels != IGNORE_INDEX
  w = jnp.sum(valid & (labels == 0), dtype=jnp.float32) / _count(valid)
  return cross_entropy(logits, labels, class_weights=jnp.stack([1.0 - w, w]))


def weighted_bce_per_pixel(logits: jax.Array, labels: jax.Array, w: jax.Array | float
                           ) -> tuple[jax.Array, jax.Array]:
  """w·y·(-log σ(x)) + (1-w)·(1-y)·(-log(1-σ(x))) per pixel (0 where ignored), and the valid mask.

  Args:
    logits: (B, H, W) logits x.
    labels: (B, H, W) binary labels y, 255 = ignore.
    w: positive-class weight.
  """
  valid = labels != IGNORE_INDEX
  pos = valid & (labels >= 1)
  neg = valid & (labels == 0)
  per_pixel = (jnp.where(pos, w * jax.nn.softplus(-logits), 0.0)
               + jnp.where(neg, (1.0 - w) * jax.nn.softplus(logits), 0.0))
  return per_pixel, valid


def weighted_bce_with_logits(logits: jax.Array, labels: jax.Array, w: jax.Array | float
                             ) -> jax.Array:
  """`weighted_bce_per_pixel` summed over non-255 pixels / #valid.

  MLoRE's BalancedBinaryCrossEntropyLoss (pos_weight w/(1-w), result times (1-w)) and MTLoRA's
  BalancedCrossEntropyLoss (labels >= 0.5) are both this formula (docs/mlore.md §4,
  docs/mtlora.md §8). `logits` (B, H, W, 1), `labels` (B, H, W, 1).
  """
  per_pixel, valid = weighted_bce_per_pixel(logits[..., 0].astype(jnp.float32), labels[..., 0], w)
  return jnp.sum(per_pixel) / _count(valid)


def mtlora_saliency_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Balanced BCE-with-logits, w = #neg / #valid over the batch (docs/mtlora.md §8)."""
  valid = labels != IGNORE_INDEX
  w = jnp.sum(valid & (labels == 0), dtype=jnp.float32) / _count(valid)
  return weighted_bce_with_logits(logits, labels, w)


def _safe_norm(x: jax.Array) -> jax.Array:
  """L2 norm over the last axis with a finite gradient at 0."""
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  nonzero = sq > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def mlore_normals_loss(pred: jax.Array, labels: jax.Array) -> jax.Array:
  """L1 of the L2-normalised prediction (F.normalize, eps 1e-12) / #valid pixels.

  Valid pixel = no label channel equals 255 (docs/mlore.md §4, reference `L1Loss(normalize=True)`).
  """
  pred = pred.astype(jnp.float32)
  pred = pred / jnp.maximum(_safe_norm(pred), 1e-12)
  valid = jnp.all(labels != IGNORE_INDEX, axis=-1, keepdims=True)
  return jnp.sum(jnp.where(valid, jnp.abs(pred - labels), 0.0)) / _count(valid)


def mtlora_normals_loss(pred: jax.Array, labels: jax.Array) -> jax.Array:
  """L1 of pred / (|pred| + 1e-12) over label elements != 255, / #valid elements.

  Note the divisor counts elements (3 per pixel), not pixels (docs/mtlora.md §8, `NormalsLoss`).
  """
  pred = pred.astype(jnp.float32)
  pred = pred / (_safe_norm(pred) + 1e-12)
  valid = labels != IGNORE_INDEX
  return jnp.sum(jnp.where(valid, jnp.abs(pred - labels), 0.0)) / _count(valid)


def depth_loss(pred: jax.Array, labels: jax.Array) -> jax.Array:
  """L1 over pixels with depth != 0 (mtl_jax's invalid value), sum / #valid (both conventions)."""
  valid = labels != 0
  return jnp.sum(jnp.where(valid, jnp.abs(pred.astype(jnp.float32) - labels), 0.0)) / _count(valid)


def load_balancing_loss(gates: Sequence[Mapping[str, jax.Array]]) -> jax.Array:
  """MLoRE's L_cv (docs/mlore.md §4): sum over gate sets of (std_unbiased(m) / mean(m))^2.

  Args:
    gates: one dict per gate set (route_1 stages 0-3, then route_2 stages 0-3), each mapping task
      -> (B, E) gates; m is the mean over the tasks' gates concatenated along the batch axis.
  """
  total = jnp.zeros((), jnp.float32)
  for gate_set in gates:
    m = jnp.mean(jnp.concatenate([g.astype(jnp.float32) for g in gate_set.values()], axis=0),
                 axis=0)
    total += jnp.square(jnp.std(m, ddof=1) / jnp.mean(m))
  return total


def task_loss(task: Task, pred: jax.Array, labels: jax.Array, *, convention: str,
              edge_w: float) -> jax.Array:
  """The loss of one task under `convention` (table in the module docstring)."""
  if pred.shape[-1] != task.num_outputs:
    raise ValueError(f'prediction for task {task.name!r} has {pred.shape[-1]} channels, expected '
                     f'{task.num_outputs} for convention {convention!r}; build the model and the '
                     'tasks with the same config.convention')
  mlore = convention == 'mlore'
  if task.kind == 'segmentation':
    return cross_entropy(pred, labels)
  if task.kind == 'saliency':
    return mlore_saliency_loss(pred, labels) if mlore else mtlora_saliency_loss(pred, labels)
  if task.kind == 'edge':
    return weighted_bce_with_logits(pred, labels, edge_w)
  if task.kind == 'normals':
    return mlore_normals_loss(pred, labels) if mlore else mtlora_normals_loss(pred, labels)
  if task.kind == 'depth':
    return depth_loss(pred, labels)
  raise ValueError(f'no loss for task kind {task.kind!r} (task {task.name!r})')


def compute_losses(tasks: Mapping[str, Task], preds: Mapping[str, jax.Array],
                   batch: Mapping[str, jax.Array], *, convention: str,
                   weights: Mapping[str, float], edge_w: float,
                   aux: Mapping | None = None, load_balancing_weight: float = 0.0
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted total loss and the unweighted per-task losses.

  total = sum_t weights[t] * L_t (+ load_balancing_weight * L_cv when `aux` has 'gates'),
  docs/mlore.md §4 and docs/mtlora.md §8.

  Args:
    tasks: the task registry entries (mtl_jax.tasks.get_tasks).
    preds: task -> (B, H, W, num_outputs) logits at label resolution.
    batch: task -> labels in the mtl_jax format (other keys are ignored).
    convention: 'mlore' or 'mtlora'.
    weights: task -> loss weight; every task needs one. A 'load_balancing' entry is ignored here
      (pass it as `load_balancing_weight`).
    edge_w: positive-class weight w of the edge loss (MLoRE 0.95 / 0.925 / 0.88; MTLoRA 0.95).
    aux: model side outputs; aux['gates'] is the list of 8 gate sets of `load_balancing_loss`.
    load_balancing_weight: lambda_lb of L_cv.

  Returns:
    (total, losses) with losses[task] unweighted, plus losses['load_balancing'] = L_cv when
    `aux` has 'gates'.
  """
  if convention not in CONVENTIONS:
    raise ValueError(f'unknown convention {convention!r}; known: {", ".join(CONVENTIONS)} '
                     '(set --config.convention)')
  losses = {}
  total = jnp.zeros((), jnp.float32)
  for name, task in tasks.items():
    if name not in weights:
      raise ValueError(f'no loss weight for task {name!r}; set config.loss_weights.{name}')
    losses[name] = task_loss(task, preds[name], batch[name], convention=convention, edge_w=edge_w)
    total += weights[name] * losses[name]
  if aux is not None and 'gates' in aux:
    losses['load_balancing'] = load_balancing_loss(aux['gates'])
    total += load_balancing_weight * losses['load_balancing']
  return total, losses
