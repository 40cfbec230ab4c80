"""Timing helpers shared by the step benchmarks, with no framework imports (the reference
scripts run in a torch-only environment)."""

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
