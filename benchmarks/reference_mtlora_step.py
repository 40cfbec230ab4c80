r"""Times one train step of the official PyTorch MTLoRA (r64, Swin-T, 448x448) for comparison
with benchmarks/train_step.py on configs/mtlora_pascal.py. Not run by tests: needs torch and a
checkout of scale-lab/MTLoRA (see tests/fixtures/reference_variants.py for the environment).

  /tmp/venv-ref/bin/python benchmarks/reference_mtlora_step.py --mtlora=MTLORA_CHECKOUT
  python benchmarks/reference_mtlora_step.py --mtlora=... --device=cuda --amp --batch_size=32

Same setup as the JAX figure: batch 2, fp32, CPU (or --device=cuda, with --amp the release's
fp16 autocast and GradScaler, as benchmarks/gpu_suite.py runs it), the MTLoRA recipe's
trainable set (LoRA, patch embedding, norms, relative position tables, reductions, decoders),
AdamW, one batch reused, median of --steps after one warm-up step. Losses: CE (semseg,
human_parts), BCE (sal), L1 on normalised normals — the reference's, without their ignore-region
bookkeeping.
"""

import argparse
import os
import sys

import timing  # benchmarks/timing.py (this script's folder is on sys.path)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests',
                                'fixtures'))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--mtlora', required=True, help='checkout of scale-lab/MTLoRA')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--threads', type=int, default=0, help='torch threads (0: default)')
  parser.add_argument('--batch_size', type=int, default=2)
  parser.add_argument('--device', default='cpu', help='cpu | cuda')
  parser.add_argument('--amp', action='store_true', help='fp16 autocast + GradScaler (CUDA)')
  args = parser.parse_args()
  import reference_variants  # pylint: disable=g-import-not-at-top
  sys.meta_path.insert(0, reference_variants._InertFinder())  # pylint: disable=protected-access
  sys.path.insert(0, os.path.abspath(args.mtlora))
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from easydict import EasyDict  # pylint: disable=g-import-not-at-top
  from models.build import build_model  # pylint: disable=g-import-not-at-top
  from models.swin_mtl import MultiTaskSwin  # pylint: disable=g-import-not-at-top
  if args.threads:
    torch.set_num_threads(args.threads)

  outputs = {'semseg': 21, 'normals': 3, 'sal': 1, 'human_parts': 7}
  tasks = list(outputs)
  mtlora = dict(ENABLED=True, R_PER_TASK_LIST=[{'shared': 64, **{t: 4 for t in tasks}}] * 4,
                SHARED_SCALE=[4.0] * 4, SCALE_PER_TASK_LIST=[{t: 4.0 for t in tasks}] * 4,
                SHARED_MODE='matrix', QKV_ENABLED=True, PROJ_ENABLED=True, FC1_ENABLED=True,
                FC2_ENABLED=True, DOWNSAMPLER_ENABLED=False, INTERMEDIATE_SPECIALIZATION=False,
                DROPOUT=[0.05] * 4, TRAINABLE_SCALE_SHARED=False, TRAINABLE_SCALE_PER_TASK=False)
  cfg = EasyDict(
      MODEL=EasyDict(TYPE='swin', NUM_CLASSES=0, DROP_RATE=0.0, DROP_PATH_RATE=0.2,
                     SWIN=dict(PATCH_SIZE=4, IN_CHANS=3, EMBED_DIM=96, DEPTHS=[2, 2, 6, 2],
                               NUM_HEADS=[3, 6, 12, 24], WINDOW_SIZE=7, MLP_RATIO=4.0,
                               QKV_BIAS=True, QK_SCALE=None, APE=False, PATCH_NORM=True),
                     MTLORA=mtlora, DECODER_HEAD={t: 'hrnet' for t in tasks},
                     DECODER_CHANNELS=[18, 36, 72, 144], DECODER_DOWNSAMPLER=True,
                     PER_TASK_DOWNSAMPLER=True),
      DATA=EasyDict(IMG_SIZE=448), TRAIN=EasyDict(USE_CHECKPOINT=False),
      FUSED_WINDOW_PROCESS=False, FUSED_LAYERNORM=False, TASKS=tasks,
      TASKS_CONFIG=EasyDict(ALL_TASKS=EasyDict(NUM_OUTPUT=outputs)))
  dev, b = torch.device(args.device), args.batch_size
  model = MultiTaskSwin(build_model(cfg), cfg).train().to(dev)
  keep = ('lora_', 'patch_embed', 'norm', 'relative_position_bias_table', 'downsample.reduction')
  for name, p in model.named_parameters():
    p.requires_grad = not name.startswith('backbone.') or any(k in name for k in keep)
  trainable = [p for p in model.parameters() if p.requires_grad]
  print(f'parameters {sum(p.numel() for p in model.parameters()):,}, trainable '
        f'{sum(p.numel() for p in trainable):,}, torch threads {torch.get_num_threads()}')
  opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.05)
  scaler = torch.amp.GradScaler(enabled=args.amp)
  g = torch.Generator().manual_seed(0)
  x = torch.randn(b, 3, 448, 448, generator=g).to(dev)
  semseg = torch.randint(0, 21, (b, 448, 448), generator=g).to(dev)
  parts = torch.randint(0, 7, (b, 448, 448), generator=g).to(dev)
  sal = torch.rand(b, 1, 448, 448, generator=g).round().to(dev)
  normals = F.normalize(torch.randn(b, 3, 448, 448, generator=g), dim=1).to(dev)

  def step():
    with torch.autocast(dev.type, dtype=torch.float16, enabled=args.amp):
      out = model(x)
    out = {k: v.float() for k, v in out.items()}
    loss = (F.cross_entropy(out['semseg'], semseg) + 2 * F.cross_entropy(out['human_parts'], parts)
            + 5 * F.binary_cross_entropy_with_logits(out['sal'], sal)
            + 10 * (F.normalize(out['normals'], dim=1) - normals).abs().mean())
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(trainable, 5.0)
    scaler.step(opt)
    scaler.update()
    if dev.type == 'cuda':
      torch.cuda.synchronize()

  first, med, fastest = timing.time_steps(step, args.steps)
  peak, mem = timing.peak_memory(torch.cuda.max_memory_allocated() if dev.type == 'cuda'
                                 else None)
  print(f'official MTLoRA r64 Swin-T 448x448 batch {b} {"amp fp16" if args.amp else "fp32"} on '
        f'{args.device} | first step {first:.1f} s | median {med * 1e3:.0f} ms/step (min '
        f'{fastest * 1e3:.0f}) | {b / med:.3f} img/s | {mem}')
  timing.print_result('official_mtlora_r64_swint_448', args.device, b, first, med, peak)


if __name__ == '__main__':
  main()
