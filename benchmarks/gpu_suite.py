r"""One-call accelerator benchmark: MLoRE ViT-L 512² and MTLoRA r64 Swin-T 448² train steps in bf16
at the recipe's batch and at the largest batch that fits; img/s, MFU and peak memory per line.

  python benchmarks/gpu_suite.py                                  # on a GPU/TPU: ~8 minutes
  python benchmarks/gpu_suite.py --mtlora_checkout=DIR            # + the official MTLoRA step
  python benchmarks/gpu_suite.py --cpu_smoke                      # tiny configs, seconds (tests)

It needs only jax, flax, optax, numpy and ml_collections (no grain, TFDS or clu): the batch is
synthetic and in memory, and the step is the trainer's function written out (configured
model, trainable set, optimizer and losses; one device). Where ml_collections is not installed
and there is no package index, put its wheel in benchmarks/wheels/ (`pip download
ml_collections==1.1.0 --no-deps -d benchmarks/wheels`); a pure-Python wheel is importable from
sys.path as it is. Each model runs in its own subprocess so its peak memory is its own; batches
double from the recipe's until one runs out of memory or --budget_s is spent. MFU uses
mtl_jax/perf.py (XLA's FLOP count of the compiled step; the device's bf16 peak).

The reference side: benchmarks/reference_mtlora_step.py with --device=cuda --amp (the release's
fp16 AMP) when --mtlora_checkout is given. There is no reference script for MLoRE on GPU yet.
Record results in benchmarks/RESULTS.md with the GPU model, date and command.
"""

import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT] + sorted(glob.glob(os.path.join(ROOT, 'benchmarks', 'wheels', '*.whl')))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

_CPU_SMOKE = flags.DEFINE_bool('cpu_smoke', False, 'Smoke configs, one batch size, fp32 (CPU).')
_BUDGET = flags.DEFINE_float('budget_s', 200.0, 'Seconds per model before larger batches stop.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per batch size (after the compile).')
_MAX_BATCH = flags.DEFINE_integer('max_batch', 256, 'Largest batch tried.')
_MTLORA = flags.DEFINE_string('mtlora_checkout', '', 'scale-lab/MTLoRA checkout (reference).')
_ONE = flags.DEFINE_string('one', '', 'Internal: run one model in this process.')

MODELS = {  # name -> (config module, arg): the recipes' models
    'mlore_vitl_512': ('mlore_pascal', 'vit=L'),
    'mtlora_r64_swint_448': ('mtlora_pascal', 'rank=64'),
}


def synthetic_batch(tasks, batch: int, size: tuple[int, int], seed: int = 0) -> dict:
  """Random image and labels in the input pipeline's format (tasks.py: label channels/dtypes)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  out = {'image': rng.standard_normal((batch, *size, 3), np.float32)}
  for name, t in tasks.items():
    shape = (batch, *size, t.label_channels)
    if t.kind == 'segmentation':
      out[name] = rng.integers(0, t.num_classes, shape, dtype=np.uint8)
    elif t.kind in ('saliency', 'edge'):
      out[name] = rng.integers(0, 2, shape, dtype=np.uint8)
    elif t.kind == 'normals':
      v = rng.standard_normal(shape).astype(np.float32)
      out[name] = v / np.linalg.norm(v, axis=-1, keepdims=True)
    else:  # depth
      out[name] = rng.uniform(0.5, 10.0, shape).astype(np.float32)
  return out


def make_step(config):
  """(jitted step(state, batch) -> (state, loss), initial state, tasks) of `config` on one
  device: the trainer's 'mtl' method (methods/mtl.py) without its input pipeline."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mtl_jax import losses, models, optim, tasks as tasks_lib  # pylint: disable=g-import-not-at-top

  tasks = tasks_lib.config_tasks(config)
  tx, _ = optim.make_optimizer(config)
  model = models.build_model(config, tasks, rngs=nnx.Rngs(config.seed))
  model.train()
  trainable = nnx.All(nnx.Param, nnx.Not(optim.frozen_filter(tuple(config.frozen))))
  graph, *parts = nnx.split(model, trainable, nnx.Param, nnx.BatchStat, ...)
  params, frozen, stats, rest = map(nnx.to_pure_dict, parts)
  streams = sorted({s.tag for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)})
  state = (params, tx.init(params), stats)

  def step(state, frozen, rest, batch):
    params, opt_state, stats = state

    def loss_fn(params):
      m = nnx.merge(graph, params, frozen, stats, rest)
      key = jax.random.key(0)  # re-seeded as methods/base.py does (from the step's key)
      nnx.reseed(m, **{s: jax.random.fold_in(key, i) for i, s in enumerate(streams)})
      preds, aux = m(batch['image'])
      total, _ = losses.compute_losses(
          tasks, preds, batch, convention=config.convention, weights=dict(config.loss_weights),
          edge_w=config.edge_w, aux=aux, load_balancing_weight=config.load_balancing_weight)
      return total, nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, stats), loss

  return jax.jit(step, donate_argnums=(0,)), state, frozen, rest, tasks


