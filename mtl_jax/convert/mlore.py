"""The MLoRE family: official MLoRE state dicts <-> the mtl_jax MLoRE model (docs/mlore.md §8).

`entries(config)` is the official state-dict layout (§8) as a `keys.Entry` table, in state-dict
order: the ViT (convert/vit.py) under `backbone.`, `backbone.fea_fuse.<s>`, the MoE blocks
`backbone.MLoRE_{1,2}.<s>` (per-task tensors stacked over config.tasks, the experts of a block
concatenated along their rank axis, §3.2.1), `backbone.task_mask.<t>`, `heads.<t>`. Keys that
carry nothing the forward needs are dropped (`IGNORED`).

Family functions: `from_torch` / `to_torch` (also maps gradients), `torch_state_dict_shapes`,
`--format=mlore` (`FORMATS`), and for mtl_jax/tools/parity.py `config_from_reference` and
`reference_arrays` (fixtures, §10).
"""

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mtl_jax import ConfigError
from mtl_jax import tasks as tasks_lib
from mtl_jax.convert import keys
from mtl_jax.convert import vit as vit_convert
from mtl_jax.models import mlore as mlore_model
from mtl_jax.models import multitask
from mtl_jax.models import vit

NUM_STAGES = mlore_model.NUM_STAGES

# Keys of the official checkpoints that carry nothing the forward needs: BN counters, the unused
# modules of the ViT-B variant (§3.5) and the `virt_conv` tensors of reparameter() (§3.4, they
# are recomputed).
IGNORED = re.compile(r'.*\.num_batches_tracked|backbone\.(q_fuse|classify_route_[12])\..*|'
                     r'aux_heads\..*|.*\.virt_conv\..*')
_WHAT = 'the state dict does not match config.model / config.tasks / config.input.crop_size'


# -- the official layout (§8) ----------------------------------------------------------------------

def _lowrank_entries(key, path, channels, rank, *, task_stacked=False) -> list[keys.Entry]:
  """torch `{key}.W` (3x3 C -> r) and `.M` (1x1 r -> C) as one expert of `LowRankExperts`:
  concatenated with the block's other experts (§3.2.1), or the one expert of a task LoRA,
  stacked over tasks."""
  concat = 'stack' if task_stacked else 'concat_last'
  return [
      keys.Entry(f'{key}.W.weight', (rank, channels, 3, 3), 'params', path + ('down_kernel',),
                 'conv', concat),
      keys.Entry(f'{key}.W.bias', (rank,), 'params', path + ('down_bias',), join=concat),
      keys.Entry(f'{key}.M.weight', (channels, rank, 1, 1), 'params', path + ('up_kernel',),
                 'conv1x1_matrix', 'stack' if task_stacked else 'concat_first'),
      keys.Entry(f'{key}.M.bias', (channels,), 'params', path + ('up_bias',),
                 'add_axis' if task_stacked else 'same', 'stack'),
  ]


