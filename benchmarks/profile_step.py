r"""Where a train step spends its time: per-op totals from a jax.profiler trace.

  python benchmarks/profile_step.py --config=configs/promlora_pascal.py --batch_size=2
  python benchmarks/profile_step.py --config=configs/mtlora_pascal.py:smoke --top=20

Builds the trainer for `--config` (fp32, synthetic_scenes/tiny, one device), compiles and runs
the train step once, then traces `--steps` more steps with `jax.profiler.trace` and reads the
trace (the XPlane protobuf) back: every XLA op (fusion, dot, convolution, copy, ...) of the
compiled step with its total time, share of the step and what it computes, i.e. the jax
operation and source line XLA recorded for the op's root (`op_name` / `source_line` of the
optimized HLO). A second table sums the ops by that jax operation. This is the breakdown
benchmarks/RESULTS.md cites before each optimisation.
"""

import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax

from benchmarks import train_step  # defines --config, --steps and --host_huge_pages
from mtl_jax import input_pipeline
from mtl_jax import sharding
from mtl_jax import train

_BATCH = flags.DEFINE_integer('batch_size', 2, 'Global batch size.')
_TOP = flags.DEFINE_integer('top', 25, 'Rows of the per-op table.')
_HLO = flags.DEFINE_string('hlo', '', 'Also write the optimized HLO text of the step here.')
_DATA_DIR = flags.DEFINE_string('data_dir', os.path.join(tempfile.gettempdir(), 'mtl_jax_bench'),
                                'TFDS data dir for synthetic_scenes/tiny.')


def hlo_sources(hlo_text: str) -> dict[str, str]:
  """{HLO instruction name: 'jax op @ file:line'} of an optimized HLO module's text; a fusion
  gets its root's metadata."""
  out, fused = {}, {}
  computation = None
  for line in hlo_text.splitlines():
    head = re.match(r'\s*(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if head and '=' not in line.split('{')[0]:
      computation = head.group(1)
      continue
    m = re.match(r'\s*(ROOT )?%?([\w.\-]+) = .*?metadata=\{(.*?)\}', line)
    if not m:
      continue
    meta = m.group(3)
    op = re.search(r'op_name="([^"]*)"', meta)
    src = re.search(r'source_file="([^"]*)" source_line=(\d+)', meta)
    what = (op.group(1).split('/')[-1] if op else '?') + (
        f' @ {os.path.basename(src.group(1))}:{src.group(2)}' if src else '')
    out[m.group(2)] = what
    if m.group(1):
      fused[computation] = what
  for line in hlo_text.splitlines():  # fusion instructions: the root of their computation
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*fusion\(.*calls=%?([\w.\-]+)', line)
    if m and m.group(3) in fused:
      out[m.group(1)] = f'{fused[m.group(3)]} -> {m.group(2).split("{")[0]}'
  return out


def op_times(trace_dir: str) -> dict[str, float]:
  """{op name: total seconds} of the XLA ops in the newest trace under `trace_dir`."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  path = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True))[-1]
  space = xplane_pb2.XSpace()
  with open(path, 'rb') as f:
    space.ParseFromString(f.read())
  totals = collections.defaultdict(float)
  for plane in space.planes:
    names = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
      for event in line.events:
        totals[names.get(event.metadata_id, '?')] += event.duration_ps * 1e-12
  return totals


def main(argv):
  del argv
  config = flags.FLAGS.config
  train_step.set_host_memory(config)  # the recipe's host_huge_pages, as the step benchmarks
  config.batch_size = _BATCH.value
  config.model.dtype = 'float32'
  config.dataset.update(name='synthetic_scenes/tiny', data_dir=_DATA_DIR.value,
                        build_if_missing=True)
  trainer = train.Trainer(config, tempfile.mkdtemp(), jax.devices()[:1])
  batch = sharding.global_batch(next(input_pipeline.make_train_iterator(
      config, trainer.tasks, source=trainer.train_source)), trainer.mesh)
  state = trainer.init_state()
  start = time.time()
  step_fn = trainer.train_step.lower(state, trainer.rest, batch).compile()
  compile_s = time.time() - start
  sources = hlo_sources(step_fn.as_text())
  if _HLO.value:
    with open(_HLO.value, 'w') as f:
      f.write(step_fn.as_text())
  state, scalars = step_fn(state, trainer.rest, batch)  # warm-up
  jax.block_until_ready(scalars)
  steps = flags.FLAGS.steps
  trace_dir = tempfile.mkdtemp()
  start = time.time()
  with jax.profiler.trace(trace_dir):
    for _ in range(steps):
      state, scalars = step_fn(state, trainer.rest, batch)
    jax.block_until_ready(scalars)
  med = (time.time() - start) / steps
  totals = {k: v / steps for k, v in op_times(trace_dir).items() if k in sources}
  step = sum(totals.values())
  print(f'step {med * 1e3:,.0f} ms traced (compile {compile_s:.0f} s); XLA ops in the trace: '
        f'{step * 1e3:,.0f} ms per step, {len(totals)} ops')
  print(f'{"ms":>8} {"%":>5}  op  (jax operation @ source)')
  for name, t in sorted(totals.items(), key=lambda kv: -kv[1])[:_TOP.value]:
    print(f'{t * 1e3:8.1f} {100 * t / step:5.1f}  {name}  ({sources[name]})')
  by_op = collections.defaultdict(float)
  for name, t in totals.items():
    by_op[sources[name].split(' @ ')[0]] += t
  print(f'\n{"ms":>8} {"%":>5}  jax operation (summed)')
  for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])[:_TOP.value]:
    print(f'{t * 1e3:8.1f} {100 * t / step:5.1f}  {op}')


if __name__ == '__main__':
  flags.FLAGS.set_default('steps', 2)
  app.run(main)
