r"""Times one train step of the official PyTorch MLoRE (PASCAL ViT-S/16, 512x512) for comparison
with benchmarks/mlore_step.py on configs/mlore_pascal.py:vit=S. Not run by tests: needs torch and a
checkout of YuqiYang213/MLoRE (see tests/fixtures/reference_variants.py for the environment).

  VENV/bin/python benchmarks/reference_mlore_step.py --mlore=MLORE_CHECKOUT [--steps=3]
  VENV/bin/python benchmarks/reference_mlore_step.py --mlore=... --vit=B --device=cuda

The model, loss and optimiser come from the checkout, as its main.py builds them: the shipped
configs/pascal/pascal_vit{S,B,L}p16_MLoRE.yml through utils/config.create_config, `pre_softmax`
set to False where the yml lacks it (ViT-S, docs/mlore.md §9.1), utils/common_config.get_model
(MLoREWrapper, MLoRE backbone, ConvHeads; drop path 0.15; random init: the ViT factory is called
with pretrained=False instead of downloading the ImageNet npz), utils/common_config.get_criterion
(the reference's own losses: CE with ignore index for semseg/human_parts, 2-class CE with
batch-adaptive weights for sal, L1 on normalised normals, weighted BCE with edge_w for edge, task
weights 1/2/5/10/50, + load balancing x L_cv of the 8 gate sets). Step as utils/train_utils.
train_phase: train-mode forward (router noise, drop path, BatchNorm batch statistics), backward,
clip_grad_norm_ 10 over every parameter, torch.optim.Adam (coupled L2 1e-6, lr 2e-5, one group),
then the poly schedule's step. One batch of random tensors in the dataloader's layout (labels
(B, C, H, W) float, no ignore pixels) is reused, batch 2, fp32, median of --steps after one
warm-up step.

Differences from the JAX figure: one process without DDP and SyncBatchNorm (the same arithmetic on
one device); random labels instead of the procedural scenes (which have ignore regions); torch's
poly LambdaLR stands in for the checkout's PolynomialLR (same factor; utils/train_utils imports
packages this environment lacks). torchvision, ptflops and cv2 are replaced by inert stand-ins.
"""

import argparse
import os
import sys

import timing  # benchmarks/timing.py (this script's folder is on sys.path)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests',
                                'fixtures'))

FACTORIES = ('MLoRE_vit_small_patch16_384', 'MLoRE_vit_base_patch16_384',
             'MLoRE_vit_large_patch16_384')


def _without_download(module):
  """Makes get_backbone's factories (which hard-code pretrained=True) build a randomly
  initialised backbone instead of fetching the ImageNet weights."""

  def random_init(factory):
    def build(pretrained=False, **kwargs):
      del pretrained
      return factory(pretrained=False, **kwargs)
    return build

  for name in FACTORIES:
    setattr(module, name, random_init(getattr(module, name)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--mlore', required=True, help='checkout of YuqiYang213/MLoRE')
  parser.add_argument('--vit', default='S', choices=['S', 'B', 'L'], help='shipped PASCAL config')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--threads', type=int, default=0, help='torch threads (0: default)')
  parser.add_argument('--batch_size', type=int, default=2)
  parser.add_argument('--device', default='cpu', help='cpu | cuda')
  args = parser.parse_args()
  import reference_variants  # pylint: disable=g-import-not-at-top
  finder = reference_variants._InertFinder()  # pylint: disable=protected-access
  finder.PACKAGES = (*finder.PACKAGES, 'cv2')  # utils/config.py imports cv2 (never used here)
  sys.meta_path.insert(0, finder)
  checkout = os.path.abspath(args.mlore)
  sys.path.insert(0, checkout)
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  import models.transformers.MLoRE  # pylint: disable=g-import-not-at-top
  import models.transformers.MLoRE_vitB  # pylint: disable=g-import-not-at-top
  from utils.common_config import get_criterion, get_model  # pylint: disable=g-import-not-at-top
  from utils.config import create_config  # pylint: disable=g-import-not-at-top
  if args.threads:
    torch.set_num_threads(args.threads)

  # run_mode 'infer': create_config then makes no output folders.
  p = create_config(os.path.join(checkout, 'configs', 'pascal',
                                 f'pascal_vit{args.vit}p16_MLoRE.yml'), {'run_mode': 'infer'})
  if 'pre_softmax' not in p:  # missing from the ViT-S yml (docs/mlore.md §9.1)
    p.pre_softmax = False
  _without_download(models.transformers.MLoRE)
  _without_download(models.transformers.MLoRE_vitB)
  dev, b = torch.device(args.device), args.batch_size
  if dev.type == 'cuda':
    torch.backends.cudnn.benchmark = True  # as main.py
  torch.manual_seed(0)
  model = get_model(p).to(dev).train()
  criterion = get_criterion(p).to(dev)
  params = list(model.parameters())
  print(f'parameters {sum(q.numel() for q in params):,}, trainable '
        f'{sum(q.numel() for q in params if q.requires_grad):,}, torch threads '
        f'{torch.get_num_threads()}', flush=True)
  opt = torch.optim.Adam(params, **p['optimizer_kwargs'])
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: (1 - k / p.max_iter) ** 0.9)

  g = torch.Generator().manual_seed(0)
  hw = tuple(p.TRAIN.SCALE)
  labels = lambda n: torch.randint(0, n, (b, 1, *hw), generator=g).float()
  batch = {'image': torch.randn(b, 3, *hw, generator=g), 'semseg': labels(21),
           'human_parts': labels(7), 'sal': labels(2), 'edge': labels(2),
           'normals': F.normalize(torch.randn(b, 3, *hw, generator=g), dim=1)}
  batch = {k: v.to(dev) for k, v in batch.items() if k == 'image' or k in p.TASKS.NAMES}

  def step():
    output = model(batch['image'])
    loss_dict = criterion(output, batch, tasks=p.TASKS.NAMES)
    opt.zero_grad()
    loss_dict['total'].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), **p.grad_clip_param)
    opt.step()
    sched.step()
    if dev.type == 'cuda':
      torch.cuda.synchronize()

  first, med, fastest = timing.time_steps(step, args.steps)
  unused = sum(q.numel() for q in params if q.grad is None)
  print(f'parameters without a gradient (never run): {unused:,}')
  peak, mem = timing.peak_memory(torch.cuda.max_memory_allocated() if dev.type == 'cuda'
                                 else None)
  print(f'official MLoRE ViT-{args.vit} {hw[0]}x{hw[1]} batch {b} fp32 on {args.device} | first '
        f'step {first:.1f} s | median {med * 1e3:.0f} ms/step (min {fastest * 1e3:.0f}) | '
        f'{b / med:.3f} img/s | {mem}')
  timing.print_result(f'official_mlore_vit{args.vit.lower()}_{hw[0]}', args.device, b, first,
                      med, peak)


if __name__ == '__main__':
  main()
