r"""Δm of multi-task runs against single-task baselines (docs/datasets_metrics.md §5.1).

  python -m mtl_jax.tools.delta_m runs/mtlora_r64 --baselines=mtlora_swin_t_pascal
  python -m mtl_jax.tools.delta_m runs/seed0 runs/seed1 runs/seed2 \
      --baselines=semseg=67.21,human_parts=61.93,sal=62.35,normals=17.97 --output=runs/dm
  python -m mtl_jax.tools.delta_m output/swin/tag/log_rank0.txt --baselines=user_fork_paper_st
  python -m mtl_jax.tools.delta_m --log-file output/NAME/TAG/log_rank0.txt --use-paper-st \
      --tasks semseg,human,saliency,normals --csv-out dm.csv      # compute_delta_m.py's flags

Δm = (1/T) Σ_t (−1)^{l_t} (M_t − B_t) / B_t × 100, l_t = 1 where lower is better. Per task the
metric is the MTLoRA one (`calculate_multi_task_performance`): semseg / human_parts mIoU, saliency
mIoU (`--sal_metric=maxf` for MLoRE-style tables and runs of ``config.eval_protocol='mlore'``),
normals mean angle, depth RMSE, edge odsF (``config.eval_boundary``).

A run is a workdir (its `metrics.jsonl`: `eval/<task>/<metric>` per eval step) or, for runs of the
user's MTLoRA fork, a `log_rank0.txt` (or a directory holding one), parsed as that fork's
`compute_delta_m.py` does (docs/user_fork.md §7). Tasks default to those with a baseline.
Writes OUTPUT.csv and OUTPUT.md (default: `delta_m` in the first run's directory): Δm per eval
step and the best step of each run, and with several runs the mean ± std (ddof 1) of the best.

The fork's `compute_delta_m.py` command line works as written (docs/user_fork.md §7):
`--log-file` (a run), baselines from `--st-json` (keys semseg_miou, human_miou, saliency_miou,
normals_mean or normals_rmse, depth_rmse, edge_odsf) and `--semseg-st` ... `--edge-st` (these win;
`--baselines` is then optional), `--use-paper-st` (the paper's values for the tasks still without
one; with no `--tasks`: semseg, human, saliency, normals, depth, the fork's default), `--tasks` in
the fork's names, and `--csv-out FILE`: its CSV layout (`epoch`, `SemSeg_mIoU`, ...,
`Delta_m_percent` per eval, a blank row, `BEST(epoch N)`), written instead of OUTPUT.csv/.md
unless `--output` is given too. One difference: with a baseline missing for a requested task the
fork stops; here too, but tasks default to those with a baseline.
"""

import argparse
import csv
import io
import json
import os
import re
import statistics
import sys

from mtl_jax.tools import tool_args

# task -> (metric key under eval/<task>/, lower is better)
METRICS = {'semseg': ('miou', False), 'human_parts': ('miou', False), 'sal': ('miou', False),
           'normals': ('mean', True), 'depth': ('rmse', True), 'edge': ('odsF', False)}
# Single-task baselines by name.
PRESETS = {
    # MTLoRA paper, Swin-T IN-1k, single-task full fine-tuning (docs/datasets_metrics.md §5.3).
    'mtlora_swin_t_pascal': {'semseg': 67.21, 'human_parts': 61.93, 'sal': 62.35,
                             'normals': 17.97},
    # The user fork's `--use-paper-st` values (docs/user_fork.md §7), depth included.
    'user_fork_paper_st': {'semseg': 67.21, 'human_parts': 61.93, 'sal': 62.35, 'normals': 17.97,
                           'depth': 0.6436},
}
# The user fork's task names and log lines (docs/user_fork.md §7).
FORK_TASKS = {'semseg': 'semseg', 'human': 'human_parts', 'saliency': 'sal', 'normals': 'normals',
              'depth': 'depth', 'edge': 'edge'}
# Per task: the fork's --st-json key and CSV column (its display name, spaces as underscores).
FORK_ST_KEYS = {'semseg': 'semseg_miou', 'human_parts': 'human_miou', 'sal': 'saliency_miou',
                'normals': 'normals_mean', 'depth': 'depth_rmse', 'edge': 'edge_odsf'}
