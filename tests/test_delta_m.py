"""Δm (mtl_jax/tools/delta_m.py, docs/datasets_metrics.md §5.1) on published rows, workdirs and
user-fork logs."""

import json
import statistics

import pytest

from mtl_jax.tools import delta_m

# docs/datasets_metrics.md §5.3 (MTLoRA paper, PASCAL-Context, Swin-T): semseg, parts, sal mIoU,
# normals mean; published Δm.
MTLORA_R64 = {'semseg': 67.90, 'human_parts': 59.84, 'sal': 65.40, 'normals': 16.60}


def test_mtlora_paper_row_reproduces_published_delta_m():
  dm = delta_m.delta_m(MTLORA_R64, delta_m.PRESETS['mtlora_swin_t_pascal'])
  # Published +2.55; the metrics are rounded to 0.01, which moves Δm by up to ~0.01.
  assert dm == pytest.approx(2.55, abs=0.02)
  # By hand: (0.69/67.21 - 2.09/61.93 + 3.05/62.35 + 1.37/17.97) / 4.
  hand = 100 * (0.69 / 67.21 - 2.09 / 61.93 + 3.05 / 62.35 + 1.37 / 17.97) / 4
  assert dm == pytest.approx(hand, rel=1e-12)


def test_signs_follow_metric_direction():
  base = {'semseg': 50.0, 'normals': 20.0, 'depth': 0.5, 'edge': 70.0}
  better = {'semseg': 55.0, 'normals': 18.0, 'depth': 0.45, 'edge': 77.0}
  assert delta_m.delta_m(better, base) == pytest.approx(10.0)  # every task 10 % better
  assert delta_m.delta_m(base, base) == 0.0
  assert delta_m.delta_m(better, base, tasks=['normals']) == pytest.approx(10.0)


def _workdir(path, steps):
  path.mkdir()
  with open(path / 'metrics.jsonl', 'w') as f:
    f.write(json.dumps({'step': 0, 'train/loss': 3.0}) + '\n')  # no eval metrics: skipped
    for step, (s, p, sal, n) in steps.items():
      f.write(json.dumps({'step': step, 'eval/semseg/miou': s, 'eval/human_parts/miou': p,
                          'eval/sal/miou': sal, 'eval/sal/maxf': 80.0,
                          'eval/normals/mean': n}) + '\n')
  return str(path)


def test_several_workdirs_give_csv_markdown_and_mean_std(tmp_path, capsys):
  runs = [_workdir(tmp_path / f'seed{i}', {100: (60.0, 55.0, 60.0, 19.0),
                                            200: (67.90 + d, 59.84, 65.40, 16.60)})
          for i, d in enumerate((0.0, 0.2, -0.2))]
  out = str(tmp_path / 'dm')
  assert delta_m.main([*runs, '--baselines=mtlora_swin_t_pascal', f'--output={out}']) == 0
  best = [delta_m.delta_m({**MTLORA_R64, 'semseg': 67.90 + d}, delta_m.PRESETS[
      'mtlora_swin_t_pascal']) for d in (0.0, 0.2, -0.2)]
  csv_lines = open(out + '.csv').read().splitlines()
  assert csv_lines[0] == ('run,step,semseg/miou,human_parts/miou,sal/miou,normals/mean,'
                          'delta_m_percent')
  assert len(csv_lines) == 2 + 3 * 3 + 2  # header, baseline, 3 runs x (2 steps + best), mean, std
  assert csv_lines[-2].endswith(repr(statistics.fmean(best)))
  assert csv_lines[-1].endswith(repr(statistics.stdev(best)))
  md = open(out + '.md').read()
  assert f'{statistics.fmean(best):+.2f} ± {statistics.stdev(best):.2f}' in md
  assert md.count('| best (200) |') == 3
  assert 'wrote' in capsys.readouterr().out


FORK_LOG = """\
[2026-01-01 00:00:00] EPOCH 5 training takes 0:10:00
Semantic Segmentation mIoU: 60.00
Human Parts mIoU: 50.00
Results for Saliency Estimation
maxF: 80.00
mIoU: 60.00
Results for Surface Normal Estimation
mean: 19.00
mean_v2: 18.00
[2026-01-01 01:00:00] EPOCH 10 training takes 0:10:00
Semantic Segmentation mIoU: 67.90
Human Parts mIoU: 59.84
Results for Saliency Estimation
mIoU: 65.40
Results for Surface Normal Estimation
mean: 16.60
Results for depth prediction
log_rmse   : 0.2000
rmse       : 0.6000
"""