def run_one(name: str) -> None:
  """Times MODELS[name] at doubling batches; one JSON line per batch size on stdout."""
  import importlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mtl_jax import perf  # pylint: disable=g-import-not-at-top

  module, arg = MODELS[name]
  config = importlib.import_module(f'configs.{module}').get_config(
      'smoke' if _CPU_SMOKE.value else arg)
  config.model.dtype = 'float32' if _CPU_SMOKE.value else 'bfloat16'
  size = tuple(config.input.crop_size)
  step, state, frozen, rest, tasks = make_step(config)
  device = jax.devices()[0]
  batch_size, start = config.batch_size, time.perf_counter()  # from the recipe's batch
  while batch_size <= _MAX_BATCH.value:
    batch = jax.device_put(synthetic_batch(tasks, batch_size, size))
    try:
      t = time.perf_counter()
      compiled = step.lower(state, frozen, rest, batch).compile()
      compile_s = time.perf_counter() - t
      state, loss = compiled(state, frozen, rest, batch)  # warm-up
      jax.block_until_ready(loss)
      times = []
      for _ in range(_STEPS.value):
        t = time.perf_counter()
        state, loss = compiled(state, frozen, rest, batch)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t)
    except Exception as e:  # pylint: disable=broad-except
      if 'RESOURCE_EXHAUSTED' not in str(e) and 'out of memory' not in str(e).lower():
        raise
      print(json.dumps({'model': name, 'batch': batch_size, 'oom': True}), flush=True)
      break
    med = float(np.median(times))
    cost = perf.StepCost.of(compiled)
    row = {'model': name, 'device': device.device_kind, 'dtype': config.model.dtype,
           'batch': batch_size, 'compile_s': round(compile_s, 1), 'ms_per_step': med * 1e3,
           'loss_finite': bool(np.isfinite(float(loss))), **cost.scalars(1 / med, batch_size)}
    print(json.dumps(row), flush=True)
    if _CPU_SMOKE.value or time.perf_counter() - start > _BUDGET.value:
      break
    batch_size *= 2


def main(argv):
  del argv
  if _ONE.value:
    run_one(_ONE.value)
    return
  rows = []
  for name in MODELS:
    cmd = [sys.executable, os.path.abspath(__file__), f'--one={name}',
           f'--steps={_STEPS.value}', f'--budget_s={_BUDGET.value}',
           f'--max_batch={_MAX_BATCH.value}', f'--cpu_smoke={_CPU_SMOKE.value}']
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [json.loads(l) for l in out.stdout.splitlines() if l.startswith('{')]
    if out.returncode or not lines:
      sys.exit(f'error: {name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}')
    rows += lines
  for r in rows:
    if r.get('oom'):
      print(f'{r["model"]:22s} batch {r["batch"]:4d}: out of memory')
      continue
    mfu = f'{100 * r["perf/mfu"]:.1f} %' if 'perf/mfu' in r else 'n/a'
    print(f'{r["model"]:22s} {r["device"]} {r["dtype"]} batch {r["batch"]:4d} | '
          f'{r["ms_per_step"]:8.1f} ms/step | {r["perf/img_per_sec"]:8.1f} img/s | MFU {mfu} | '
          f'peak {r["perf/peak_memory_bytes"] / 2 ** 30:.2f} GiB | compile {r["compile_s"]} s')
  if _MTLORA.value:
    subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'reference_mtlora_step.py'),
                    f'--mtlora={_MTLORA.value}', '--device=cuda', '--amp', '--batch_size=32',
                    f'--steps={_STEPS.value}'], check=False)  # the recipe's batch
  print(json.dumps({'rows': rows}))


if __name__ == '__main__':
  app.run(main)
