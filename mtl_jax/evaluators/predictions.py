"""'save_predictions': every eval prediction written as the references save it.

Added by ``config.save_predictions``. Each valid example's predictions, back at its original
size, go to WORKDIR/predictions/<task>/<id>.png (8-bit L or RGB; depth: <id>.mat), the id read
from the eval source at the example's ``index`` (docs/datasets_metrics.md §4.5 step 1), ready
for external scoring (e.g. mtl_jax.tools.eval_boundary).
"""

import io

import cv2
from etils import epath
import numpy as np
from PIL import Image
import scipy.io

from mtl_jax import boundary
from mtl_jax import evaluators
from mtl_jax import tasks as tasks_lib


def to_original_size(pred: np.ndarray, size: tuple[int, int], augment: str) -> np.ndarray:
  """A (H, W, C) prediction on the eval input, back at the example's original (h, w) `size`.

  'mlore' eval padded the image: the centred crop (top = (H - h) // 2, the references'
  `save_model_pred_for_one_task`). 'mtlora' eval resized it: the logits are resized back
  (bilinear; the reference does not save predictions).
  """
  h, w = (int(s) for s in size)
  if augment == 'mtlora':
    if pred.shape[:2] == (h, w):
      return pred
    out = cv2.resize(np.asarray(pred, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return out.reshape(h, w, pred.shape[-1])  # cv2 drops a channel axis of size 1
  top, left = (pred.shape[0] - h) // 2, (pred.shape[1] - w) // 2
  return pred[top:top + h, left:left + w]


def encode_prediction(task: tasks_lib.Task, pred: np.ndarray, convention: str) -> np.ndarray:
  """The saved form of a (h, w, C) prediction: the references' `get_output` and uint8 cast.

  segmentation: argmax ids; saliency: 255 x softmax[..., 1] (2 channels) or 255 x sigmoid;
  edge: `boundary.to_png`; normals: 255 (normalize(x) + 1) / 2 as RGB; all truncated to uint8.
  depth: float32 metres, clamped at 0 for 'mlore' (MTLoRA saves the raw output).
  """
  pred = np.asarray(pred, np.float32)
  if task.kind == 'segmentation':
    return pred.argmax(-1).astype(np.uint8)
  if task.kind == 'saliency':
    with np.errstate(over='ignore'):  # exp overflow -> probability 0, as in torch
      if pred.shape[-1] == 2:
        prob = np.float32(1) / (np.float32(1) + np.exp(pred[..., 0] - pred[..., 1]))
      else:
        prob = np.float32(1) / (np.float32(1) + np.exp(-pred[..., 0]))
    return (np.float32(255) * prob).astype(np.uint8)
  if task.kind == 'edge':
    return boundary.to_png(pred[..., 0])
  if task.kind == 'normals':
    unit = pred / np.maximum(np.linalg.norm(pred, axis=-1, keepdims=True), 1e-12)
    return (255 * (unit + 1) / 2).astype(np.uint8)
  if task.kind == 'depth':
    return np.maximum(pred[..., 0], 0) if convention == 'mlore' else pred[..., 0]
  raise ValueError(f'cannot save task kind {task.kind!r}')


def save_prediction(directory, image_id: str, task: tasks_lib.Task, pred: np.ndarray,
                    convention: str) -> None:
  """Writes DIRECTORY/<id>.png (8-bit L or RGB), or DIRECTORY/<id>.mat ({'depth': (h, w)}) for
  depth, as the references' savers do."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  value = encode_prediction(task, pred, convention)
  buf = io.BytesIO()
  if task.kind == 'depth':
    scipy.io.savemat(buf, {'depth': value})
  else:
    Image.fromarray(value).save(buf, format='PNG')
  (directory / f'{image_id}.{"mat" if task.kind == "depth" else "png"}').write_bytes(
      buf.getvalue())


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


@evaluators.register('save_predictions')
class SavePredictions(evaluators.Evaluator):
  """Writes every valid example's predictions (see the module docstring)."""

  @property
  def host_tasks(self) -> tuple[str, ...]:
    return tuple(self.ctx.tasks)

  def add(self, batch, device_out, host_preds) -> None:
    config = self.ctx.config
    for i in np.flatnonzero(batch['example_valid']):
      image_id = _text(self.ctx.source[int(batch['index'][i])]['id'])
      size = tuple(batch['original_size'][i])
      for name in self.host_tasks:
        pred = to_original_size(host_preds[name][i], size, config.input.augment)
        save_prediction(epath.Path(self.ctx.workdir) / 'predictions' / name, image_id,
                        self.ctx.tasks[name], pred, config.convention)

  def finish(self) -> evaluators.Result:
    return evaluators.Result()
