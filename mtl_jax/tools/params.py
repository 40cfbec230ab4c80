r"""Parameter counts of a config, without allocating it.

  python -m mtl_jax.tools.params --config=...


  python -m mtl_jax.tools.params --config=configs/demo.py
  python -m mtl_jax.tools.params --config=configs/mlore_pascal.py:vit=S

Prints total and trainable counts per module (two levels deep) and per parameter kind (LoRA or
not), then a last line `total=N trainable=M`. Trainable = not matched by `config.frozen`, exactly
as the trainer splits the state (mtl_jax/train.py). Uses `nnx.eval_shape`: ViT-L builds in seconds.
"""

import collections
import sys

from absl import app
from absl import flags
from ml_collections import config_flags


def count(config) -> dict[str, dict[str, int]]:
  """{group: {'total': n, 'trainable': m}} for groups '<all>', top-level and second-level modules
  ('backbone', 'backbone/blocks', ...) and 'kind:lora' / 'kind:other'."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from mtl_jax import models  # pylint: disable=g-import-not-at-top
  from mtl_jax import tasks as tasks_lib  # pylint: disable=g-import-not-at-top
  from mtl_jax import optim  # pylint: disable=g-import-not-at-top

  tasks = tasks_lib.config_tasks(config)
  model = nnx.eval_shape(lambda: models.build_model(config, tasks, rngs=nnx.Rngs(0)))
  frozen = optim.frozen_filter(tuple(config.frozen))
  groups = collections.defaultdict(lambda: {'total': 0, 'trainable': 0})
  for path, variable in nnx.iter_graph(model):
    if not isinstance(variable, nnx.Param):
      continue
    n = int(np.prod(variable.shape))
    keys = [str(p) for p in path]
    trainable = not frozen(path, variable)
    kind = 'kind:lora' if any('lora' in k for k in keys) else 'kind:other'
    for group in ('<all>', keys[0], '/'.join(keys[:2]), kind):
      groups[group]['total'] += n
      groups[group]['trainable'] += n * trainable
  return dict(groups)


def main(argv):
  del argv
  groups = count(flags.FLAGS.config)
  width = max(len(g) for g in groups)
  print(f'{"group":<{width}}  {"total":>14}  {"trainable":>14}')
  for group in sorted(groups):
    if group != '<all>':
      g = groups[group]
      print(f'{group:<{width}}  {g["total"]:>14,}  {g["trainable"]:>14,}')
  print(f'total={groups["<all>"]["total"]} trainable={groups["<all>"]["trainable"]}')


def cli():
  """Entry point of the console script (pyproject.toml) and of `python -m`."""
  # Flags are defined here, not at import, so the tools can be imported together (tests).
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py[:args]).',
                                  lock_config=True)
  flags.mark_flags_as_required(['config'])
  sys.exit(app.run(main))


if __name__ == '__main__':
  cli()
