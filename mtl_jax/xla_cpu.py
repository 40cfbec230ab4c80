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

`set_host_memory(config)`: XLA:CPU allocates every buffer of a step with the C library's
`malloc`. glibc serves large blocks with a fresh `mmap` and returns them with `munmap` on free, so
each step page-faults (and the kernel zeroes) every large activation again, 4 KiB at a time:
about 2 M faults per ProMLoRA-T step at 448² on the project's 2-core CPU. With
`config.host_huge_pages` glibc asks for transparent huge pages on those mappings
(`glibc.malloc.hugetlb=1`), 2 MiB per fault (benchmarks/RESULTS.md). glibc reads its
tunables only at process start, so launch.py and the benchmarks call `set_host_memory` first
and it re-executes the process once with GLIBC_TUNABLES set, on CPU-only hosts (docs/stack.md §13).
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

from absl import logging
import jax

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


# glibc's tunable for config.host_huge_pages (docs/stack.md §13).
HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'
_THP = '/sys/kernel/mm/transparent_hugepage/enabled'


def host_huge_pages() -> bool:
  """Whether this process started with HUGE_PAGES_TUNABLE."""
  return HUGE_PAGES_TUNABLE in os.environ.get('GLIBC_TUNABLES', '').split(':')


def _cpu_only() -> bool:
  """Whether jax will run on the CPU alone: `jax_platforms` says so, or no accelerator plugin
  (CUDA / ROCm / TPU) is installed. Reads no backend."""
  platforms = jax.config.jax_platforms
  if platforms:
    return all(p.strip() == 'cpu' for p in platforms.split(','))
  if importlib.metadata.entry_points(group='jax_plugins'):
    return False
  return not any(importlib.util.find_spec(m) for m in ('jax_plugins', 'libtpu'))


def set_host_memory(config) -> None:
  """Applies `config.host_huge_pages` (module docstring): if True, re-executes this process (same
  interpreter and argv) with HUGE_PAGES_TUNABLE added to GLIBC_TUNABLES, unless it has it
  already, the host is not glibc Linux, the kernel has no transparent huge pages, jax has an
  accelerator, or jax's backends already started (a warning). Call it before anything else."""
  if (not config.get('host_huge_pages', False) or host_huge_pages()
      or not sys.platform.startswith('linux')):
    return
  try:
    ctypes.CDLL(None).gnu_get_libc_version  # pylint: disable=pointless-statement
    with open(_THP) as f:
      if '[never]' in f.read():
        return
  except (OSError, AttributeError):  # not glibc Linux, or a kernel without THP: nothing to do
    return
  if not _cpu_only():
    return
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    logging.warning('config.host_huge_pages not applied: jax backends already started '
                    '(docs/stack.md §13)')
    return
  env = dict(os.environ)
  env['GLIBC_TUNABLES'] = ':'.join(filter(None, (env.get('GLIBC_TUNABLES'), HUGE_PAGES_TUNABLE)))
  logging.info('config.host_huge_pages: restarting with GLIBC_TUNABLES=%s', env['GLIBC_TUNABLES'])
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
