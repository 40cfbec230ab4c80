"""'pcgrad': projecting conflicting gradients (Yu et al., "Gradient Surgery for Multi-Task
Learning", NeurIPS 2020; docs/methods.md §4).

Per-task gradients g_t of l_t = w_t L_t on the shared parameters (one forward, T vmapped
backward passes). For each task t, for the other tasks j in a random order (drawn from the step's
key): if g_t^PC . g_j < 0, g_t^PC -= (g_t^PC . g_j / |g_j|^2) g_j. The update direction on the
shared leaves is sum_t g_t^PC (the paper's sum, so no conflict = the 'mtl' gradient); a task's
own leaves (heads, TS-LoRA) get their task's gradient, the regulariser (MLoRE's L_cv) its own
gradient. Every projection is done on the T x T Gram matrix of the gradients, so the only
full-size work is the Gram matrix and one weighted sum per leaf, sharded like the parameters.
Logs loss, <task>_loss, conflicts (pairs g_t . g_j < 0 of the original gradients), grad_norm,
learning_rate.
"""

import jax
import jax.numpy as jnp

from mtl_jax import methods


def gram(grads, shared) -> jax.Array:
  """G[s, t] = g_s . g_t over the leaves where `shared` is True (leaves have a leading T axis)."""
  terms = [jnp.einsum('s...,t...->st', g, g) for g, m in zip(jax.tree.leaves(grads),
                                                              jax.tree.leaves(shared)) if m]
  return sum(terms)


def projections(g: jax.Array, key: jax.Array) -> jax.Array:
  """A (T, T) with g_t^PC = sum_k A[t, k] g_k, from the Gram matrix `g` (T, T) alone:
  g_t^PC . g_j = A[t] . g[:, j]. Task t visits the others in the order
  `jax.random.permutation(fold_in(key, t), others)`."""
  num = g.shape[0]
  rows = []
  for t in range(num):
    a = jax.nn.one_hot(t, num, dtype=g.dtype)
    others = jnp.array([j for j in range(num) if j != t])
    for j in jax.random.permutation(jax.random.fold_in(key, t), others):
      dot, norm = a @ g[:, j], g[j, j]
      step = jnp.where((dot < 0) & (norm > 0), dot / jnp.where(norm > 0, norm, 1.0), 0.0)
      a = a - step * jax.nn.one_hot(j, num, dtype=g.dtype)
    rows.append(a)
  return jnp.stack(rows)


@methods.register('pcgrad')
class PCGrad(methods.Method):
  """PCGrad on the shared parameters (module docstring)."""

  def combine(self, grads, reg_grads, params, key):
    """(per-task gradients with a leading T axis, regulariser gradients) -> (update direction,
    Gram matrix of the shared gradients)."""
    shared = jax.tree.map(lambda o: o == '', self.owners(params))
    g = gram(grads, shared)
    coeffs = jnp.sum(projections(g, key), axis=0)  # sum_t g_t^PC = sum_k coeffs[k] g_k
    combined = jax.tree.map(
        lambda x, m: jnp.tensordot(coeffs, x, axes=1) if m else jnp.sum(x, axis=0), grads, shared)
    return jax.tree.map(jnp.add, combined, reg_grads), g

  def train_step(self, state, rest, batch):
    key = self.step_key(state)
    objectives, reg, grads, reg_grads, per_task, stats = self.task_gradients(
        state, rest, state.params, batch, key)
    direction, g = self.combine(grads, reg_grads, state.params, jax.random.fold_in(key, 1))
    loss = jnp.sum(objectives) + reg
    state, scalars = self.apply_gradients(state, direction, batch_stats=stats)
    conflicts = jnp.sum(jnp.triu(g < 0, k=1))
    return state, {'loss': loss, **scalars, 'conflicts': conflicts.astype(jnp.float32),
                   **{f'{t}_loss': v for t, v in per_task.items()}}
