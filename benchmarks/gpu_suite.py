r"""One-call accelerator benchmark: MLoRE ViT-L 512² and MTLoRA r64 Swin-T 448² train steps in bf16
at the recipe's batch and at the largest batch that fits; img/s, MFU and peak memory per line;
and, given checkouts of the official code, its steps on the same device with their ratio.

  python benchmarks/gpu_suite.py                                  # on a GPU/TPU (not yet run)
  python benchmarks/gpu_suite.py --mlore_checkout=DIR --mtlora_checkout=DIR   # + the originals
  python benchmarks/gpu_suite.py --smoke                          # tiny configs, seconds (tests)
  bash benchmarks/gpu_run.sh                                      # the device call, prepared by
                                                                  # benchmarks/gpu_bundle.sh

It needs only jax, flax, optax, numpy and ml_collections (no grain, TFDS or clu): the batch is
synthetic and in memory, and the step is the trainer's function written out (configured
model, trainable set, optimizer and losses; one device). Where ml_collections is not installed
and there is no package index, put its wheel in benchmarks/wheels/ (benchmarks/gpu_bundle.sh
does); a pure-Python wheel is importable from sys.path as it is. Each model runs in its own
subprocess so its peak memory is its own; batches double from the recipe's until one runs out
of memory or --budget_s is spent. MFU uses mtl_jax/perf.py: the device's bf16 peak, and the
step's FLOPs from XLA's cost analysis, on GPU of the step traced with the ViT attention in its
XLA form (XLA counts nothing inside the cuDNN call that runs; docs/accelerators.md §4). Each row
also carries the measured rate of an 8192³ bf16 matmul on the device (`matmul_flops`).

The originals, each in its own subprocess at the recipe's batch (MLoRE 4, MTLoRA 32) and as
released: benchmarks/reference_mlore_step.py --vit=L (fp32) and benchmarks/reference_mtlora_step.py
--amp (fp16 autocast + GradScaler), with the torch of the machine. --smoke runs them on
the CPU at batch 1 (MLoRE ViT-S) to check the path. Record results in benchmarks/RESULTS.md with
the GPU model, date and command.
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

_SMOKE = flags.DEFINE_bool('smoke', False, 'Smoke configs, one batch size; fp32 on CPU.')
_BUDGET = flags.DEFINE_float('budget_s', 200.0, 'Seconds per model before larger batches stop.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per batch size (after the compile).')
_MAX_BATCH = flags.DEFINE_integer('max_batch', 256, 'Largest batch tried.')
_MLORE = flags.DEFINE_string('mlore_checkout', '', 'YuqiYang213/MLoRE checkout (reference).')
_MTLORA = flags.DEFINE_string('mtlora_checkout', '', 'scale-lab/MTLoRA checkout (reference).')
_ATTENTION = flags.DEFINE_string('attention', 'auto', 'config.model.backbone.attention of the '
                                 'ViT (docs/accelerators.md §3): auto | xla | cudnn.')
_ONE = flags.DEFINE_string('one', '', 'Internal: run one model in this process.')

MODELS = {  # name -> (config module, arg): the recipes' models
    'mlore_vitl_512': ('mlore_pascal', 'vit=L'),
    'mtlora_r64_swint_448': ('mtlora_pascal', 'rank=64'),
}
# name -> (script, checkout flag, its args as released, its args under --smoke)
REFERENCES = {
    'mlore_vitl_512': ('reference_mlore_step.py', _MLORE, ['--vit=L'], ['--vit=S']),
    'mtlora_r64_swint_448': ('reference_mtlora_step.py', _MTLORA, ['--amp'], []),
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
  """(step(state, frozen, rest, batch) -> (state, loss), initial state, frozen, rest, tasks) of
  `config` on one device: the trainer's 'mtl' method (methods/mtl.py) without its input
  pipeline."""
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

  return step, state, frozen, rest, tasks


def run_one(name: str) -> None:
  """Times MODELS[name] at doubling batches; one JSON line per batch size on stdout."""
  import importlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mtl_jax import perf  # pylint: disable=g-import-not-at-top

  module, arg = MODELS[name]
  config = importlib.import_module(f'configs.{module}').get_config('smoke' if _SMOKE.value else arg)
  on_cpu = jax.default_backend() == 'cpu'
  config.model.dtype = 'float32' if on_cpu else 'bfloat16'
  if 'attention' in config.model.backbone:  # the ViT's
    config.model.backbone.attention = _ATTENTION.value
  size = tuple(config.input.crop_size)
  fn, state, frozen, rest, tasks = make_step(config)
  step = jax.jit(fn, donate_argnums=(0,))
  device = jax.devices()[0]
  matmul = perf.matmul_flops(512 if on_cpu else 8192, dtype=jnp.dtype(config.model.dtype))
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
    flops = (perf.flops_with_xla_attention(fn, state, frozen, rest, batch)
             if perf.attention_uncounted() else None)
    cost = perf.StepCost.of(compiled, flops=flops)
    row = {'model': name, 'device': device.device_kind, 'dtype': config.model.dtype,
           'attention': config.model.backbone.get('attention', 'window (Swin)'),
           'batch': batch_size, 'compile_s': round(compile_s, 1), 'ms_per_step': med * 1e3,
           'loss_finite': bool(np.isfinite(float(loss))), 'matmul_flops_measured': matmul,
           **cost.scalars(1 / med, batch_size)}
    print(json.dumps(row), flush=True)
    if _SMOKE.value or time.perf_counter() - start > _BUDGET.value:
      break
    batch_size *= 2


def _json_lines(cmd: list[str], what: str, env=None, fatal: bool = True) -> list[dict]:
  """The JSON rows `cmd` prints; where it fails or prints none, exits with its stderr's tail
  (`fatal`) or prints that and returns []."""
  out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
  lines = []
  for line in out.stdout.splitlines():
    try:
      lines.append(json.loads(line))
    except json.JSONDecodeError:  # the original code also prints dicts of its config
      pass
  lines = [l for l in lines if isinstance(l, dict) and 'model' in l]
  if out.returncode or not lines:
    message = f'error: {what} failed (exit {out.returncode}):\n{out.stderr[-3000:]}'
    if fatal:
      sys.exit(message)
    print(message, flush=True)
    return []
  return lines


def run_reference(name: str, batch: int) -> dict | None:
  """The official code's step for MODELS[name] (REFERENCES); None without its checkout or
  where it fails (its error printed)."""
  script, checkout, args, smoke_args = REFERENCES[name]
  if not checkout.value:
    return None
  wheels = glob.glob(os.path.join(ROOT, 'benchmarks', 'wheels', '*.whl'))  # timm 0.5.4, easydict
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
      [*wheels, *filter(None, [os.environ.get('PYTHONPATH')])])}
  device = 'cpu' if _SMOKE.value else 'cuda'
  flag = checkout.name.removesuffix('_checkout')  # the script's --mlore / --mtlora
  cmd = [sys.executable, os.path.join(ROOT, 'benchmarks', script), f'--{flag}', checkout.value,
         f'--device={device}', f'--steps={_STEPS.value}',
         f'--batch_size={1 if _SMOKE.value else batch}',
         *(smoke_args if _SMOKE.value else args)]
  lines = _json_lines(cmd, f'the reference step of {name}', env, fatal=False)
  return {**lines[-1], 'model': name} if lines else None


def main(argv):
  del argv
  if _ONE.value:
    run_one(_ONE.value)
    return
  rows, references = [], []
  for name in MODELS:
    cmd = [sys.executable, os.path.abspath(__file__), f'--one={name}',
           f'--steps={_STEPS.value}', f'--budget_s={_BUDGET.value}',
           f'--max_batch={_MAX_BATCH.value}', f'--smoke={_SMOKE.value}',
           f'--attention={_ATTENTION.value}']
    lines = _json_lines(cmd, name)
    rows += lines
    for line in lines:
      print(json.dumps(line), flush=True)
    first = next((r for r in lines if not r.get('oom')), None)
    ref = run_reference(name, first['batch'] if first else 1)
    if ref:
      references.append(ref)
      print(json.dumps({'reference': ref}), flush=True)
  for r in rows:
    if r.get('oom'):
      print(f'{r["model"]:22s} batch {r["batch"]:4d}: out of memory')
      continue
    mfu = f'{100 * r["perf/mfu"]:.1f} %' if 'perf/mfu' in r else 'n/a'
    print(f'{r["model"]:22s} {r["device"]} {r["dtype"]} batch {r["batch"]:4d} | '
          f'{r["ms_per_step"]:8.1f} ms/step | {r["perf/img_per_sec"]:8.1f} img/s | MFU {mfu} | '
          f'peak {r["perf/peak_memory_bytes"] / 2 ** 30:.2f} GiB | compile {r["compile_s"]} s | '
          f'matmul {r["matmul_flops_measured"] / 1e12:.1f} TFLOP/s')
  for ref in references:
    ours = [r for r in rows if r['model'] == ref['model'] and not r.get('oom')]
    if not ours:
      continue
    same = next((r for r in ours if r['batch'] == ref['batch']), ours[0])
    best = max(ours, key=lambda r: r['perf/img_per_sec'])
    ratio = lambda r: (f'{r["perf/img_per_sec"] / ref["perf/img_per_sec"]:.2f}x at batch '
                       f'{r["batch"]}')
    print(f'{ref["model"]:22s} official, batch {ref["batch"]:4d} on {ref["device"]} | '
          f'{ref["ms_per_step"]:8.1f} ms/step | {ref["perf/img_per_sec"]:8.1f} img/s | peak '
          f'{ref["perf/peak_memory_bytes"] / 2 ** 30:.2f} GiB | mtl_jax / official img/s: ' +
          ('none (--smoke: other sizes)' if _SMOKE.value else f'{ratio(same)}, {ratio(best)}'))
  print(json.dumps({'rows': rows, 'references': references}))


if __name__ == '__main__':
  app.run(main)
