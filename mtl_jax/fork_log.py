"""The user fork's `log_rank0.txt` for mtl_jax runs (docs/user_fork.md §7 "Log format").

With ``config.fork_log`` set (the fork's MODEL.NAME; configs/fork_yaml.py sets it), the trainer
appends to WORKDIR/log_rank0.txt, process 0 only, the lines of the fork's `main.py` that its
tools read: `Train: [e/E][i/N] ...` every log step, `EPOCH e training takes h:mm:ss` after each
epoch of ``config.steps_per_epoch`` steps (0-based, as the fork counts), and the evaluation block
(`Start eval`, the per-task result lines in ``config.tasks`` order with the fork's headers and
precision, `eval takes h:mm:ss`). The fork's `compute_delta_m.py` (and `mtl_jax.tools.delta_m`)
read it unchanged. Line format: `[YYYY-mm-dd HH:MM:SS <name>] (<file> <line>): INFO <message>`.
A resumed run appends, as the fork does.
"""

import datetime
import os
import time

from etils import epath

FILE = 'log_rank0.txt'


def _hms(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(seconds)))


def eval_lines(tasks, metrics: dict[str, float], seconds: float) -> list[str]:
  """The fork's evaluation block for `metrics` ({'task/metric': value}, mtl_jax's eval keys)."""
  get = lambda key: metrics.get(key)
  lines = ['Start eval']
  for task in tasks:
    if task in ('semseg', 'human_parts') and get(f'{task}/miou') is not None:
      title = 'Semantic Segmentation' if task == 'semseg' else 'Human Parts'
      lines.append(f'{title} mIoU: {get(f"{task}/miou"):.4f}')
    elif task == 'sal':
      lines.append('Results for Saliency Estimation')
      lines += [f'{name}: {get(f"sal/{key}"):.3f}' for name, key in (
          ('Beta maxF', 'beta_maxf'), ('maxF', 'maxf'), ('mIoU', 'miou'))
          if get(f'sal/{key}') is not None]
    elif task == 'normals':
      lines.append('Results for Surface Normal Estimation')
      lines += [f'{key}: {get(f"normals/{key}"):.4f}' for key in ('mean', 'rmse', 'mean_v2',
                                                                   'rmse_v2')
                if get(f'normals/{key}') is not None]
    elif task == 'depth':
      lines.append('Results for depth prediction')
      lines += [f'{key:<15}{get(f"depth/{key}"):.4f}' for key in ('rmse', 'log_rmse')
                if get(f'depth/{key}') is not None]
    elif task == 'edge':
      lines.append('Edge Detection Evaluation')
      if get('edge/loss') is not None:
        lines.append(f'Edge Detection Loss {get("edge/loss"):.3f}')
      if get('edge/odsF') is not None:
        lines.append(f'odsF: {get("edge/odsF"):.4f}')
  lines.append(f'eval takes {_hms(seconds)}')
  return lines


class ForkLog:
  """Appends the fork's log lines to WORKDIR/log_rank0.txt (a no-op when `name` is empty or on
  processes other than 0)."""

  def __init__(self, workdir, name: str, *, tasks, steps_per_epoch: int, total_steps: int,
               enabled: bool = True):
    self.path = epath.Path(workdir) / FILE
    self.name, self.tasks = name, tuple(tasks)
    self.enabled = bool(name) and enabled
    self.steps_per_epoch = int(steps_per_epoch)
    self.total_steps = int(total_steps)
    self.epoch_start = time.perf_counter()

  def _write(self, *messages: str) -> None:
    if not self.enabled:
      return
    stamp = time.strftime('%Y-%m-%d %H:%M:%S')
    with open(os.fspath(self.path), 'a') as f:
      for message in messages:
        f.write(f'[{stamp} {self.name}] (train.py 0): INFO {message}\n')

  def _epoch(self, step: int) -> tuple[int, int, int]:
    """(0-based epoch, 0-based iteration in it, epochs) of the step just finished."""
    if not self.steps_per_epoch:
      return 0, step - 1, 1
    epoch, index = divmod(step - 1, self.steps_per_epoch)
    return epoch, index, -(-self.total_steps // self.steps_per_epoch)

  def train(self, step: int, means: dict[str, float], seconds_per_step: float,
            weight_decay: float) -> None:
    """The fork's `Train: [e/E][i/N]` line from the window means of the trainer's scalars."""
    epoch, index, epochs = self._epoch(step)
    per_epoch = self.steps_per_epoch or self.total_steps
    eta = _hms(seconds_per_step * (per_epoch - 1 - index))
    value = lambda k: means.get(k, float('nan'))
    self._write(
        f'Train: [{epoch}/{epochs}][{index}/{per_epoch}]\teta {eta} lr '
        f'{value("learning_rate"):.6f}\t wd {weight_decay:.4f}\ttime {seconds_per_step:.4f} '
        f'({seconds_per_step:.4f})\tloss {value("loss"):.4f} ({value("loss"):.4f})\tgrad_norm '
        f'{value("grad_norm"):.4f} ({value("grad_norm"):.4f})\tloss_scale 1.0000 (1.0000)\t'
        'mem 0MB')

  def step_done(self, step: int) -> None:
    """`EPOCH e training takes h:mm:ss` when `step` ends an epoch."""
    if self.steps_per_epoch and step % self.steps_per_epoch == 0:
      self._write(f'EPOCH {step // self.steps_per_epoch - 1} training takes '
                  f'{_hms(time.perf_counter() - self.epoch_start)}')
      self.epoch_start = time.perf_counter()

  def eval(self, metrics: dict[str, float], seconds: float) -> None:
    self._write(*eval_lines(self.tasks, metrics, seconds))
