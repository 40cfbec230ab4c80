"""'prediction_grid': input, then label and prediction of every task, for the first examples.

Rows are the valid examples among the first ``config.num_eval_images`` of the pass's first
batch; written as the TensorBoard image `eval/predictions` and, by process 0, as
WORKDIR/predictions/step_<step>.png.
"""

import jax
import numpy as np
from etils import epath

from mtl_jax import evaluators
from mtl_jax import reporting
from mtl_jax import tasks as tasks_lib
from mtl_jax import transforms


def grid(tasks: dict, batch: dict, preds: dict, num_images: int) -> np.ndarray:
  """Rows = examples; columns = input, then label and prediction for every task."""
  mean, std = np.asarray(transforms.IMAGENET_MEAN), np.asarray(transforms.IMAGENET_STD)
  rows = []
  for i in range(min(len(batch['image']), num_images)):
    if not batch['example_valid'][i]:
      continue
    row = [((batch['image'][i] * std + mean) * 255).clip(0, 255).astype(np.uint8)]
    for name, task in tasks.items():
      label = batch[name][i]
      depth_range = None
      if task.kind == 'depth':
        valid = label[label > 0]
        depth_range = (float(valid.min()), float(valid.max())) if valid.size else (0., 1.)
      row.append(tasks_lib.render(task, label, is_label=True, depth_range=depth_range))
      row.append(tasks_lib.render(task, preds[name][i], depth_range=depth_range))
    rows.append(row)
  return reporting.image_grid(rows)


@evaluators.register('prediction_grid')
class PredictionGrid(evaluators.Evaluator):
  """The grid of the first batch (see the module docstring)."""

  def device_fn(self, preds, batch):
    n = self.ctx.config.num_eval_images
    return jax.tree.map(lambda p: p[:n], preds)

  def start(self, step: int) -> None:
    self.step, self.sample = step, None

  def add(self, batch, device_out, host_preds) -> None:
    if self.sample is None:
      n = self.ctx.config.num_eval_images
      self.sample = (jax.tree.map(lambda x: x[:n], batch), jax.device_get(device_out))

  def finish(self) -> evaluators.Result:
    if self.sample is None:
      return evaluators.Result()
    image = grid(self.ctx.tasks, *self.sample, self.ctx.config.num_eval_images)
    if jax.process_index() == 0:
      path = epath.Path(self.ctx.workdir) / 'predictions' / f'step_{self.step:07d}.png'
      reporting.save_png(path, image)
    return evaluators.Result(images={'predictions': image})
