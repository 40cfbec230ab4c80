"""The fork's meta-learning methods (mtl_jax/methods/{maml,metasgd,taml,reptile}.py) against
references written here with plain loops over tasks and `jax.grad`, independent of the methods'
code (docs/methods.md §2-§3)."""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import mtlora_pascal
from mtl_jax import input_pipeline
from mtl_jax import losses
from mtl_jax import perf
from mtl_jax import sharding
from mtl_jax import train

TASKS = ('semseg', 'sal')
PASCAL = ('semseg', 'human_parts', 'sal', 'normals')


def _config(tfds_dir, method, **maml):
  """configs/mtlora_pascal.py:smoke on two tasks, LoRA only (the fork's MAML trainable set), no
  dropout or drop path (the reference below draws no random numbers), Adam with eps 1 at a constant
  1e-2: an update that is smooth in the gradient, so 1e-6 on the gradient is 1e-6 on the
  parameters."""
  c = mtlora_pascal.get_config('smoke,recipe=lora_only,tasks=' + '+'.join(TASKS))
  c.dataset.update(data_dir=tfds_dir, build_if_missing=False)
  c.model.backbone.drop_path_rate = 0.0
  c.model.mtlora.dropout = (0.0,)
  c.optimizer.eps = 1.0
  c.optimizer.learning_rate = 1e-2
  c.schedule.name = 'constant'
  c.method = method
  c.maml.update(maml)
  return c


def _setup(config, tmp_path):
  trainer = train.Trainer(config, tmp_path, jax.devices()[:1])
  batch = next(input_pipeline.make_train_iterator(config, trainer.tasks,
                                                  source=trainer.train_source))
  return trainer, trainer.init_state(), sharding.global_batch(batch, trainer.mesh)


def _task_of(path: str) -> str | None:
  """Reference ownership, from the TS-LoRA names: `.../lora_tasks_{A,B}/<task>`."""
  parts = path.split('/')
  return parts[parts.index([p for p in parts if p.startswith('lora_tasks_')][0]) + 1] if any(
      p.startswith('lora_tasks_') for p in parts) else None


def _reference_loss(trainer, state, params, images, labels, task):
  model = nnx.merge(trainer.train_graph, params, state.frozen, state.batch_stats, trainer.rest)
  preds, _ = model(images)
  loss = losses.task_loss(trainer.tasks[task], preds[task], labels[task],
                          convention=trainer.config.convention, edge_w=trainer.config.edge_w)
  return trainer.config.loss_weights[task] * loss


def _paths(tree):
  return [sharding.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _sgd(params, grads, lr, task):
  """theta_t <- theta_t - lr * g on the shared leaves and `task`'s own."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  new = [p - lr * g if _task_of(sharding.path_str(k)) in (None, task) else p
         for (k, p), g in zip(flat, jax.tree.leaves(grads))]
  return jax.tree.unflatten(treedef, new)


def _fo_maml_reference(trainer, state, batch, inner_lr, inner_steps):
  """(meta-loss, meta-gradient): support = first half, query = rest; per task `inner_steps` SGD
  steps on the support loss, the query loss and its gradient at theta_t', mean over tasks."""
  half = batch['image'].shape[0] // 2
  support = jax.tree.map(lambda x: x[:half], batch)
  query = jax.tree.map(lambda x: x[half:], batch)
  grad_fn = jax.jit(jax.value_and_grad(functools.partial(_reference_loss, trainer, state)),
                    static_argnums=3)
  meta_loss, meta_grad = 0.0, jax.tree.map(jnp.zeros_like, state.params)
  for task in TASKS:
    params = state.params
    for _ in range(inner_steps):
      _, g = grad_fn(params, support['image'], support, task)
      params = _sgd(params, g, inner_lr, task)
    loss, g = grad_fn(params, query['image'], query, task)
    meta_loss += loss / len(TASKS)
    meta_grad = jax.tree.map(lambda a, b: a + b / len(TASKS), meta_grad, g)
  return meta_loss, meta_grad


@pytest.mark.slow
def test_fo_maml_outer_step_equals_the_hand_computed_reference(tfds_dir, tmp_path):
  inner_steps = 2  # the fork's default is 1; 2 also checks the inner loop
  config = _config(tfds_dir, 'maml', inner_lr=0.5, inner_steps=inner_steps)
  trainer, state, batch = _setup(config, tmp_path)
  assert all(('/lora_shared_' in p or '/lora_tasks_' in p) for p in _paths(state.params))
  assert any('heads' in p for p in _paths(state.frozen))  # decoders frozen, as in the fork
  want_loss, want_grad = _fo_maml_reference(trainer, state, batch, 0.5, inner_steps)
  updates, _ = trainer.tx.update(want_grad, state.opt_state, state.params)
  want_params = optax.apply_updates(state.params, updates)
  frozen_before, params_before = jax.device_get((state.frozen, state.params))
  unadapted_loss, _ = _fo_maml_reference(trainer, state, batch, 0.0, 0)  # query loss at theta

  new_state, scalars = trainer.train_step(state, trainer.rest, batch)
  np.testing.assert_allclose(scalars['loss'], want_loss, rtol=1e-6)
  np.testing.assert_allclose(scalars['grad_norm'], optax.global_norm(want_grad), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
               jax.device_get(new_state.params), jax.device_get(want_params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(new_state.frozen), frozen_before)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), want_params, params_before)
  assert max(jax.tree.leaves(moved)) > 1e-4
  assert abs(float(unadapted_loss) - float(want_loss)) > 1e-4  # the inner steps matter


