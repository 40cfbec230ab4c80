"""'metrics': the configured protocol's metrics over the whole eval split (mtl_jax/metrics.py).

Per batch, the jitted eval step computes the clu sufficient statistics of the global batch
(`device_fn`); the host widens them to int64 / float64 and merges them (`Accumulator`; per-batch
device counts are 32-bit, a split's are not), and `finish` computes `<task>/<metric>` of
``config.eval_protocol``. Every process sees the same global statistics, so the values agree on
all hosts.
"""

import jax
import numpy as np

from mtl_jax import evaluators
from mtl_jax import metrics as metrics_lib


def eval_protocol(config) -> str:
  """``config.eval_protocol``, '' meaning ``config.convention``."""
  return config.eval_protocol or config.convention


def widen(x):
  """Host-side accumulation dtype: int64 / float64."""
  x = np.asarray(x)
  if np.issubdtype(x.dtype, np.integer):
    return x.astype(np.int64)
  if np.issubdtype(x.dtype, np.floating):
    return x.astype(np.float64)
  return x


class Accumulator:
  """Merges per-batch statistics of a `metrics_lib.make_metrics` collection on the host."""

  def __init__(self, metrics_cls):
    self.metrics_cls = metrics_cls
    self.total = None

  def add(self, stats) -> None:
    """Adds one batch's statistics (device arrays or numpy)."""
    stats = jax.tree.map(widen, jax.device_get(stats))
    self.total = stats if self.total is None else self.total.merge(stats)

  def compute(self) -> dict:
    """The nested {task: {metric: value}} of everything added (`empty()` if nothing was)."""
    return (self.total if self.total is not None else self.metrics_cls.empty()).compute()


@evaluators.register('metrics')
class Metrics(evaluators.Evaluator):
  """`<task>/<metric>` of the configured protocol over the split."""

  def __init__(self, ctx: evaluators.Context):
    super().__init__(ctx)
    self.metrics_cls = metrics_lib.make_metrics(ctx.tasks, edge_w=ctx.config.edge_w,
                                                protocol=eval_protocol(ctx.config))
    self.accumulator = Accumulator(self.metrics_cls)

  def device_fn(self, preds, batch):
    return self.metrics_cls.single_from_model_output(preds=preds, batch=batch)

  def start(self, step: int) -> None:
    self.accumulator = Accumulator(self.metrics_cls)

  def add(self, batch, device_out, host_preds) -> None:
    self.accumulator.add(device_out)

  def finish(self) -> evaluators.Result:
    return evaluators.Result(scalars=metrics_lib.flatten(self.accumulator.compute()))
