r"""Runs two step benchmarks side by side, A B A B, and prints the speed ratio.

  python benchmarks/side_by_side.py --rounds=2 \
      --a='python benchmarks/promlora_step.py --steps=3' \
      --b="VENV/bin/python benchmarks/reference_promlora_step.py --fork=FORK_CHECKOUT \
           --steps=3 --threads=2"

Each command must print a line with `median N ms/step` (and, optionally, `peak RSS N MiB`), as
benchmarks/*_step.py and benchmarks/reference_*_step.py do. The commands run one at a time, in
turn, `--rounds` times; before each run the 1-minute load average is recorded (a loaded machine
once made a comparison wrong by 6x: compare only runs at similar, low load). Prints one row per
run, then each side's median and spread over its runs and the ratio B / A (> 1: A is faster).
Copy the output into benchmarks/RESULTS.md with the machine and date.
"""

import argparse
import re
import shlex
import statistics
import subprocess
import sys
import time


def load_average() -> float:
  with open('/proc/loadavg') as f:
    return float(f.read().split()[0])


def run(command: str) -> dict:
  """{'ms': median ms/step, 'rss': peak RSS MiB or None, 'load': load before} of one run."""
  load = load_average()
  start = time.time()
  result = subprocess.run(shlex.split(command), capture_output=True, text=True, check=False)
  text = result.stdout + result.stderr
  medians = re.findall(r'median ([\d,.]+) ms/step', text)
  if result.returncode or not medians:
    sys.exit(f'error: `{command}` exited {result.returncode} without a "median N ms/step" line; '
             f'its last output: {text.strip().splitlines()[-1:] or "(none)"}')
  rss = re.findall(r'peak RSS ([\d,.]+) MiB', text)
  return {'ms': float(medians[-1].replace(',', '')), 'load': load, 'wall': time.time() - start,
          'rss': float(rss[-1].replace(',', '')) if rss else None}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--a', required=True, help='command A (e.g. the mtl_jax benchmark)')
  parser.add_argument('--b', required=True, help='command B (e.g. the reference benchmark)')
  parser.add_argument('--rounds', type=int, default=2)
  args = parser.parse_args(argv)
  runs = {'A': [], 'B': []}
  print(f'A: {args.a}\nB: {args.b}')
  print(f'{"run":<6} {"load":>5} {"ms/step":>10} {"peak RSS MiB":>13} {"wall s":>7}')
  for r in range(args.rounds):
    for side, command in (('A', args.a), ('B', args.b)):
      row = run(command)
      runs[side].append(row)
      rss = f'{row["rss"]:,.0f}' if row['rss'] is not None else '-'
      print(f'{side}{r + 1:<5} {row["load"]:5.2f} {row["ms"]:10,.0f} {rss:>13} '
            f'{row["wall"]:7.0f}', flush=True)
  medians = {side: statistics.median(r['ms'] for r in rows) for side, rows in runs.items()}
  for side, rows in runs.items():
    ms = [r['ms'] for r in rows]
    print(f'{side}: median {medians[side]:,.0f} ms/step over {len(ms)} runs '
          f'(spread {min(ms):,.0f}-{max(ms):,.0f})')
  print(f'ratio B / A = {medians["B"] / medians["A"]:.2f} (> 1: A is faster)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