@pytest.mark.slow
@pytest.mark.parametrize('loop', ['scan', 'unroll'])
def test_reptile_update_equals_its_closed_form(tfds_dir, tmp_path, loop):
  """One inner step on the full batch: shared leaves theta - lr * alpha * mean_t g_t, task t's
  own theta - lr * alpha * g_t (g_t = grad of w_t L_t at theta), no optimizer step; with the
  tasks as a scan or a Python loop (config.maml.loop)."""
  config = _config(tfds_dir, 'reptile', inner_lr=0.5, inner_steps=1, loop=loop)
  trainer, state, batch = _setup(config, tmp_path)
  grad_fn = jax.jit(jax.grad(functools.partial(_reference_loss, trainer, state)),
                    static_argnums=3)
  grads = {t: grad_fn(state.params, batch['image'], batch, t) for t in TASKS}
  lr, alpha = 1e-2, 0.5
  flat, treedef = jax.tree_util.tree_flatten_with_path(state.params)
  want = []
  for i, (key, p) in enumerate(flat):
    owner = _task_of(sharding.path_str(key))
    g = {t: jax.tree.leaves(grads[t])[i] for t in TASKS}
    want.append(p - lr * alpha * (g[owner] if owner else sum(g.values()) / len(TASKS)))
  want = jax.device_get(jax.tree.unflatten(treedef, want))
  opt_before, params_before = jax.device_get((state.opt_state, state.params))

  new_state, scalars = trainer.train_step(state, trainer.rest, batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-7),
               jax.device_get(new_state.params), want)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), want, params_before)
  assert max(jax.tree.leaves(moved)) > 1e-5
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(new_state.opt_state), opt_before)
  assert int(new_state.step) == 1 and np.isfinite(scalars['loss'])


def _spread_reference(thetas: dict) -> jax.Array:
  """(1/T) sum_t sum_i ||theta_t,i - mean_s theta_s,i||^2: shared leaves with themselves, task
  t's TS-LoRA leaf with the other tasks' at the same place."""
  lined_up = {}
  for task, tree in thetas.items():
    for key, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      path = sharding.path_str(key)
      if _task_of(path) in (None, task):
        lined_up.setdefault('/'.join('*' if p == task else p for p in path.split('/')),
                            []).append(leaf)
  assert all(len(v) == len(thetas) for v in lined_up.values())
  return sum(jnp.sum((jnp.stack(v) - jnp.mean(jnp.stack(v), axis=0)) ** 2)
             for v in lined_up.values()) / len(thetas)


