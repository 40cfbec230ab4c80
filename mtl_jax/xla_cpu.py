"""XLA:CPU settings that change how fast a program runs, never what it computes (docs/stack.md).

`unroll_threefry()`: jax lowers its threefry2x32 hash, which every `jax.random` draw under the
default PRNG goes through, to a rolled 5-iteration while loop on CPU (cheaper to compile) and to
straight-line code everywhere else. The loop cannot fuse with its producer or consumer: on the
project's 2-core CPU a 40 M-element `jax.random.bernoulli` takes 436 ms rolled and 128 ms
unrolled, and dropout masks (MTLoRA's and ProMLoRA's LoRA dropout draws one per input element of
every qkv / proj / fc1 / fc2) made up about a fifth of a ProMLoRA train step. This selects jax's
own unrolled lowering for CPU too: the same algorithm, so the same random bits and Bernoulli
(dropout, drop-path) masks (tests/test_models.py). Draws that go through float transforms
(normal, truncated-normal: initialisers, MLoRE's router noise) can round differently in the last
ulp, because XLA fuses them differently, so a CPU run is deterministic but not bit-identical to
one made before this change (docs/stack.md §11). It uses a private jax module (jax is pinned in
requirements.txt); if that moves, it logs a warning and leaves the default.
"""

from absl import logging

_DONE = False


def unroll_threefry() -> None:
  """Use the unrolled threefry2x32 lowering on CPU (idempotent; module docstring)."""
  global _DONE
  if _DONE:
    return
  try:
    from jax._src.interpreters import mlir  # pylint: disable=g-import-not-at-top
    from jax._src.random import threefry2x32  # pylint: disable=g-import-not-at-top
    mlir.register_lowering(threefry2x32.threefry2x32_p,
                           threefry2x32._threefry2x32_lowering_rule,  # pylint: disable=protected-access
                           platform='cpu')
  except (ImportError, AttributeError) as e:  # a jax without these internals: only slower
    logging.warning('mtl_jax.xla_cpu.unroll_threefry: not applied (%s); CPU random draws keep '
                    "jax's rolled lowering", e)
  _DONE = True