def test_user_fork_log_is_parsed_like_its_compute_delta_m(tmp_path):
  log = tmp_path / 'log_rank0.txt'
  log.write_text(FORK_LOG)
  records = delta_m.read_fork_log(str(log))
  assert records == [(5, {'semseg': 60.0, 'human_parts': 50.0, 'sal': 60.0, 'normals': 19.0}),
                     (10, {'semseg': 67.90, 'human_parts': 59.84, 'sal': 65.40, 'normals': 16.60,
                           'depth': 0.6})]
  out = str(tmp_path / 'dm')
  assert delta_m.main([str(tmp_path), '--baselines=user_fork_paper_st',
                       '--tasks=semseg,human,saliency,normals', f'--output={out}']) == 0
  assert 'best (10)' in open(out + '.md').read()
  assert delta_m.main([str(log), '--baselines=user_fork_paper_st', f'--output={out}']) == 0
  rows = open(out + '.csv').read().splitlines()
  assert rows[2].startswith(f'{log},10,')  # only epoch 10 has depth


@pytest.mark.parametrize('args, message', [
    (['--baselines=semseg=abc'], "'abc' is not a number"),
    (['--baselines=nope'], 'nor a preset'),
    (['--baselines=semseg=60,edge=70'], 'no eval record has all of semseg, edge'),
    (['--baselines=semseg=60', '--tasks=depth'], 'no baseline for depth'),
])
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, args, message):
  run = _workdir(tmp_path / 'run', {100: (60.0, 55.0, 60.0, 19.0)})
  out = tmp_path / 'dm'
  assert delta_m.main([run, *args, f'--output={out}']) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and message in err[0], err
  assert not list(tmp_path.glob('dm*'))
  assert delta_m.main([str(tmp_path / 'missing'), '--baselines=semseg=1']) == 1


def test_output_in_a_new_directory_is_created_and_an_unwritable_one_keeps_the_table(
    tmp_path, capsys):
  run = _workdir(tmp_path / 'run', {100: (60.0, 55.0, 60.0, 19.0)})
  out = tmp_path / 'new' / 'dir' / 'dm'
  assert delta_m.main([run, '--baselines=mtlora_swin_t_pascal', f'--output={out}']) == 0
  assert (tmp_path / 'new' / 'dir' / 'dm.csv').is_file()
  capsys.readouterr()
  (tmp_path / 'file').write_text('not a directory')
  assert delta_m.main([run, '--baselines=mtlora_swin_t_pascal',
                       f'--output={tmp_path / "file" / "dm"}']) == 1
  captured = capsys.readouterr()
  assert '| best (100) |' in captured.out  # the table is printed before the write fails
  err = captured.err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: cannot write') and '--output' in err[0]


def test_fork_log_writer_round_trips_through_the_forks_parser(tmp_path):
  """mtl_jax/fork_log.py's lines, read by the §7 parser, give the metrics at the fork's printed
  precision, labelled with 0-based epochs (none before the first epoch)."""
  from mtl_jax import fork_log  # pylint: disable=g-import-not-at-top
  tasks = ('semseg', 'human_parts', 'sal', 'normals', 'depth', 'edge')
  metrics = {'semseg/miou': 61.23456, 'human_parts/miou': 50.98765, 'sal/maxf': 80.1234,
             'sal/beta_maxf': 79.5, 'sal/miou': 64.56789, 'normals/mean': 18.123456,
             'normals/rmse': 25.5, 'normals/mean_v2': 17.9, 'depth/rmse': 0.612345,
             'depth/log_rmse': 0.25, 'edge/loss': 0.123, 'edge/odsF': 70.12345}
  log = fork_log.ForkLog(tmp_path, 'promlora_tiny', tasks=tasks, steps_per_epoch=2,
                         total_steps=4)
  log.eval(metrics, 1.0)  # the initial validation
  for step in (1, 2, 3, 4):
    log.train(step, {'loss': 1.5, 'grad_norm': 2.0, 'learning_rate': 1e-4}, 0.5, 0.05)
    log.step_done(step)
    if step % 2 == 0:
      log.eval({k: v + step for k, v in metrics.items()}, 1.0)
  text = (tmp_path / fork_log.FILE).read_text()
  assert text.count('training takes') == 2 and 'Train: [1/2][1/2]' in text
  assert all(l.startswith('[') and '] (train.py 0): INFO ' in l for l in text.splitlines())
  want = lambda d: {'semseg': round(61.23456 + d, 4), 'human_parts': round(50.98765 + d, 4),
                    'sal': round(64.56789 + d, 3), 'normals': round(18.123456 + d, 4),
                    'depth': round(0.612345 + d, 4), 'edge': round(70.12345 + d, 4)}
  assert delta_m.read_fork_log(str(tmp_path / fork_log.FILE)) == [
      (None, want(0)), (0, want(2)), (1, want(4))]