@pytest.mark.slow
def test_taml_in_gradient_adds_the_second_order_gradient_of_the_spread(tfds_dir, tmp_path):
  """config.taml.in_gradient: the update is the optimizer's step on the FO-MAML meta-gradient
  plus jax.grad of lam * spread(theta_t'(theta)) differentiated through the inner step, written
  here from the plain loop; the logged spread and loss are the reference's. (The scan, the
  default loop; 'unroll' runs the same body, checked for Reptile and MAML.)"""
  lam, inner_lr = 0.2, 0.5
  config = _config(tfds_dir, 'taml', inner_lr=inner_lr, inner_steps=1)
  config.taml.update(lam=lam, in_gradient=True)
  trainer, state, batch = _setup(config, tmp_path)
  support = jax.tree.map(lambda x: x[:batch['image'].shape[0] // 2], batch)
  loss = functools.partial(_reference_loss, trainer, state)

  def spread(params):
    return _spread_reference({t: _sgd(params, jax.grad(loss)(params, support['image'], support, t),
                                      inner_lr, t) for t in TASKS})

  want_loss, meta_grad = _fo_maml_reference(trainer, state, batch, inner_lr, 1)
  want_spread, spread_grad = jax.jit(jax.value_and_grad(spread))(state.params)
  want_grad = jax.tree.map(lambda a, b: a + lam * b, meta_grad, spread_grad)
  ratio = optax.global_norm(spread_grad) * lam / optax.global_norm(meta_grad)
  assert 0.1 < float(ratio) < 10, ratio  # both parts of the gradient matter here
  updates, _ = trainer.tx.update(want_grad, state.opt_state, state.params)
  want_params = jax.device_get(optax.apply_updates(state.params, updates))

  new_state, scalars = trainer.train_step(state, trainer.rest, batch)
  np.testing.assert_allclose(scalars['spread'], want_spread, rtol=1e-5)
  np.testing.assert_allclose(scalars['loss'], want_loss + lam * want_spread, rtol=1e-5)
  np.testing.assert_allclose(scalars['grad_norm'], optax.global_norm(want_grad), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-7),
               jax.device_get(new_state.params), want_params)


@pytest.mark.slow
def test_metasgd_learning_rates_receive_the_second_order_gradient(tfds_dir, tmp_path):
  """d(meta-loss)/d(alpha_shared, alpha_t) equals jax.grad of the reference
  mean_t L_q,t(theta - alpha_{shared|t} grad L_s,t(theta)), and the outer step moves the rates."""
  config = _config(tfds_dir, 'metasgd')
  config.metasgd.init = 0.3
  trainer, state, batch = _setup(config, tmp_path)
  half = batch['image'].shape[0] // 2
  support = jax.tree.map(lambda x: x[:half], batch)
  query = jax.tree.map(lambda x: x[half:], batch)
  loss = functools.partial(_reference_loss, trainer, state)

  def reference(alphas):
    total = 0.0
    for task in TASKS:
      g = jax.grad(loss)(state.params, support['image'], support, task)
      flat, treedef = jax.tree_util.tree_flatten_with_path(state.params)
      adapted = []
      for (key, p), gi in zip(flat, jax.tree.leaves(g)):
        owner = _task_of(sharding.path_str(key))
        adapted.append(p - alphas[owner or 'shared'] * gi if owner in (None, task) else p)
      total += loss(jax.tree.unflatten(treedef, adapted), query['image'], query, task)
    return total / len(TASKS)

  alphas = jax.device_get(state.extra['inner_lr'])
  assert sorted(alphas) == sorted(('shared',) + TASKS)
  want = jax.jit(jax.grad(reference))(alphas)
  assert all(abs(float(g)) > 1e-6 for g in want.values()), want
  updates, _ = trainer.tx.update(want, trainer.tx.init(alphas), alphas)  # the rates' optimizer
  new_state, scalars = trainer.train_step(state, trainer.rest, batch)
  for name in alphas:
    got = float(new_state.extra['inner_lr'][name])
    np.testing.assert_allclose(got, alphas[name] + updates[name], rtol=0, atol=1e-7, err_msg=name)
    assert abs(got - 0.3) > 1e-6 and scalars[f'inner_lr/{name}'] == got, name


@pytest.mark.slow
def test_a_task_pass_computes_only_that_tasks_path(tfds_dir, tmp_path):
  """The compiled inner step of task semseg in the two-task model costs what the same step costs
  in a model built for semseg alone (XLA removes sal's TS-LoRA stream, downsampler and head), and
  less than the loss of both tasks (sal's path adds 16% to the backbone's FLOPs here)."""
  def flops(fn, *args):
    return perf.StepCost.of(jax.jit(fn).lower(*args).compile()).flops

  costs = {}
  for tasks in (TASKS, ('semseg',)):
    config = _config(tfds_dir, 'maml')
    config.tasks = ','.join(tasks)
    trainer, state, batch = _setup(config, tmp_path / '_'.join(tasks))
    method = trainer.method
    def inner(params, method=method, state=state, trainer=trainer):
      return jax.grad(lambda p: method.task_loss(state, trainer.rest, p, batch, 'semseg', None,
                                                 state.batch_stats)[0])(params)
    def both(params, method=method, state=state, trainer=trainer):
      return jax.grad(lambda p: jnp.sum(method.task_objectives(state, trainer.rest, p, batch)[0]))(
          params)
    costs[tasks] = (flops(inner, state.params), flops(both, state.params))
  one_of_two, all_of_two = costs[TASKS]
  alone, _ = costs[('semseg',)]
  assert one_of_two == pytest.approx(alone, rel=0.02), costs
  assert all_of_two > 1.1 * one_of_two, costs


@pytest.mark.slow
@pytest.mark.parametrize('method,symmetric', [('maml', True), ('metasgd', False), ('taml', True)])
def test_scan_over_tasks_equals_the_unrolled_loop(tfds_dir, tmp_path, monkeypatch, method,
                                                  symmetric):
  """config.maml.loop='scan' computes the meta-gradient, the inner-rate gradient, the scalars and
  the BatchNorm statistics of 'unroll' (the literal loop), with every part trainable (heads and
  downsamplers with BatchNorm, TS-LoRA selected into the first task's places). symmetric=False
  forces the path of models whose task maps are not named by task (MLoRE, dynamic ProMLoRA):
  every task's maps computed, task t's read. MAML's symmetric path runs on all four tasks; the
  other cases on two, Meta-SGD's (the rates' gradient) on the other path, TAML's (the adapted
  parameters) on the symmetric one: each part in one case, to keep the suite's time."""
  from mtl_jax.methods import maml as maml_lib  # pylint: disable=g-import-not-at-top
  if not symmetric:
    monkeypatch.setattr(maml_lib.multitask, 'tasks_symmetric', lambda model: False)
  out, spreads = {}, {}
  tasks = PASCAL if (method, symmetric) == ('maml', True) else TASKS
  for loop in ('unroll', 'scan'):
    config = _config(tfds_dir, method)
    config.tasks = ','.join(tasks)
    config.frozen = ()  # heads, downsamplers, norms too
    config.maml.loop = loop
    trainer, state, batch = _setup(config, tmp_path / loop)
    _, grads, lr_grads, scalars, stats, adapted = jax.jit(trainer.method.meta_gradients)(
        state, trainer.rest, batch)
    out[loop] = jax.device_get((grads, lr_grads, scalars, stats))
    spreads[loop] = float(trainer.method.spread(adapted)) if method == 'taml' else None
    initial = jax.device_get(state.batch_stats)
  (g0, lr0, s0, st0), (g1, lr1, s1, st1) = out['unroll'], out['scan']
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(g0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale),
               g0, g1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7), st0, st1)
  assert s0.keys() == s1.keys()
  for k in s0:
    np.testing.assert_allclose(s1[k], s0[k], rtol=1e-5, err_msg=k)
  if method == 'metasgd':
    assert set(lr0) == {'shared', *tasks}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4), lr0, lr1)
  if method == 'taml':  # every theta_t' comes back from the scan too (TAML's spread)
    assert spreads['unroll'] > 0
    np.testing.assert_allclose(spreads['scan'], spreads['unroll'], rtol=1e-4)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), initial, st0))
  assert all(moved)  # every task's pass updated its own head's statistics