FORK_COLUMNS = {'semseg': 'SemSeg_mIoU', 'human_parts': 'Human_Parts_mIoU',
                'sal': 'Saliency_mIoU', 'normals': 'Normals_mean', 'depth': 'Depth_rmse',
                'edge': 'Edge_odsF'}
FORK_DEFAULT_TASKS = ('semseg', 'human_parts', 'sal', 'normals', 'depth')
_EPOCH = re.compile(r'EPOCH\s+(\d+)\s+training takes')
_ANYWHERE = {'semseg': re.compile(r'Semantic Segmentation mIoU:\s*([0-9.]+)'),
             'human_parts': re.compile(r'Human Parts mIoU:\s*([0-9.]+)')}
_SECTIONS = [  # (header, task, value regex after the header)
    (re.compile(r'Results for Saliency Estimation'), 'sal', re.compile(r'\bmIoU:\s*([0-9.]+)')),
    (re.compile(r'Results for Surface Normal Estimation'), 'normals',
     re.compile(r'\bmean:\s*([0-9.]+)')),
    (re.compile(r'Results for (Depth Estimation|depth prediction)', re.I), 'depth',
     re.compile(r'\brmse\s*:?\s*([0-9.]+)')),
    (re.compile(r'Edge Detection Evaluation'), 'edge', re.compile(r'\bodsF:\s*([0-9.]+)')),
]


class DeltaMError(ValueError):
  """Bad input: printed as one `error:` line."""


def delta_m(metrics: dict[str, float], baselines: dict[str, float], tasks=None) -> float:
  """Δm in percent over `tasks` (default: every task of `baselines`)."""
  tasks = list(tasks or baselines)
  missing = [t for t in tasks if t not in metrics]
  if missing:
    raise DeltaMError(f'no {", ".join(missing)} metric to compare with the baseline')
  total = 0.0
  for task in tasks:
    sign = -1.0 if METRICS[task][1] else 1.0
    total += sign * (metrics[task] - baselines[task]) / baselines[task]
  return 100.0 * total / len(tasks)


def parse_baselines(text: str) -> dict[str, float]:
  """A preset name or 'task=value,...' (task names of mtl_jax or of the user fork)."""
  if text in PRESETS:
    return dict(PRESETS[text])
  out = {}
  for item in filter(None, text.split(',')):
    task, _, value = item.partition('=')
    task = FORK_TASKS.get(task, task)
    if task not in METRICS or not value:
      raise DeltaMError(f'--baselines: {item!r} is not task=value with a task of '
                        f'{", ".join(METRICS)}, nor a preset ({", ".join(PRESETS)})')
    try:
      out[task] = float(value)
    except ValueError:
      raise DeltaMError(f'--baselines: {value!r} is not a number') from None
  if not out:
    raise DeltaMError('--baselines is empty')
  return out


def fork_baselines(args, tasks: list[str]) -> dict[str, float]:
  """Baselines from --baselines, then --st-json, then --<task>-st, then --use-paper-st (for the
  `tasks` still without one, or the fork's default tasks) (the fork's load_st_baseline)."""
  out = parse_baselines(args.baselines) if args.baselines else {}
  if args.st_json:
    try:
      with open(args.st_json) as f:
        data = json.load(f)
    except (OSError, ValueError) as e:
      raise DeltaMError(f'--st-json {args.st_json}: {e}') from None
    if not isinstance(data, dict):
      raise DeltaMError(f'--st-json {args.st_json}: expected an object of baselines')
    if 'normals_mean' not in data and 'normals_rmse' in data:
      data['normals_mean'] = data['normals_rmse']
    for task, key in FORK_ST_KEYS.items():
      if key in data:
        try:
          out[task] = float(data[key])
        except (TypeError, ValueError):
          raise DeltaMError(f'--st-json: {key}={data[key]!r} is not a number') from None
  for fork_name, task in FORK_TASKS.items():
    value = getattr(args, f'{fork_name}_st')
    if value is not None:
      out[task] = value
  if args.use_paper_st:
    paper = PRESETS['user_fork_paper_st']
    for task in tasks or FORK_DEFAULT_TASKS:
      if task not in out and task in paper:
        out[task] = paper[task]
  if not out:
    raise DeltaMError('no baselines; give --baselines=PRESET|task=value,..., --st-json FILE, '
                      '--<task>-st VALUE or --use-paper-st')
  return out


