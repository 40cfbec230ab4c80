r"""Times one train step of the user's PyTorch fork's ProMLoRA-T (r32, 50 prompt tokens, 448x448)
for comparison with the JAX port. Not run by tests: needs torch and a checkout of the fork
assembled as tests/fixtures/fork_variants.py describes (same environment).

  VENV/bin/python benchmarks/reference_promlora_step.py --fork=FORK_CHECKOUT [--steps=5]

Setup: the fork's yaml configs/mtlora/tiny_448/pascal/promlora_tiny_448_r32_prom50_scale4_pertask
through its config.py, PASCAL tasks semseg/normals/sal/human_parts (one backbone pass per task),
batch 2, fp32, CPU, train mode (LoRA dropout 0.05, drop path 0.2 active), the fork's trainable
set (mark_only_lora_as_trainable + prompts re-enabled, as its main.py), the fork's
build_optimizer (AdamW, wd 0.05, 1-D/bias exempt, built before the freezing as in main.py), clip 5
over the trainable parameters, one batch reused, median of --steps
after one warm-up step. Losses: CE (semseg, human_parts), BCE (sal), L1 on normalised normals,
weights 1/2/5/10 -- without the reference's ignore-region bookkeeping. Prints ms/step and the
process's peak RSS.
"""

import argparse
import os
import sys

import timing  # benchmarks/timing.py (this script's folder is on sys.path)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests',
                                'fixtures'))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--fork', required=True, help='checkout of the fork (see fork_variants.py)')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--threads', type=int, default=0, help='torch threads (0: default)')
  args = parser.parse_args()
  import fork_variants  # pylint: disable=g-import-not-at-top
  fork_config = fork_variants._import_fork(args.fork)  # pylint: disable=protected-access
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from optimizer import build_optimizer  # pylint: disable=g-import-not-at-top
  if args.threads:
    torch.set_num_threads(args.threads)

  fork = os.path.abspath(args.fork)
  outputs = fork_variants.PASCAL
  cfg = fork_variants.build_config(fork_config, fork, fork_variants.BASE_YAML, list(outputs),
                                   outputs, {'MODEL.NUM_CLASSES': 0})
  model = fork_variants.build(cfg, 0, torch)
  # As the fork's main.py: the optimizer is built over every parameter *before* the freezing
  # (frozen ones then never get a .grad, so AdamW skips them), on the MultiTaskSwin wrapper.
  opt = build_optimizer(cfg, model)
  fork_variants.apply_recipe(model, cfg)
  model.train()
  trainable = [p for p in model.parameters() if p.requires_grad]
  print(f'parameters {sum(p.numel() for p in model.parameters()):,}, trainable '
        f'{sum(p.numel() for p in trainable):,}, torch threads {torch.get_num_threads()}')
  g = torch.Generator().manual_seed(0)
  hw = tuple(cfg.DATA.IMG_SIZE)
  x = torch.randn(2, 3, *hw, generator=g)
  semseg = torch.randint(0, 21, (2, *hw), generator=g)
  parts = torch.randint(0, 7, (2, *hw), generator=g)
  sal = torch.rand(2, 1, *hw, generator=g).round()
  normals = F.normalize(torch.randn(2, 3, *hw, generator=g), dim=1)

  def step():
    out = model(x)
    loss = (F.cross_entropy(out['semseg'], semseg) + 2 * F.cross_entropy(out['human_parts'], parts)
            + 5 * F.binary_cross_entropy_with_logits(out['sal'], sal)
            + 10 * (F.normalize(out['normals'], dim=1) - normals).abs().mean())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, cfg.TRAIN.CLIP_GRAD)
    opt.step()

  first, med, fastest = timing.time_steps(step, args.steps)
  print(f'fork ProMLoRA-T r32 prom50 448x{hw[1]} batch 2 fp32 | first step {first:.1f} s | '
        f'median {med * 1e3:.0f} ms/step (min {fastest * 1e3:.0f}) over {args.steps} | '
        f'{2 / med:.3f} img/s | peak RSS {timing.peak_rss_mib():.0f} MiB')


if __name__ == '__main__':
  main()