def entries(config) -> list[keys.Entry]:
  """Every tensor of the official state dict (§8) for `config`, in state-dict order, without
  the `IGNORED` keys."""
  tasks = tasks_lib.config_tasks(config)
  arch = vit.arch(config.model.backbone)
  d, p = arch['embed_dim'], arch['patch_size']
  h, w = (size // p for size in config.input.crop_size)
  cfg = config.model.mlore
  c, e = cfg.channels, len(cfg.rank_list)
  out = vit_convert.entries(dict(embed_dim=d, patch_size=p, num_pos=h * w + 1,
                                 depth=arch['depth'], hidden=4 * d), 'backbone.', ('backbone',))
  for s in range(NUM_STAGES):
    out += keys.conv_entries(f'backbone.fea_fuse.{s}', ('decoder', 'fea_fuse', s), d, c, 1)
  for m in (1, 2):
    for s in range(NUM_STAGES):
      k, path = f'backbone.MLoRE_{m}.{s}', ('decoder', f'mlore_{m}', s)
      bp = path + ('branches',)
      for i, rank in enumerate(cfg.rank_list):
        out += _lowrank_entries(f'{k}.lora_list_1.{i}', path + ('lora_experts',), c, rank)
      for t in tasks:
        out += [*keys.conv_entries(f'{k}.conv1.{t}', bp + ('conv1',), c, c, 1, 'stack'),
                *_lowrank_entries(f'{k}.conv2.{t}', bp + ('task_lora',), c, cfg.spe_rank,
                                  task_stacked=True),
                *keys.conv_entries(f'{k}.conv3.{t}', bp + ('conv3',), c, c, 1, 'stack')]
      out += keys.conv_entries(f'{k}.share_conv', path + ('share_conv',), c, c, 3)
      for t in tasks:
        out += keys.norm_entries(f'{k}.bn.{t}', bp + ('bn',), c, True, 'stack')
      for t in tasks:
        out += keys.norm_entries(f'{k}.bn_all.{t}', bp + ('bn_all',), c, True, 'stack')
      rp = bp + ('router',)
      for t in tasks:
        r = f'{k}.router_1.{t}'
        out += [
            *keys.conv_entries(f'{r}.0.conv1', rp + ('pool_conv1',), c, c // 4, 1, 'stack'),
            *keys.norm_entries(f'{r}.0.ln', rp + ('pool_ln',), c // 4, join='stack'),
            *keys.linear_entries(f'{r}.0.convsp', rp + ('pos_linear',), h * w, 1, 'stack'),
            *keys.norm_entries(f'{r}.0.ln_sp', rp + ('pos_ln',), c, join='stack'),
            *keys.conv_entries(f'{r}.0.conv2', rp + ('pos_conv',), c, c // 4, 1, 'stack'),
            *keys.conv_entries(f'{r}.0.conv3', rp + ('pool_conv2',), c // 4, c // 4, 1, 'stack'),
            *keys.conv_entries(f'{r}.1', rp + ('proj',), c // 2, 2 * e + 1, 1, 'stack')]
  for t in tasks:
    k, path = f'backbone.task_mask.{t}', ('decoder', 'task_mask', t)
    out += [*keys.conv_entries(f'{k}.0', path + ('conv_in',), NUM_STAGES * c, c, 1),
            *keys.norm_entries(f'{k}.1', path + ('bn',), c, running=True),
            *keys.conv_entries(f'{k}.3', path + ('conv_out',), c, NUM_STAGES, 3)]
  for t, task in tasks.items():
    k, path = f'heads.{t}', ('heads', t)
    out += [*keys.conv_entries(f'{k}.mt_proj.0', path + ('conv',), c, c, 3),
            *keys.norm_entries(f'{k}.mt_proj.1', path + ('bn',), c, running=True),
            *keys.conv_entries(f'{k}.linear_pred', path + ('linear_pred',), c, task.num_outputs,
                               1)]
  return out


def torch_state_dict_shapes(config) -> dict[str, tuple[int, ...]]:
  """{official state-dict key: shape} that `from_torch` reads for `config` (§8)."""
  return {e.key: e.shape for e in entries(config)}


def from_torch(state_dict: Mapping[str, np.ndarray], config) -> dict[str, dict]:
  """Official MLoRE state dict -> {'params', 'batch_stats'} pure dicts of the config's model.

  Accepts the DDP `module.` prefix and drops the `IGNORED` keys. Raises one ConfigError listing
  every missing, unexpected and shape-mismatched key. With `jax.ShapeDtypeStruct` values the
  result is abstract (checks the layout of a large model, e.g. ViT-L, without memory).
  """
  return keys.from_torch(keys.strip_prefix(state_dict), entries(config), _WHAT,
                         ignore=IGNORED.fullmatch, listing=True)


def to_torch(weights: Mapping[str, Mapping], config) -> dict[str, np.ndarray]:
  """Inverse of `from_torch`: {'params'[, 'batch_stats']} -> official state dict (§8), without
  the `IGNORED` keys. A `{'params': grads}` tree maps gradients (tests compare them with the
  fixtures' `grad/*`)."""
  return keys.to_torch(weights, entries(config))


def _convert(state_dict, config):
  """--format=mlore: `checkpoint['model']` -> (params, batch_stats, info)."""
  sd = keys.strip_prefix(state_dict)
  weights = from_torch(sd, config)
  keys.check_against_model(weights['params'], weights['batch_stats'], config)
  return weights['params'], weights['batch_stats'], {
      'dropped': sum(bool(IGNORED.fullmatch(k)) for k in sd)}


FORMATS = {'mlore': _convert}


# -- parity (mtl_jax/tools/parity.py, fixtures of §10) ---------------------------------------------

# Fixture `dataset` (or `db_name`) -> (TFDS dataset, pre_softmax of that dataset's configs, §1).
_DATASETS = {'pascal': ('pascal_context', False), 'pascalcontext': ('pascal_context', False),
             'nyud': ('nyud_v2', True), 'nyudv2': ('nyud_v2', True)}


def config_from_reference(config: ml_collections.ConfigDict, sidecar: Mapping
                          ) -> ml_collections.ConfigDict:
  """Sets model, tasks, dataset, input size and loss settings of a fixture sidecar (§10).

  Any fixture of the official code: PASCAL or NYUD task sets, h != w inputs, either pre_softmax
  (a missing `pre_softmax`, as in the shipped ViT-S yml, means the dataset's value: §1, §9.1),
  any seed. Loss settings absent from the sidecar keep the config's values.
  """
  rc = sidecar['reduced_config']
  names = [str(sidecar.get(k, '')).lower().replace('_', '').replace('-', '')
           for k in ('dataset', 'db_name')]
  known = [n for n in names if n in _DATASETS]
  if not known:
    raise ConfigError(f'fixture dataset {sidecar.get("dataset")!r} (db_name '
                      f'{sidecar.get("db_name")!r}) is not one of pascal, nyud')
  dataset, pre_softmax = _DATASETS[known[0]]
  size = rc['img_size']
  img_size = (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(v) for v in size)
  patch = int(rc['patch_size'])
  if img_size[0] % patch or img_size[1] % patch:
    raise ConfigError(f'fixture img_size {img_size} is not a multiple of patch_size {patch}')
  grid = tuple(v // patch for v in img_size)
  if 'grid' in rc and tuple(rc['grid']) != grid:
    raise ConfigError(f'fixture grid {rc["grid"]} does not match img_size {img_size} / patch '
                      f'{patch}')
  num_output = dict(sidecar['num_output'])
  task_names = list(sidecar.get('tasks') or num_output)
  config.model.name = 'mlore'
  config.model.backbone = ml_collections.ConfigDict(dict(
      variant='', patch_size=patch, embed_dim=int(rc['embed_dim']), depth=int(rc['depth']),
      num_heads=int(rc['num_heads']), taps=tuple(int(i) for i in rc['select_list']),
      drop_path_rate=float(rc.get('drop_path_rate', 0.15))))
  config.model.mlore = ml_collections.ConfigDict(dict(
      channels=int(rc['final_embed_dim']), rank_list=tuple(int(r) for r in rc['rank_list']),
      spe_rank=int(rc['spe_rank']), topk=int(rc['topk']),
      pre_softmax=bool(rc.get('pre_softmax', pre_softmax)), repara=False))
  config.tasks = ','.join(task_names)
  config.convention = 'mlore'
  config.dataset.name = dataset
  config.input.crop_size = img_size
  weights = dict(rc.get('loss_weights', {}))
  if 'load_balancing' in weights:
    config.load_balancing_weight = float(weights.pop('load_balancing'))
  config.loss_weights.update({k: float(v) for k, v in weights.items()})
  if 'edge_w' in rc:
    config.edge_w = float(rc['edge_w'])
  tasks = tasks_lib.config_tasks(config)
  for name, n in num_output.items():
    if name not in tasks or tasks[name].num_outputs != n:
      raise ConfigError(f'fixture task {name!r} has {n} outputs, the task registry '
                        f'{tasks[name].num_outputs if name in tasks else "does not list it"} '
                        f'(tasks {task_names})')
  return config


@nnx.jit
def _forward_with_intermediates(model: multitask.MultiTaskModel, images: jax.Array):
  """(ViT maps, decoder intermediates, predictions); module level, so the compilation is cached
  across models of the same structure."""
  features = model.backbone(images)
  _, _, inter = model.decoder.forward_with_intermediates(features)
  preds, _ = model(images)
  return features, inter, preds


def reference_arrays(model: multitask.MultiTaskModel, images_nchw: np.ndarray, config
                     ) -> dict[str, np.ndarray]:
  """Fixture arrays (§10) in torch layouts from an eval-mode model: `out/*`, `feat/*` (B, N, D),
  `fuse/*`, `moe1|moe2/*`, `route1|route2/*`, `router_logits/*`, `stage_logits/*`, `dec/*` and
  `out_repara/*` (the same model with `repara` on)."""
  del config
  images = jnp.asarray(np.asarray(images_nchw).transpose(0, 2, 3, 1))
  blocks = [m for _, m in nnx.iter_graph(model) if isinstance(m, mlore_model.MoEBlock)]
  saved = [block.repara for block in blocks]
  model.set_attributes(repara=False)
  features, inter, preds = _forward_with_intermediates(model, images)
  model.set_attributes(repara=True)
  _, _, preds_repara = _forward_with_intermediates(model, images)
  for block, flag in zip(blocks, saved):
    block.repara = flag

  def torch_layout(x):
    x = np.asarray(x)
    return x.transpose(0, 3, 1, 2) if x.ndim == 4 else x

  out = {f'feat/{i}': np.asarray(f).reshape(f.shape[0], -1, f.shape[-1])
         for i, f in enumerate(features)}
  out.update({k: torch_layout(v) for k, v in inter.items()})
  out.update({f'out/{t}': torch_layout(v) for t, v in preds.items()})
  out.update({f'out_repara/{t}': torch_layout(v) for t, v in preds_repara.items()})
  return out
