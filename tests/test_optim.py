"""Optimizers and schedules against numpy ports of the torch / timm update rules."""

import numpy as np
import optax
import pytest

from configs import common
from mtl_jax import optim


def _config(**overrides):
  c = common.get_config()
  c.total_steps = 100
  for key, value in overrides.items():
    c[key].update(value)
  return c


def test_poly_schedule_is_mlore_formula():
  sched = optim.make_schedule(_config(optimizer=dict(learning_rate=2e-5)))
  for k in (0, 1, 37, 99, 100):
    np.testing.assert_allclose(sched(k), 2e-5 * (1 - k / 100) ** 0.9, rtol=1e-6, atol=1e-12)


def test_warmup_cosine_is_timm_formula():
  c = _config(optimizer=dict(learning_rate=1e-3),
              schedule=dict(name='warmup_cosine', warmup_steps=10, warmup_lr=1e-6, min_lr=1e-5))
  sched = optim.make_schedule(c)
  for t in (0, 5, 10, 40, 99):
    if t < 10:  # timm: warmup_lr + t * (base - warmup_lr) / warmup_t
      want = 1e-6 + t * (1e-3 - 1e-6) / 10
    else:  # then one cosine over the remaining steps (warmup_prefix=True)
      want = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + np.cos(np.pi * (t - 10) / 90))
    np.testing.assert_allclose(sched(t), want, rtol=1e-5)


def _torch_adam(params, grads_seq, lr_fn, wd, decoupled, decays, clip):
  """numpy port of torch.optim.Adam / AdamW (betas .9/.999, eps 1e-8) with clip_grad_norm_."""
  p = {k: v.astype(np.float64).copy() for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  for t, grads in enumerate(grads_seq, start=1):
    g = {k: x.astype(np.float64) for k, x in grads.items()}
    if clip:
      norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
      g = {k: x * min(1.0, clip / (norm + 1e-6)) for k, x in g.items()}
    lr = lr_fn(t - 1)
    for k in p:
      d = wd if decays[k] else 0.0
      if decoupled:
        p[k] *= 1 - lr * d
      else:
        g[k] = g[k] + d * p[k]
      m[k] = 0.9 * m[k] + 0.1 * g[k]
      v2[k] = 0.999 * v2[k] + 0.001 * g[k] ** 2
      mhat, vhat = m[k] / (1 - 0.9 ** t), v2[k] / (1 - 0.999 ** t)
      p[k] -= lr * mhat / (np.sqrt(vhat) + 1e-8)
  return p


@pytest.mark.parametrize('name', ['adam', 'adamw'])
def test_optimizer_matches_torch(name):
  rng = np.random.default_rng(0)
  params = {'w': rng.normal(size=(4, 3)).astype(np.float32),
            'b': rng.normal(size=(3,)).astype(np.float32)}
  grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) * 5 for k, v in params.items()}
               for _ in range(5)]
  wd = 0.05 if name == 'adamw' else 1e-2
  c = _config(optimizer=dict(name=name, learning_rate=1e-2, weight_decay=wd, grad_clip_norm=3.0,
                             decay_1d=(name == 'adam')))
  tx, sched = optim.make_optimizer(c)
  state, p = tx.init(params), dict(params)
  for grads in grads_seq:
    updates, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, updates)
  decays = {'w': True, 'b': name == 'adam'}  # MTLoRA: no decay for 1-D parameters
  want = _torch_adam(params, grads_seq, lambda k: float(sched(k)), wd, name == 'adamw', decays,
                     clip=3.0)
  for k in params:  # optax clips with norm (no +1e-6); the difference is far below 1e-5
    np.testing.assert_allclose(p[k], want[k], rtol=1e-5, atol=1e-6)


def test_decay_mask_patterns():
  params = {'backbone': {'pos_embed': np.zeros((1, 5, 4)), 'norm': {'scale': np.zeros(4)}},
            'head': {'kernel': np.zeros((4, 2))}}
  mask = optim.decay_mask(params, decay_1d=False, no_decay=('pos_embed',))
  assert mask == {'backbone': {'pos_embed': False, 'norm': {'scale': False}},
                  'head': {'kernel': True}}


def test_unknown_optimizer_names_the_key():
  with pytest.raises(ValueError, match='config.optimizer.name'):
    optim.make_optimizer(_config(optimizer=dict(name='sgd')))
  with pytest.raises(ValueError, match='config.schedule.name'):
    optim.make_schedule(_config(schedule=dict(name='step')))
