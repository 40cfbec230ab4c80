"""The defining property of each task-weighting / gradient-surgery method, on tiny problems
(mtl_jax/methods/{uncertainty,dwa,pcgrad,famo}.py; docs/methods.md §4). Their runs through the
trainer (resume, devices, frozen leaves) are in test_methods.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_jax.methods import dwa
from mtl_jax.methods import famo
from mtl_jax.methods import pcgrad
from mtl_jax.methods import uncertainty


def test_uncertainty_optimum_is_the_log_loss_and_weights_are_half_inverse_variances():
  objectives = jnp.array([0.3, 2.0, 7.5])
  grad_s = jax.grad(uncertainty.weighted_loss, argnums=1)
  np.testing.assert_allclose(grad_s(objectives, jnp.log(objectives)), 0.0, atol=1e-7)
  log_vars = jnp.array([-0.5, 0.0, 1.0])
  np.testing.assert_allclose(jax.grad(uncertainty.weighted_loss)(objectives, log_vars),
                             1 / (2 * np.exp(log_vars)), rtol=1e-6)


def test_dwa_weights_favour_the_task_whose_loss_falls_slowest():
  history = jnp.array([[2.0, 1.0, 4.0], [1.0, 0.9, 2.0]])  # periods k-2, k-1: ratios .5 .9 .5
  w = np.asarray(dwa.dwa_weights(history, jnp.array(2), 2.0))
  ratios = np.array([0.5, 0.9, 0.5])
  np.testing.assert_allclose(w, 3 * np.exp(ratios / 2) / np.exp(ratios / 2).sum(), rtol=1e-6)
  assert w[1] > w[0] == w[2] and np.isclose(w.sum(), 3)
  np.testing.assert_array_equal(dwa.dwa_weights(history, jnp.array(1), 2.0), np.ones(3))


def _numpy_pcgrad(vectors, orders):
  """The paper's algorithm on explicit vectors: each task projected, in `orders[t]`, off the
  original gradients it conflicts with."""
  out = []
  for t, g in enumerate(vectors):
    g = g.copy()
    for j in orders[t]:
      dot = g @ vectors[j]
      if dot < 0:
        g -= dot / (vectors[j] @ vectors[j]) * vectors[j]
    out.append(g)
  return np.stack(out)


def test_pcgrad_projected_gradients_do_not_conflict():
  key = jax.random.key(3)
  v = np.array([[1.0, 0.2, 0.0], [-0.8, 1.0, 0.1]])  # two conflicting gradients
  a = np.asarray(pcgrad.projections(jnp.asarray(v @ v.T), key))
  pc = a @ v
  assert v[0] @ v[1] < 0
  np.testing.assert_allclose([pc[0] @ v[1], pc[1] @ v[0]], 0.0, atol=1e-6)  # >= 0, here = 0
  v3 = np.random.RandomState(0).randn(3, 6)
  v3[2] = -v3[0] + 0.3 * v3[2]
  orders = [np.asarray(jax.random.permutation(jax.random.fold_in(key, t),
                                              jnp.array([j for j in range(3) if j != t])))
            for t in range(3)]
  np.testing.assert_allclose(np.asarray(pcgrad.projections(jnp.asarray(v3 @ v3.T), key)) @ v3,
                             _numpy_pcgrad(v3, orders), rtol=1e-5, atol=1e-6)
  # No conflict: the update is the plain sum.
  v = np.array([[1.0, 0.0], [0.5, 1.0]])
  np.testing.assert_allclose(pcgrad.projections(jnp.asarray(v @ v.T), key), np.eye(2))


def test_famo_descends_weighted_log_losses_and_downweights_the_fastest_task():
  objectives, logits = jnp.array([0.5, 2.0]), jnp.array([0.3, -0.1])
  z = np.asarray(jax.nn.softmax(logits))
  c = np.sum(z / np.asarray(objectives))
  np.testing.assert_allclose(jax.grad(famo.famo_loss)(objectives, logits),
                             z / (c * np.asarray(objectives)), rtol=1e-5)
  # Task 0's log loss fell by log 2, task 1's by log 1.1: task 0 loses weight.
  after = objectives / jnp.array([2.0, 1.1])
  grad = famo.logit_gradient(logits, objectives, after)
  tx = famo.logit_optimizer(0.025, 0.01)
  updates, _ = tx.update(grad, tx.init(logits), logits)
  new = jax.nn.softmax(optax.apply_updates(logits, updates))
  assert new[0] < z[0] and new[1] > z[1]
