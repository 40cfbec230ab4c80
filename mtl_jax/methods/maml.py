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
BatchNorm statistics keep their values. Keys: `config.maml.{inner_steps, inner_lr, first_order,
loop}`.

`config.maml.loop`: 'scan' (default) computes the per-task step once, as the body of a
`lax.scan` over task indices, so the compiled program holds one task's passes instead of T
(XLA:CPU compiled the unrolled MTLoRA step in 1,165 s; benchmarks/RESULTS.md). Inside the body
the task is a traced index: the heads and losses are a `lax.switch` over tasks (only the taken
branch runs), and when the model is `task_symmetric` (models/multitask.py: MTLoRA, the Swin and
ViT baselines, ProMLoRA with per-task prompts) task t's own backbone/decoder leaves (TS-LoRA,
prompts, downsamplers, also frozen ones and BatchNorm statistics) are selected into the first
task's places and only that map is read, so one task's path is computed per pass, as unrolled.
Other models (MLoRE, dynamic ProMLoRA) compute every task's maps in each pass and read task t's.
'unroll' is the literal per-task Python loop; tests/test_meta_learning.py checks both agree.
Reptile and TAML's `in_gradient` regulariser loop over tasks the same way (`over_tasks`).
The fork's trainable set (LoRA only) is a config choice (`recipe=lora_only` of
configs/mtlora_pascal.py); other recipes adapt and train the decoders too.

