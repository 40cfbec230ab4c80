"""Evaluators: what an eval pass computes and reports, listed in `config.evaluators`.

`train.Trainer.evaluate` runs the model once per eval batch and hands every configured
evaluator the batch; the evaluators own what they compute from it. The contract:

  @evaluators.register('name')              # a `config.evaluators` entry
  class MyEvaluator(evaluators.Evaluator):
    host_tasks = ()                         # tasks whose full predictions it needs on the host
    def device_fn(self, preds, batch): ...  # optional: inside the jitted eval step -> pytree
    def start(self, step): ...              # a new pass over the split (checkpoint step)
    def add(self, batch, device_out, host_preds): ...   # one process-local batch
    def finish(self) -> evaluators.Result: ...          # scalars and images of the pass

`device_fn` runs on the global batch under jit (its output is replicated, e.g. sufficient
statistics); `add` gets the process-local numpy batch (with ``index``, the example's position in
the split, and ``original_size``, mtl_jax/input_pipeline.py), `device_out` as replicated jax
arrays (`jax.device_get` only what is used: nothing is copied to the host unasked) and
`host_preds` {task: this process' rows, local batch order}. Scalars are written as
`eval/<key>`, images as `eval/<key>` TensorBoard images. Evaluators are built once per
`Trainer` from an `Context` (config, tasks, workdir, the eval data source).

Built in: 'metrics' (metrics.py, the configured protocol's metrics over the split),
'prediction_grid' (prediction_grid.py: input, labels, predictions of the first examples),
'boundary' (boundary.py: SEISM odsF / oisF / AP; added by ``config.eval_boundary``),
'save_predictions' (predictions.py: every prediction as the references save it; added by
``config.save_predictions``). Adding one is one module here (docs/extending.md).
"""

import dataclasses
from typing import Any

from mtl_jax import registry


@dataclasses.dataclass(frozen=True)
class Context:
  """What an evaluator may read: the config, {name: Task}, the (absolute) workdir and the
  random-access eval data source."""
  config: Any
  tasks: dict
  workdir: Any
  source: Any


@dataclasses.dataclass
class Result:
  """One evaluator's output for a pass: scalars {key: float}, images {key: (H, W, 3) uint8}."""
  scalars: dict[str, float] = dataclasses.field(default_factory=dict)
  images: dict[str, Any] = dataclasses.field(default_factory=dict)


class Evaluator:
  """Base class; see the module docstring for the contract."""
  host_tasks: tuple[str, ...] = ()

  def __init__(self, ctx: Context):
    self.ctx = ctx

  def device_fn(self, preds, batch):
    del preds, batch
    return None

  def start(self, step: int) -> None:
    del step

  def add(self, batch: dict, device_out, host_preds: dict) -> None:
    raise NotImplementedError

  def finish(self) -> Result:
    raise NotImplementedError


_EVALUATORS = registry.Registry('config.evaluators entry')
register = _EVALUATORS.register  # class decorator: makes a class a `config.evaluators` entry


def names(config) -> tuple[str, ...]:
  """`config.evaluators`, plus 'boundary' / 'save_predictions' when their flags are set."""
  out = list(config.evaluators)
  for flag, name in (('eval_boundary', 'boundary'), ('save_predictions', 'save_predictions')):
    if config.get(flag) and name not in out:
      out.append(name)
  for name in out:
    _EVALUATORS.get(name)  # ConfigError naming the known ones
  return tuple(out)


def build(ctx: Context) -> dict[str, Evaluator]:
  """{name: evaluator} of `names(ctx.config)`, in order."""
  return {name: _EVALUATORS.get(name)(ctx) for name in names(ctx.config)}


# pylint: disable=g-import-not-at-top,wrong-import-position  (the built-ins register themselves)
from mtl_jax.evaluators import boundary
from mtl_jax.evaluators import metrics
from mtl_jax.evaluators import prediction_grid
from mtl_jax.evaluators import predictions

__all__ = ['Context', 'Evaluator', 'Result', 'build', 'names', 'register', 'boundary', 'metrics',
           'prediction_grid', 'predictions']
