"""Training methods: what one train step computes, selected by `config.method`.

The trainer (mtl_jax/train.py) owns everything a method shares with every other: the mesh, the
state shardings and donation, checkpoints and exact resume, evaluation and reports. A method owns
its train step, any extra train state and the scalars it logs. The contract:

  @methods.register('name')          # the `config.method` value
  class MyMethod(methods.Method):
    def init_extra(self, params):    # optional: extra train state, a pytree (default: none)
      ...
    def train_step(self, state, rest, batch):
      ...                            # -> (new TrainState, {scalar name: 0-d array})

`train_step` is traced once under `jax.jit` with the state sharded by `config.param_sharding`
and donated, `batch` split over the mesh; `state.extra` holds what `init_extra` returned (it is
sharded, checkpointed and restored with the rest of the state). The scalars are averaged over
each logging window and written as `train/<name>`; a method must return 'loss' (checked finite).
`Method` gives the common pieces: `forward` (model call with the step's RNG streams and the
updated BatchNorm statistics), `losses` (the configured weighted sum) and `apply_gradients`
(optimizer update and the standard scalars). Adding a method is one module here plus a config
(docs/extending.md).

Methods (docs/methods.md): 'mtl' (mtl.py, the references' weighted-sum objective; the default);
the user's fork's meta-learning 'maml', 'metasgd', 'taml', 'reptile'; task weighting and gradient
surgery 'uncertainty', 'dwa', 'pcgrad', 'famo'. Helpers for per-task work (which task owns a
parameter, per-task objectives and gradients) are in base.py.
"""

from mtl_jax import registry
from mtl_jax.methods.base import Method

_METHODS = registry.Registry('config.method')
register = _METHODS.register  # class decorator: `config.method = name` selects the class
get = _METHODS.get  # the class registered as `name`; ConfigError listing the known ones


# pylint: disable=g-import-not-at-top,wrong-import-position  (the imports register the methods)
from mtl_jax.methods import mtl
from mtl_jax.methods import maml
from mtl_jax.methods import metasgd
from mtl_jax.methods import reptile
from mtl_jax.methods import taml
from mtl_jax.methods import uncertainty
from mtl_jax.methods import dwa
from mtl_jax.methods import pcgrad
from mtl_jax.methods import famo

__all__ = ['Method', 'get', 'register', 'dwa', 'famo', 'maml', 'metasgd', 'mtl', 'pcgrad',
           'reptile', 'taml', 'uncertainty']
