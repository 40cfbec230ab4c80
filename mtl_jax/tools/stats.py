r"""Relative gains of one multi-task result over single-task baselines, their mean and variance.

  python -m mtl_jax.tools.stats
  python -m mtl_jax.tools.stats --results=70.82,60.45,65.88,16.48
  python -m mtl_jax.tools.stats --results=semseg=68.1,human=60.2,saliency=64.9,normals=16.9
  python -m mtl_jax.tools.stats --results=41.2,22.5,0.62 --tasks=semseg,normals,depth \
      --baselines=semseg=40.65,normals=22.97,depth=0.64

The port of the user fork's `calcu_stats.py` (docs/user_fork.md §7 "Other tools"), which has four
PASCAL metrics and baselines hard-coded; the defaults here are those numbers (results 70.82,
60.45, 65.88, 16.48 against 67.21, 61.93, 62.35, 17.97). Per task the gain is
s (M - B) / B with s = -1 for lower-better metrics (normals mean, depth rmse); printed are the
gains, their mean (= Δm / 100, a fraction, as calcu_stats.py prints it), Δm in percent and the
population variance (ddof 0) of the gains. Baselines and task names are those of
`mtl_jax.tools.delta_m` (presets, and the fork's names human / saliency).
"""

import statistics
import sys

from mtl_jax.tools import delta_m
from mtl_jax.tools import tool_args

CALCU_STATS_RESULTS = '70.82,60.45,65.88,16.48'  # calcu_stats.py's a, b, c, d
CALCU_STATS_TASKS = 'semseg,human_parts,sal,normals'


def _task(name: str) -> str:
  task = delta_m.FORK_TASKS.get(name, name)
  if task not in delta_m.METRICS:
    raise tool_args.ToolError(f'unknown task {name!r}; use one of {", ".join(delta_m.METRICS)} '
                              f'(or the fork names {", ".join(delta_m.FORK_TASKS)})')
  return task


def _number(text: str, what: str) -> float:
  try:
    return float(text)
  except ValueError:
    raise tool_args.ToolError(f'{what}: {text!r} is not a number') from None


def parse_results(text: str, tasks: str = '') -> dict[str, float]:
  """{task: metric} from 'v1,v2,...' (in the order of `tasks`, default calcu_stats.py's four
  PASCAL tasks) or 'task=value,...'."""
  items = [item.strip() for item in text.split(',') if item.strip()]
  if not items:
    raise tool_args.ToolError('--results is empty; give comma-separated metrics')
  task_names = [_task(t.strip()) for t in (tasks or '').split(',') if t.strip()]
  if all('=' in item for item in items):
    results = {}
    for item in items:
      name, _, value = item.partition('=')
      results[_task(name.strip())] = _number(value, '--results')
    missing = [t for t in task_names if t not in results]
    if missing:
      raise tool_args.ToolError(f'--results has no value for {", ".join(missing)} of --tasks')
    return {t: results[t] for t in task_names} if task_names else results
  if any('=' in item for item in items):
    raise tool_args.ToolError('--results mixes task=value and bare values; use one form')
  task_names = task_names or CALCU_STATS_TASKS.split(',')
  if len(items) != len(task_names):
    raise tool_args.ToolError(f'--results has {len(items)} values for {len(task_names)} tasks '
                              f'({", ".join(task_names)}); give one value per task of --tasks')
  return {t: _number(v, '--results') for t, v in zip(task_names, items)}


def compute(results: dict[str, float], baselines: dict[str, float]) -> dict:
  """{'gains': {task: s (M - B) / B}, 'mean': mean gain, 'delta_m': Δm %, 'variance': ddof 0}."""
  missing = [t for t in results if t not in baselines]
  if missing:
    raise tool_args.ToolError(f'no baseline for {", ".join(missing)}; add it to --baselines '
                              '(task=value,...)')
  zero = [t for t in results if baselines[t] == 0]
  if zero:
    raise tool_args.ToolError(f'the baseline of {", ".join(zero)} is 0; relative gains need a '
                              'non-zero baseline')
  gains = {t: (-1.0 if delta_m.METRICS[t][1] else 1.0) * (m - baselines[t]) / baselines[t]
           for t, m in results.items()}
  return {'gains': gains, 'mean': statistics.fmean(gains.values()),
          'delta_m': delta_m.delta_m(results, baselines, list(results)),
          'variance': statistics.pvariance(gains.values())}


def format_report(results: dict[str, float], baselines: dict[str, float], stats: dict) -> str:
  lines = [f'{"task":<12} {"metric":<8} {"result":>10} {"baseline":>10} {"gain":>10}']
  for task, gain in stats['gains'].items():
    metric, lower = delta_m.METRICS[task]
    lines.append(f'{task:<12} {metric + (" (-)" if lower else ""):<8} {results[task]:>10g} '
                 f'{baselines[task]:>10g} {gain:>+10.6f}')
  lines += [f'mean gain (Δm / 100): {stats["mean"]!r}',
            f'Δm: {stats["delta_m"]:+.4f} %',
            f'variance of the gains (population, ddof 0): {stats["variance"]!r}']
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = tool_args.Parser(prog='python -m mtl_jax.tools.stats',
                            description=__doc__)
  parser.add_argument('--results', default=CALCU_STATS_RESULTS,
                      help='metrics: v1,v2,... in --tasks order, or task=value,... '
                           f'(default: calcu_stats.py\'s {CALCU_STATS_RESULTS})')
  parser.add_argument('--baselines', default='mtlora_swin_t_pascal',
                      help=f'a preset ({", ".join(delta_m.PRESETS)}) or task=value,... '
                           '(default: mtlora_swin_t_pascal = calcu_stats.py\'s 67.21, 61.93, '
                           '62.35, 17.97)')
  parser.add_argument('--tasks', default='',
                      help='comma list of mtl_jax or fork task names (default: the keys of '
                           f'--results, or {CALCU_STATS_TASKS} for bare values)')
  args, code = tool_args.parse(parser, argv)
  if args is None:
    return code
  try:
    results = parse_results(args.results, args.tasks)
    baselines = delta_m.parse_baselines(args.baselines)
    stats = compute(results, baselines)
  except (tool_args.ToolError, delta_m.DeltaMError) as e:
    return tool_args.report(e)
  print(format_report(results, baselines, stats))
  return 0


def cli():
  """Entry point of the console script (pyproject.toml) and of `python -m`."""
  sys.exit(main())


if __name__ == '__main__':
  cli()