def test_compute_delta_m_command_line_and_its_csv_layout(tmp_path, capsys):
  log = tmp_path / 'log_rank0.txt'
  log.write_text(FORK_LOG)
  csv_out = tmp_path / 'out' / 'dm.csv'
  assert delta_m.main(['--log-file', str(log), '--use-paper-st', '--tasks',
                       'semseg,human,saliency,normals', '--csv-out', str(csv_out)]) == 0
  paper = delta_m.PRESETS['user_fork_paper_st']
  tasks = ['semseg', 'human_parts', 'sal', 'normals']
  dms = [delta_m.delta_m(m, paper, tasks) for _, m in delta_m.read_fork_log(str(log))]
  assert csv_out.read_text().splitlines() == [
      'epoch,SemSeg_mIoU,Human_Parts_mIoU,Saliency_mIoU,Normals_mean,Delta_m_percent',
      f'5,60.0,50.0,60.0,19.0,{dms[0]!r}', f'10,67.9,59.84,65.4,16.6,{dms[1]!r}', '',
      f'BEST(epoch 10),67.9,59.84,65.4,16.6,{dms[1]!r}']
  assert not (tmp_path / 'delta_m.csv').exists()  # --csv-out alone writes only its file
  # --st-json (normals_rmse is the fork's alias of normals_mean); the per-task flags win.
  st = tmp_path / 'st.json'
  st.write_text(json.dumps({'semseg_miou': 60.0, 'normals_rmse': 20.0, 'depth_rmse': 0.5}))
  assert delta_m.main([str(log), '--st-json', str(st), '--semseg-st', '70', '--tasks',
                       'semseg,normals', '--csv-out', str(csv_out)]) == 0
  best = csv_out.read_text().splitlines()[-1].split(',')
  assert best[0] == 'BEST(epoch 10)' and float(best[-1]) == pytest.approx(
      100 * ((67.90 - 70) / 70 - (16.60 - 20) / 20) / 2)
  # With --use-paper-st and no --tasks: the fork's default five (only epoch 10 has depth).
  capsys.readouterr()
  assert delta_m.main(['--log-file', str(log), '--use-paper-st', '--csv-out',
                       str(csv_out)]) == 0
  assert csv_out.read_text().splitlines()[0].endswith('Normals_mean,Depth_rmse,Delta_m_percent')


@pytest.mark.parametrize('args, message', [
    ([], 'no baselines'),
    (['--tasks=semseg,nope', '--use-paper-st'], 'unknown nope'),
    (['--semseg-st=60', '--log-file=other', '--csv-out=x.csv'], 'one run'),
    (['--st-json=missing.json'], 'missing.json'),
])
def test_fork_flags_bad_input_is_one_error_line(tmp_path, capsys, monkeypatch, args, message):
  monkeypatch.chdir(tmp_path)
  run = _workdir(tmp_path / 'run', {100: (60.0, 55.0, 60.0, 19.0)})
  assert delta_m.main([run, *args]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and message in err[0], err
  assert sorted(p.name for p in tmp_path.iterdir()) == ['run']
  assert sorted(p.name for p in (tmp_path / 'run').iterdir()) == ['metrics.jsonl']