def render_fork_csv(records: list, baselines: dict[str, float], tasks: list[str]) -> str:
  """The fork's `--csv-out` table of one run's complete records."""
  scored = [(epoch, m, delta_m(m, baselines, tasks)) for epoch, m in records
            if all(t in m for t in tasks)]
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator='\n')
  writer.writerow(['epoch', *(FORK_COLUMNS[t] for t in tasks), 'Delta_m_percent'])
  writer.writerows([epoch, *(m[t] for t in tasks), dm] for epoch, m, dm in scored)
  epoch, m, dm = max(scored, key=lambda r: r[2])
  writer.writerow([])
  writer.writerow([f'BEST(epoch {epoch})', *(m[t] for t in tasks), dm])
  return buf.getvalue()


def read_jsonl(path: str, sal_metric: str = 'miou') -> list[tuple[int, dict[str, float]]]:
  """[(step, {task: metric})] of every eval step in a workdir's metrics.jsonl."""
  keys = {task: f'eval/{task}/{sal_metric if task == "sal" else metric}'
          for task, (metric, _) in METRICS.items()}
  rows = []
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      found = {task: float(record[k]) for task, k in keys.items() if k in record}
      if found:
        rows.append((int(record['step']), found))
  return rows


def read_fork_log(path: str) -> list[tuple[int | None, dict[str, float]]]:
  """[(epoch, {task: metric})] from the user fork's log_rank0.txt (its compute_delta_m.py
  state machine; every record is kept, complete or not)."""
  rows, epoch, current, section = [], None, {}, None

  def flush():
    if current:
      rows.append((epoch, dict(current)))
      current.clear()

  with open(path, errors='replace') as f:
    for line in f:
      m = _EPOCH.search(line)
      if m:
        flush()
        epoch, section = int(m.group(1)), None
        continue
      header = next((s for s in _SECTIONS if s[0].search(line)), None)
      if header:
        section = header
        continue
      for task, pattern in _ANYWHERE.items():
        m = pattern.search(line)
        if m:
          current[task] = float(m.group(1))
      if section:
        m = section[2].search(line)
        if m:
          current[section[1]] = float(m.group(1))
          section = None
  flush()
  return rows


def read_run(path: str, sal_metric: str) -> list[tuple[int | None, dict[str, float]]]:
  """Eval records of a workdir (metrics.jsonl) or a user-fork log (file or its directory)."""
  if os.path.isdir(path):
    for name, reader in (('metrics.jsonl', lambda p: read_jsonl(p, sal_metric)),
                         ('log_rank0.txt', read_fork_log)):
      if os.path.exists(os.path.join(path, name)):
        return reader(os.path.join(path, name))
    raise DeltaMError(f'{path} has neither metrics.jsonl nor log_rank0.txt; pass a workdir of '
                      'launch.py or a user-fork log')
  if not os.path.exists(path):
    raise DeltaMError(f'{path} does not exist')
  return read_jsonl(path, sal_metric) if path.endswith('.jsonl') else read_fork_log(path)


def table(runs: dict[str, list], baselines: dict[str, float], tasks: list[str]):
  """(rows, summary): rows = [run, step, *metrics, Δm] for every complete record and a
  'best' row per run; summary = (mean, std) of the runs' best Δm (std None for one run)."""
  rows, best = [], []
  for name, records in runs.items():
    complete = [(step, m) for step, m in records if all(t in m for t in tasks)]
    if not complete:
      hint = (' (runs with config.eval_protocol=mlore report saliency maxF: --sal_metric=maxf)'
              if 'sal' in tasks else '')
      raise DeltaMError(f'{name}: no eval record has all of {", ".join(tasks)}; choose --tasks '
                        f'among the metrics the run reports{hint}')
    scored = [(step, m, delta_m(m, baselines, tasks)) for step, m in complete]
    rows += [[name, step, *(m[t] for t in tasks), dm] for step, m, dm in scored]
    step, m, dm = max(scored, key=lambda r: r[2])
    rows.append([name, f'best ({step})', *(m[t] for t in tasks), dm])
    best.append(dm)
  std = statistics.stdev(best) if len(best) > 1 else None
  return rows, (statistics.fmean(best), std)


