"""'maml': first-order MAML over tasks, as the user's fork trains MTLoRA (docs/methods.md §2).

Per batch of B images: support = the first floor(B/2), query = the rest (of the global batch, so
the split does not depend on the device count). For each task t in config order, theta_t = the
trainable leaves that are shared or t's own (`Method.owner`):

  theta_t' = theta - alpha * grad_theta_t [w_t L_t(support)]     (`config.maml.inner_steps` times)
  L_q,t    = w_t L_t(query; theta_t')

meta-loss = mean_t L_q,t (a mean, where 'mtl' sums); the meta-gradient is first order,
(1/T) sum_t grad L_q,t evaluated at theta_t' and applied to theta (stop-gradient through the
inner update), then the configured clipping + optimizer + schedule. `config.maml.first_order=False`
differentiates through the inner steps instead (second-order MAML). Each pass computes only task
t's path: the other tasks' heads and task streams are dead code and XLA removes them, and their
BatchNorm statistics keep their values. Keys: `config.maml.{inner_steps, inner_lr, first_order}`.
The fork's trainable set (LoRA only) is a config choice (`recipe=lora_only` of
configs/mtlora_pascal.py); other recipes adapt and train the decoders too.

Logs loss (meta), <task>_loss (unweighted query loss), support_loss (mean w_t L_t(support)
before adaptation), grad_norm, learning_rate.
"""

import jax
import jax.numpy as jnp

from mtl_jax import ConfigError
from mtl_jax import methods


def split_support_query(batch: dict) -> tuple[dict, dict]:
  """(first floor(B/2) rows, the remaining rows) of every array of the global batch."""
  half = batch['image'].shape[0] // 2
  return jax.tree.map(lambda x: x[:half], batch), jax.tree.map(lambda x: x[half:], batch)


@methods.register('maml')
class MAML(methods.Method):
  """First-order MAML over tasks (module docstring). Subclasses (metasgd, taml) change
  `inner_lrs`, `through_inner` and what the step adds to the meta-gradient."""

  learn_inner_lrs = False  # Meta-SGD: the inner learning rates are differentiated too

  def __init__(self, trainer):
    super().__init__(trainer)
    cfg = self.config.maml
    if int(cfg.inner_steps) < 1:
      raise ConfigError(f'config.maml.inner_steps={cfg.inner_steps} must be >= 1 (fix '
                        '--config.maml.inner_steps)')
    if self.config.batch_size < 2:
      raise ConfigError('meta-learning splits each batch into support and query halves; set '
                        '--config.batch_size to 2 or more')
    self.inner_steps, self.inner_lr = int(cfg.inner_steps), float(cfg.inner_lr)
    self.through_inner = not cfg.first_order

  def adapted(self, params: dict, task: str):
    """Tree of bools: the leaves of theta_t (shared or `task`'s own)."""
    return jax.tree.map(lambda o: o in ('', task), self.owners(params))

  def task_loss(self, state, rest, params, batch, task, key, stats):
    """(w_t L_t + regulariser, (unweighted L_t, batch_stats)) computing only `task`'s path: the
    forward builds every head, XLA drops what this loss does not read (the other tasks' heads,
    downsamplers and TS-LoRA streams; tests/test_meta_learning.py counts the FLOPs)."""
    preds, aux, new_stats = self.forward(state, rest, params, batch['image'], key, stats)
    total, per_task = self.losses(preds, batch, aux, tasks={task: self.tasks[task]})
    return total, (per_task[task], self.keep_other_tasks(stats, new_stats, task))

  def inner_lrs(self, state):
    """The inner learning rate(s) (differentiated when `learn_inner_lrs`)."""
    del state
    return self.inner_lr

  def leaf_lrs(self, lrs, params: dict):
    """`inner_lrs`' value -> the learning rate of every leaf of `params`."""
    return jax.tree.map(lambda _: lrs, params)

  def adapt(self, state, rest, params, support, task, key, stats, lrs):
    """`inner_steps` plain SGD steps of theta_t on the support loss -> (theta_t', (first support
    loss, its unweighted L_t), batch_stats)."""
    mask = self.adapted(params, task)
    lrs = self.leaf_lrs(lrs, params)
    first = None
    for k in range(self.inner_steps):
      (loss, (unweighted, stats)), grads = jax.value_and_grad(
          self.task_loss, argnums=2, has_aux=True)(
              state, rest, params, support, task, jax.random.fold_in(key, k), stats)
      first = (loss, unweighted) if first is None else first
      params = jax.tree.map(lambda p, g, m, a: p - a * g if m else p, params, grads, mask, lrs)
    return params, first, stats

  def meta_gradients(self, state, rest, batch):
    """The per-task loop -> (meta-loss, meta-gradient, gradient of the inner learning rates or
    None, scalars, batch_stats, {task: theta_t'})."""
    support, query = (self.shard_rows(b) for b in split_support_query(batch))
    key, stats, params = self.step_key(state), state.batch_stats, state.params
    num = len(self.task_names)
    grads = lr_grads = None
    query_losses, support_losses, per_task, adapted = [], [], {}, {}
    for i, task in enumerate(self.task_names):
      k_in, k_q = jax.random.split(jax.random.fold_in(key, i))
      lrs = self.inner_lrs(state)
      if self.through_inner:  # differentiate through the inner steps (second order)
        def outer(p, a, task=task, k_in=k_in, k_q=k_q, stats=stats):
          p_t, s_loss, st = self.adapt(state, rest, p, support, task, k_in, stats, a)
          q_loss, (unweighted, st) = self.task_loss(state, rest, p_t, query, task, k_q, st)
          return q_loss, (unweighted, st, s_loss, p_t)
        argnums = (0, 1) if self.learn_inner_lrs else 0
        (q_loss, (unweighted, stats, s_loss, p_t)), g = jax.value_and_grad(
            outer, argnums=argnums, has_aux=True)(params, lrs)
        g, g_lr = g if self.learn_inner_lrs else (g, None)
      else:  # first order: the query gradient at theta_t', applied to theta
        p_t, s_loss, stats = self.adapt(state, rest, params, support, task, k_in, stats, lrs)
        p_t = jax.lax.stop_gradient(p_t)
        (q_loss, (unweighted, stats)), g = jax.value_and_grad(
            self.task_loss, argnums=2, has_aux=True)(state, rest, p_t, query, task, k_q, stats)
        g_lr = None
      grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
      if g_lr is not None:
        lr_grads = g_lr if lr_grads is None else jax.tree.map(jnp.add, lr_grads, g_lr)
      query_losses.append(q_loss)
      support_losses.append(s_loss[0])
      per_task[task], adapted[task] = unweighted, p_t
    scale = lambda tree: None if tree is None else jax.tree.map(lambda g: g / num, tree)
    meta_loss = sum(query_losses) / num
    scalars = {'loss': meta_loss, 'support_loss': sum(support_losses) / num,
               **{f'{t}_loss': v for t, v in per_task.items()}}
    return meta_loss, scale(grads), scale(lr_grads), scalars, stats, adapted

  def train_step(self, state, rest, batch):
    _, grads, _, scalars, stats, _ = self.meta_gradients(state, rest, batch)
    state, opt_scalars = self.apply_gradients(state, grads, batch_stats=stats)
    return state, {**scalars, **opt_scalars}
