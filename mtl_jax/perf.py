"""Step throughput, model FLOPs utilisation and peak memory (`perf/*` in metrics.jsonl).

`StepCost.of(compiled)` reads XLA's cost analysis of the compiled train step: the FLOPs one
device executes per step (the module is the SPMD-partitioned per-device program, so on a mesh it
is the global step's FLOPs / devices; every elementwise op counts one FLOP per element, as XLA
counts them). MFU = step FLOPs x steps/s / peak FLOP/s of one device.

The peak comes from `PEAK_FLOPS` by `device.device_kind` (dense bf16 figures of the vendors'
data sheets: MFU is quoted against the bf16 peak whatever the compute dtype, as in the PaLM and
maxtext reports), or from `config.perf_peak_flops` when set. A device with no entry (CPU, an
unlisted accelerator) logs no `perf/mfu` unless the override is given; benchmarks pass the
measured rate of a large fp32 matmul on the machine (`matmul_flops`).

XLA counts nothing inside a custom call, so on GPU, where the ViT's attention is cuDNN's fused
kernel (docs/accelerators.md §3), the trainer takes the step's FLOPs from
`flops_with_xla_attention`: the cost analysis of the same step traced with the attention in its
XLA form (the un-partitioned program: its FLOPs / devices).

Peak memory: `peak_bytes_in_use` of device 0 where the backend reports memory statistics (GPU,
TPU); on CPU, where it does not, the process' peak resident set (`ru_maxrss`), which is what the
device arrays of a CPU "device" live in.
"""

import dataclasses
import functools
import resource
import sys
import time

from absl import logging
import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s of one device (one chip; one GPU), by jax's `device_kind`.
PEAK_FLOPS = {
    'NVIDIA H100 80GB HBM3': 989e12,
    'NVIDIA H100 PCIe': 756e12,
    'NVIDIA H200': 989e12,
    'NVIDIA A100-SXM4-80GB': 312e12,
    'NVIDIA A100-SXM4-40GB': 312e12,
    'NVIDIA A100 80GB PCIe': 312e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5': 459e12,  # v5p
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,  # Trillium
    'TPU v6e': 918e12,
}


def peak_flops(device: jax.Device, override: float = 0.0) -> float | None:
  """Peak FLOP/s of `device`: `override` if positive, else `PEAK_FLOPS`, else None."""
  if override and override > 0:
    return float(override)
  return PEAK_FLOPS.get(device.device_kind)


def matmul_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
  """Measured FLOP/s of an n x n x n matmul on the default device (best of `repeats`)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)  # not constants (faster on some GPUs)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def peak_memory_bytes(device: jax.Device | None = None) -> int:
  """Peak bytes in use on `device` (default: the first local one) or, without device memory
  statistics (CPU), the process' peak resident set."""
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use'])
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == 'darwin' else rss * 1024)  # bytes on macOS, KiB on Linux


def _flops(analysis) -> float:
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per module
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get('flops', 0.0))


def attention_uncounted() -> bool:
  """Whether XLA's count of a compiled step misses the ViT attention: on GPU, where it is a cuDNN
  call (docs/accelerators.md §3); count with `flops_with_xla_attention` there."""
  return jax.default_backend() == 'gpu'


def flops_with_xla_attention(fn, *args, devices: int = 1, **jit_kwargs) -> float:
  """Per-device FLOPs of `jax.jit(fn, **jit_kwargs)(*args)` with every ViT attention traced in
  its XLA form, from the lowered (not compiled, so not yet partitioned) program: its global
  count / `devices` (the mesh's size where the step is spread over a mesh)."""
  from mtl_jax.models import vit  # pylint: disable=g-import-not-at-top
  step = jax.jit(functools.partial(fn), **jit_kwargs)  # a new function: not from jit's cache
  with vit.attention_implementation('xla'):
    return _flops(step.lower(*args).cost_analysis()) / devices


@dataclasses.dataclass(frozen=True)
class StepCost:
  """Per-device FLOPs of one compiled step and the peak FLOP/s they are measured against."""
  flops: float
  peak: float | None

  @classmethod
  def of(cls, compiled: jax.stages.Compiled, peak_override: float = 0.0,
         flops: float | None = None) -> 'StepCost':
    """The cost of `compiled` (or `flops` per device, where given) against the device's peak."""
    flops = _flops(compiled.cost_analysis()) if flops is None else flops
    peak = peak_flops(jax.local_devices()[0], peak_override)
    logging.info('Train step: %.3g FLOPs per device (XLA cost analysis); peak %s', flops,
                 f'{peak:.3g} FLOP/s' if peak else 'unknown (set --config.perf_peak_flops)')
    return cls(flops, peak)

  def scalars(self, steps_per_sec: float, global_batch: int) -> dict[str, float]:
    """`perf/*` scalars of a window that ran at `steps_per_sec`."""
    out = {'perf/img_per_sec': steps_per_sec * global_batch,
           'perf/peak_memory_bytes': float(peak_memory_bytes())}
    if self.flops:
      out['perf/flops_per_device_step'] = self.flops
      if self.peak:
        out['perf/mfu'] = self.flops * steps_per_sec / self.peak
    return out