def render(rows, summary, baselines, tasks) -> tuple[str, str]:
  """(CSV text, Markdown text)."""
  header = ['run', 'step', *(f'{t}/{METRICS[t][0]}' for t in tasks), 'delta_m_percent']
  mean, std = summary
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator='\n')
  writer.writerow(header)
  writer.writerow(['baseline', '', *(baselines[t] for t in tasks), 0.0])
  writer.writerows(rows)
  writer.writerow(['mean_of_best', '', *([''] * len(tasks)), mean])
  if std is not None:
    writer.writerow(['std_of_best', '', *([''] * len(tasks)), std])
  fmt = lambda v: f'{v:.4g}' if isinstance(v, float) else str(v)
  md = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header),
        '| baseline | | ' + ' | '.join(fmt(baselines[t]) for t in tasks) + ' | 0 |']
  md += ['| ' + ' | '.join(fmt(v) if i < len(r) - 1 else f'{v:+.2f}' for i, v in enumerate(r))
         + ' |' for r in rows]
  runs = len({r[0] for r in rows})
  spread = '' if std is None else f' ± {std:.2f} (mean ± std over {runs} runs)'
  md.append(f'\nΔm of the best step: {mean:+.2f}{spread}')
  return buf.getvalue(), '\n'.join(md) + '\n'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('runs', nargs='*', help='workdirs (metrics.jsonl) or user-fork logs')
  parser.add_argument('--log-file', action='append', default=[], metavar='LOG',
                      help="a run, as compute_delta_m.py's flag")
  parser.add_argument('--baselines', default='',
                      help=f'a preset ({", ".join(PRESETS)}) or task=value,...')
  parser.add_argument('--st-json', metavar='FILE', help="the fork's baseline JSON")
  for fork_name, task in FORK_TASKS.items():
    parser.add_argument(f'--{fork_name}-st', type=float, metavar='V', help=f'{task} baseline')
  parser.add_argument('--use-paper-st', action='store_true',
                      help="the paper's baselines for tasks without one (docs/user_fork.md §7)")
  parser.add_argument('--tasks', default='', help='comma list (default: tasks with a baseline)')
  parser.add_argument('--sal_metric', default='miou', choices=['miou', 'maxf'])
  parser.add_argument('--output', default='', help='OUTPUT[.csv|.md] prefix')
  parser.add_argument('--csv-out', metavar='FILE', help="the fork's CSV layout (one run)")
  args = parser.parse_args(argv)
  paths = args.runs + args.log_file
  try:
    if not paths:
      raise DeltaMError('no run; give workdirs / logs as arguments or --log-file LOG')
    if args.csv_out and len(paths) > 1:
      raise DeltaMError('--csv-out writes the table of one run; give one run or use --output')
    tasks = [FORK_TASKS.get(t.strip(), t.strip()) for t in args.tasks.split(',') if t.strip()]
    bad = [t for t in tasks if t not in METRICS]
    if bad:
      raise DeltaMError(f'--tasks: unknown {", ".join(bad)}; choose among '
                        f'{", ".join(FORK_TASKS)} (or {", ".join(METRICS)})')
    baselines = fork_baselines(args, tasks)
    tasks = list(dict.fromkeys(tasks)) or list(baselines)
    unknown = [t for t in tasks if t not in baselines]
    if unknown:
      raise DeltaMError(f'no baseline for {", ".join(unknown)}; add it to --baselines (or '
                        '--<task>-st, --st-json, --use-paper-st)')
    runs = {path: read_run(path, args.sal_metric) for path in paths}
    rows, summary = table(runs, baselines, tasks)
  except (DeltaMError, OSError, json.JSONDecodeError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  csv_text, md_text = render(rows, summary, baselines, tasks)
  first = paths[0]
  output = args.output or os.path.join(first if os.path.isdir(first) else os.path.dirname(first),
                                       'delta_m')
  print(md_text, end='')  # first: a bad --output does not lose the table
  files = {args.csv_out: render_fork_csv(runs[first], baselines, tasks)} if args.csv_out else {}
  if args.output or not args.csv_out:
    files.update({output + '.csv': csv_text, output + '.md': md_text})
  try:
    for path, text in files.items():
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      tool_args.write_atomic(path, text)
  except OSError as e:
    print(f'error: cannot write {e.filename or path} ({e.strerror}); choose another '
          '--output / --csv-out', file=sys.stderr)
    return 1
  print(f'wrote {" and ".join(files)}')
  return 0


def cli():
  """Entry point of the console script (pyproject.toml) and of `python -m`."""
  sys.exit(main())


if __name__ == '__main__':
  cli()