Logs loss (meta), <task>_loss (unweighted query loss), support_loss (mean w_t L_t(support)
before adaptation), grad_norm, learning_rate.
"""

from flax import nnx
import jax
import jax.numpy as jnp

from mtl_jax import ConfigError
from mtl_jax import methods
from mtl_jax import sharding
from mtl_jax.models import multitask

LOOPS = ('scan', 'unroll')  # config.maml.loop (module docstring)


def split_support_query(batch: dict) -> tuple[dict, dict]:
  """(first floor(B/2) rows, the remaining rows) of every array of the global batch."""
  half = batch['image'].shape[0] // 2
  return jax.tree.map(lambda x: x[:half], batch), jax.tree.map(lambda x: x[half:], batch)


@methods.register('maml')
class MAML(methods.Method):
  """First-order MAML over tasks (module docstring). Subclasses (metasgd, taml) change
  `inner_lrs`, `through_inner` and what the step adds to the meta-gradient."""

  learn_inner_lrs = False  # Meta-SGD: the inner learning rates are differentiated too
  keeps_adapted = False  # TAML: meta_gradients also returns every theta_t'

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
    self.loop = str(cfg.get('loop', 'scan'))
    if self.loop not in LOOPS:
      raise ConfigError(f'config.maml.loop={self.loop!r} is not one of {LOOPS} (fix '
                        '--config.maml.loop)')

  def adapted(self, params: dict, task):
    """Tree of bools: the leaves of theta_t (shared or `task`'s own); for a traced task index
    (the scan) the task-owned ones are traced bools."""
    if isinstance(task, str):
      return jax.tree.map(lambda o: o in ('', task), self.owners(params))
    return jax.tree.map(lambda o: o == '' or task == self.task_names.index(o), self.owners(params))

  def loss_of(self, task):
    """`task_loss` for a task name, `task_loss_at` for a traced task index."""
    return self.task_loss if isinstance(task, str) else self.task_loss_at

  def task_loss(self, state, rest, params, batch, task, key, stats):
    """(w_t L_t + regulariser, (unweighted L_t, batch_stats)) computing only `task`'s path: the
    forward builds every head, XLA drops what this loss does not read (the other tasks' heads,
    downsamplers and TS-LoRA streams; tests/test_meta_learning.py counts the FLOPs)."""
    preds, aux, new_stats = self.forward(state, rest, params, batch['image'], key, stats)
    total, per_task = self.losses(preds, batch, aux, tasks={task: self.tasks[task]})
    return total, (per_task[task], self.keep_other_tasks(stats, new_stats, task))

  def task_loss_at(self, state, rest, params, batch, index, key, stats):
    """`task_loss` of the task at the traced `index` into task_names (the scan, module
    docstring): the backbone and decoder once, then the heads and losses as a `lax.switch`."""
    model = self.bind(state, rest, params, key, stats)
    symmetric = multitask.tasks_symmetric(model)
    if symmetric:
      put = lambda tree: self.put_in_first_slot(tree, index)
      model = self.bind(state, rest, put(params), key, put(stats), frozen=put(state.frozen))
    images = batch['image']
    maps, aux = model.decoder(model.backbone(images))
    new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    heads_graph, heads_state = nnx.split(model.heads)
    upsample = getattr(model.decoder, 'head_upsample', 1)

    def branch(task):
      def run(heads_state):
        heads = nnx.merge(heads_graph, heads_state)
        x = maps[self.task_names[0] if symmetric else task]
        pred = multitask.head_logits(heads[task], x, upsample, images.shape[1:3])
        total, per_task = self.losses({task: pred}, batch, aux, tasks={task: self.tasks[task]})
        return total, per_task[task], nnx.to_pure_dict(nnx.state(heads, nnx.BatchStat))
      return run

    total, unweighted, head_stats = jax.lax.switch(
        index, [branch(t) for t in self.task_names], heads_state)
    if head_stats:
      new_stats = {**new_stats, 'heads': head_stats}
    return total, (unweighted, self.take_back(stats, new_stats, index, symmetric))

  def first_slot_groups(self, tree) -> list[tuple[int, list[int]]]:
    """[(flat index of the first task's leaf, [flat index of that leaf of every task])] of the
    task-owned backbone and decoder leaves of `tree`, lined up by path with the task replaced;
    ConfigError when a task lacks the leaf or its shape differs (the scan cannot select it)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    places = {}
    for n, (path, _) in enumerate(flat):
      owner, parts = self.owner(path), sharding.path_str(path).split('/')
      if owner and parts[0] != 'heads':
        places.setdefault('/'.join('*' if p == owner else p for p in parts), {})[owner] = n
    groups = []
    for place, members in places.items():
      kinds = {(flat[m][1].shape, flat[m][1].dtype) for m in members.values()}
      if len(members) != len(self.task_names) or len(kinds) != 1:
        raise ConfigError(f"config.maml.loop='scan' needs {place} for every task with one shape "
                          f"(got {sorted(members)}, {sorted(map(str, kinds))}); set "
                          "--config.maml.loop=unroll")
      groups.append((members[self.task_names[0]], [members[t] for t in self.task_names]))
    return groups

  def put_in_first_slot(self, tree, index):
    """`tree` with the task at `index`'s own backbone/decoder leaves in the first task's places
    (differentiable: the gradient reaches that task's leaves)."""
    leaves, treedef = jax.tree.flatten(tree)
    out = list(leaves)
    for first, members in self.first_slot_groups(tree):
      out[first] = jax.lax.select_n(index, *[leaves[m] for m in members])
    return treedef.unflatten(out)

  def take_back(self, old, new, index, symmetric: bool):
    """BatchNorm statistics after `task_loss_at`'s pass: shared leaves from `new`, the task at
    `index`'s own from `new` (from the first task's places when `symmetric`), every other task's
    from `old`."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(old)
    new_leaves = treedef.flatten_up_to(new)
    out = []
    for (path, o), n in zip(flat, new_leaves):
      owner = self.owner(path)
      out.append(n if owner == '' else jnp.where(index == self.task_names.index(owner), n, o))
    if symmetric:
      for first, members in self.first_slot_groups(old):
        for k, m in enumerate(members):
          out[m] = jnp.where(index == k, new_leaves[first], flat[m][1])
    return treedef.unflatten(out)

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
    step = lambda p, g, m, a: (p - a * g if m else p) if isinstance(m, bool) else jnp.where(
        m, p - a * g, p)
    first = None
    for k in range(self.inner_steps):
      (loss, (unweighted, stats)), grads = jax.value_and_grad(
          self.loss_of(task), argnums=2, has_aux=True)(
              state, rest, params, support, task, jax.random.fold_in(key, k), stats)
      first = (loss, unweighted) if first is None else first
      params = jax.tree.map(step, params, grads, mask, lrs)
    return params, first, stats

  def task_meta_gradient(self, state, rest, params, support, query, task, key, stats, lrs):
    """Task `task`'s (name, or traced index) inner adaptation and query loss -> (query loss,
    unweighted query loss, first support loss, batch_stats, theta_t', meta-gradient, gradient
    of the inner learning rates or None)."""
    k_in, k_q = jax.random.split(key)
    loss_fn = self.loss_of(task)
    if self.through_inner:  # differentiate through the inner steps (second order)
      def outer(p, a):
        p_t, s_loss, st = self.adapt(state, rest, p, support, task, k_in, stats, a)
        q_loss, (unweighted, st) = loss_fn(state, rest, p_t, query, task, k_q, st)
        return q_loss, (unweighted, st, s_loss, p_t)
      argnums = (0, 1) if self.learn_inner_lrs else 0
      (q_loss, (unweighted, stats, s_loss, p_t)), g = jax.value_and_grad(
          outer, argnums=argnums, has_aux=True)(params, lrs)
      g, g_lr = g if self.learn_inner_lrs else (g, None)
    else:  # first order: the query gradient at theta_t', applied to theta
      p_t, s_loss, stats = self.adapt(state, rest, params, support, task, k_in, stats, lrs)
      p_t = jax.lax.stop_gradient(p_t)
      (q_loss, (unweighted, stats)), g = jax.value_and_grad(
          loss_fn, argnums=2, has_aux=True)(state, rest, p_t, query, task, k_q, stats)
      g_lr = None
    return q_loss, unweighted, s_loss[0], stats, p_t, g, g_lr

  def over_tasks(self, body, carry, key):
    """`body(carry, task, key_t) -> (carry, row)` for every task in config order (key_t =
    fold_in(key, t's position)), with t a name ('unroll': a Python loop) or a traced index
    ('scan': one `lax.scan` body) -> (carry, the rows stacked along a leading task axis)."""
    if self.loop == 'unroll':
      rows = []
      for i, task in enumerate(self.task_names):
        carry, row = body(carry, task, jax.random.fold_in(key, i))
        rows.append(row)
      return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *rows)
    return jax.lax.scan(lambda c, i: body(c, i, jax.random.fold_in(key, i)), carry,
                        jnp.arange(len(self.task_names)))

  def unstack(self, stacked) -> dict | None:
    """Rows stacked by `over_tasks` -> {task: row}."""
    return None if stacked is None else {
        t: jax.tree.map(lambda x, k=k: x[k], stacked) for k, t in enumerate(self.task_names)}

  def meta_gradients(self, state, rest, batch):
    """The loop over tasks (`config.maml.loop`) -> (meta-loss, meta-gradient, gradient of the
    inner learning rates or None, scalars, batch_stats, {task: theta_t'} or None)."""
    support, query = (self.shard_rows(b) for b in split_support_query(batch))
    params, lrs, num = state.params, self.inner_lrs(state), len(self.task_names)
    add = lambda a, b: None if b is None else jax.tree.map(jnp.add, a, b)

    def body(carry, task, key):
      grads, lr_grads, stats = carry
      q_loss, unweighted, s_loss, stats, p_t, g, g_lr = self.task_meta_gradient(
          state, rest, params, support, query, task, key, stats, lrs)
      return (add(grads, g), add(lr_grads, g_lr), stats), (
          q_loss, s_loss, unweighted, p_t if self.keeps_adapted else None)

    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    init = (zeros(params), zeros(lrs) if self.learn_inner_lrs else None, state.batch_stats)
    (grads, lr_grads, stats), (q_losses, s_losses, unweighted, stacked) = self.over_tasks(
        body, init, self.step_key(state))
    scale = lambda tree: None if tree is None else jax.tree.map(lambda g: g / num, tree)
    meta_loss = jnp.sum(q_losses) / num
    scalars = {'loss': meta_loss, 'support_loss': jnp.sum(s_losses) / num,
               **{f'{t}_loss': unweighted[k] for k, t in enumerate(self.task_names)}}
    return meta_loss, scale(grads), scale(lr_grads), scalars, stats, self.unstack(stacked)

  def train_step(self, state, rest, batch):
    _, grads, _, scalars, stats, _ = self.meta_gradients(state, rest, batch)
    state, opt_scalars = self.apply_gradients(state, grads, batch_stats=stats)
    return state, {**scalars, **opt_scalars}
