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

Methods: 'mtl' (mtl.py, the references' weighted-sum objective; the default).
"""

from mtl_jax import registry
from mtl_jax.methods.base import Method

_METHODS = registry.Registry('config.method')
register = _METHODS.register  # class decorator: `config.method = name` selects the class
get = _METHODS.get  # the class registered as `name`; ConfigError listing the known ones


from mtl_jax.methods import mtl  # pylint: disable=g-import-not-at-top,wrong-import-position  (registers)

__all__ = ['Method', 'get', 'register', 'mtl']
