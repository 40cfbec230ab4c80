"""Timing helpers shared by the step benchmarks, with no framework imports (the reference
scripts run in a torch-only environment)."""

import json
import resource
import statistics
import time
from collections.abc import Callable


def time_steps(step: Callable[[], None], steps: int) -> tuple[float, float, float]:
  """(first call, median, fastest) seconds of `step()`: one warm-up call, then `steps` timed."""
  start = time.perf_counter()
  step()
  first = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return first, statistics.median(times), min(times)


def peak_rss_mib() -> float:
  """Peak resident set size of this process in MiB (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(cuda_bytes: int | None = None) -> tuple[int, str]:
  """(bytes, text) of a reference step's peak: `cuda_bytes` (torch.cuda.max_memory_allocated) on
  GPU, else this process's peak RSS."""
  if cuda_bytes is not None:
    return cuda_bytes, f'peak GPU memory {cuda_bytes / 2 ** 30:.2f} GiB'
  mib = peak_rss_mib()
  return int(mib * 2 ** 20), f'peak RSS {mib:.0f} MiB'


def print_result(model: str, device: str, batch: int, first: float, median: float,
                 peak_memory_bytes: int) -> None:
  """The machine-readable last line of a reference step script (read by benchmarks/gpu_suite.py)."""
  print(json.dumps({'model': model, 'device': device, 'batch': batch, 'compile_s': round(first, 1),
                    'ms_per_step': median * 1e3, 'perf/img_per_sec': batch / median,
                    'perf/peak_memory_bytes': peak_memory_bytes}), flush=True)
