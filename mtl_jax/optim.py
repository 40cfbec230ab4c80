"""Optimizers and per-step learning-rate schedules of the two references.

* MLoRE (docs/mlore.md §5): ``torch.optim.Adam`` with *coupled* L2 (weight decay added to the
  gradient before the Adam moments) on every parameter, polynomial decay (power 0.9, no warmup),
  global-norm clipping before the step.
* MTLoRA (docs/mtlora.md §8): AdamW (decoupled decay) with no decay for 1-D parameters and
  biases, linear warmup from ``warmup_lr`` then one cosine to ``min_lr`` (timm's
  CosineLRScheduler with ``warmup_prefix=True``, stepped per iteration), clipping before the step.

The schedule is a function of the number of completed optimizer steps, like the references'
per-iteration schedulers. Config keys: ``config.optimizer.{name ('adam' | 'adamw'),
learning_rate, b1, b2, eps, weight_decay, grad_clip_norm (0 = off), decay_1d, no_decay}`` and
``config.schedule.{name ('poly' | 'warmup_cosine' | 'constant'), power, warmup_steps, warmup_lr,
min_lr}``; ``config.total_steps``.
"""

import re

import jax
import optax

from mtl_jax import ConfigError
from mtl_jax import sharding


def frozen_filter(patterns):
  """nnx filter (path, value) -> True for parameters matched by a `config.frozen` regex."""
  compiled = [re.compile(p) for p in patterns]
  return lambda path, _: any(p.search('/'.join(map(str, path))) for p in compiled)


def make_schedule(config) -> optax.Schedule:
  """Learning rate as a function of the completed step count."""
  sched, lr = config.schedule, config.optimizer.learning_rate
  if sched.name == 'poly':
    # lr_k = (lr - min_lr) * (1 - k / total)^power + min_lr (MLoRE: min_lr = 0, power 0.9).
    return optax.polynomial_schedule(init_value=lr, end_value=sched.min_lr, power=sched.power,
                                     transition_steps=config.total_steps)
  if sched.name == 'warmup_cosine':
    if not 0 <= sched.warmup_steps < config.total_steps:
      raise ConfigError(f'config.schedule.warmup_steps={sched.warmup_steps} must be in '
                        f'[0, config.total_steps={config.total_steps})')
    return optax.warmup_cosine_decay_schedule(
        init_value=sched.warmup_lr, peak_value=lr, warmup_steps=sched.warmup_steps,
        decay_steps=config.total_steps, end_value=sched.min_lr)
  if sched.name == 'constant':
    return optax.constant_schedule(lr)
  raise ConfigError(f'unknown schedule {sched.name!r}; use poly, warmup_cosine or constant '
                   '(fix --config.schedule.name)')


def decay_mask(params, *, decay_1d: bool, no_decay=()):
  """True where weight decay applies: not for 1-D leaves (unless decay_1d) or `no_decay` regexes."""
  patterns = [re.compile(p) for p in no_decay]

  def decays(path, leaf):
    name = sharding.path_str(path)
    if not decay_1d and leaf.ndim <= 1:
      return False
    return not any(p.search(name) for p in patterns)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax transformation (clipping included) and its schedule."""
  opt = config.optimizer
  schedule = make_schedule(config)
  mask = lambda params: decay_mask(params, decay_1d=opt.decay_1d, no_decay=tuple(opt.no_decay))
  if opt.name == 'adam':  # torch.optim.Adam(weight_decay=wd): g <- g + wd * p, then Adam.
    tx = optax.chain(
        optax.add_decayed_weights(opt.weight_decay, mask=mask),
        optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps),
        optax.scale_by_learning_rate(schedule))
  elif opt.name == 'adamw':  # torch.optim.AdamW: p <- p - lr * (adam + wd * p).
    tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                     weight_decay=opt.weight_decay, mask=mask)
  else:
    raise ConfigError(f'unknown optimizer {opt.name!r}; use adam or adamw '
                     '(fix --config.optimizer.name)')
  if opt.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx, schedule
