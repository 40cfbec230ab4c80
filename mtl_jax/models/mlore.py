"""MLoRE: mixture of low-rank experts decoder on the ViT (specs/mlore.md §3), and its parity family.

Model (`build`): `MultiTaskModel(vit.ViT, MLoRE, {task: ConvHead})`. The ViT gives 3 taps + the
final normed map (§2); per stage s a shared 1x1 conv `fea_fuse[s]` (D -> C), then per task two
independent MoE blocks `mlore_1[s]`, `mlore_2[s]` (§3.2); per task a stage fusion `task_mask[t]`
(softmax over 4 stages per pixel, §3.1 step 4), x4 bilinear; the heads run at 1/4 resolution and
`MultiTaskModel` resizes their logits to the input. aux = {'gates': [8 gate sets]}, each
{task: (B, E)}: MoE 1 stages 0-3, then MoE 2 stages 0-3 (L_cv of §4, mtl_jax/losses.py).

MoE block, input X, task t (§3.2): U = conv1[t](X); router[t](U) -> [E gate logits | E noise
scales | mix]; training adds N(0, 1) * noise scale to the logits (RNG stream 'router'); top-k:
`pre_softmax=False` zeroes the E - topk smallest softmax gates (no renormalisation), True masks
the logits before the softmax; V = bn_all[t](sum_i g_i Expert_i(U)) + mix * task_lora[t](U) +
share_conv(stop_gradient(U)); out = conv3[t](GELU(bn[t](V))). The 15 experts are evaluated fused
(§3.2.1, `LowRankExperts`): one C -> sum(r) 3x3 conv, each expert's channels scaled by its gate,
one sum(r) -> C 1x1 conv. With `repara` and BatchNorm running statistics (eval), step 6 is one
dense 3x3 conv per sample whose kernel folds experts, bn_all, task LoRA and share_conv (§3.4).

Config keys (`config.model`):
  name: 'mlore'.
  backbone: as for 'vit_baseline' (mtl_jax/models/__init__.py): `variant` or explicit
    patch_size/embed_dim/depth/num_heads/taps (exactly 3 taps), drop_path_rate (0.15).
  mlore.channels: C (192 / 640 / 452 / 768 for S / B / L PASCAL / L NYUD), divisible by 4.
  mlore.rank_list: ranks of the E experts (E = len, 15 in every shipped config).
  mlore.spe_rank: rank of the per-task LoRA branch (torch `conv2.<task>`).
  mlore.topk: experts kept per sample (9).
  mlore.pre_softmax: top-k before (True, NYUD) or after (False, PASCAL) the softmax.
  mlore.repara: use the re-parameterised path in eval mode (same outputs, §3.4); it can also be
    switched on a built model with `model.eval(repara=True)` / `model.set_attributes(repara=...)`.
`config.input.crop_size` fixes the token grid: the router's position-Linear is resolution-locked.

Parity family (mtl_jax/tools/parity.py): `config_from_reference`, `params_from_torch`,
`reference_arrays`; `torch_state_dict_shapes(config)` is the official state-dict layout (§8).
"""

import collections
from collections.abc import Callable, Mapping, Sequence
import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mtl_jax import ConfigError
from mtl_jax import tasks as tasks_lib
from mtl_jax.models import layers
from mtl_jax.models import multitask
from mtl_jax.models import vit

NUM_STAGES = 4  # 3 ViT taps + the final normed map (§2); hard-coded in the reference


def _conv2d(x: jax.Array, kernel: jax.Array, matmul: bool = False) -> jax.Array:
  """Stride-1 'same' NHWC conv with an HWIO kernel of odd size, no bias; `matmul`: as
  patches @ kernel (layers.conv_as_matmul), for kernels that differ along a vmapped axis."""
  pad = kernel.shape[0] // 2
  conv = layers.conv_as_matmul if matmul else jax.lax.conv_general_dilated
  return conv(x, kernel, (1, 1), [(pad, pad)] * 2, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class LowRankExperts(nnx.Module):
  """E rank-r_i factorised 3x3 convs C -> C, mixed with per-sample gates (§3.2 step 5, §3.2.1).

  Expert i = 3x3 conv C -> r_i (bias) then 1x1 conv r_i -> C (bias), torch `lora_list_1.<i>.{W,M}`
  (and, with one expert, the task LoRA `conv2.<task>.{W,M}`). The experts' parameters are stored
  concatenated: `down_kernel` (3, 3, C, R), `down_bias` (R,), `up_kernel` (R, C), `up_bias`
  (E, C), R = sum r_i. Init (§3.6): kaiming_uniform(a=sqrt(5)) weights, zero biases.

  `fused=True` computes sum_i g_i Expert_i(x) as one conv C -> R, a per-sample scaling of each
  expert's r_i channels by g_i, one matmul R -> C and the bias sum_i g_i b_up_i; `fused=False`
  loops over the experts as the reference does (tests and benchmarks/mlore_step.py). Both are
  equal up to summation order. `matmul` computes the 3x3 conv as patches @ kernel (the task
  LoRA, whose kernels differ per task under the task vmap of `MoEBlock`).
  """

  fused = True  # class-wide default; benchmarks/mlore_step.py flips it before building a model

  def __init__(self, channels: int, ranks: Sequence[int], *, matmul: bool = False,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.ranks = tuple(int(r) for r in ranks)
    self.matmul = matmul
    self.dtype = dtype
    total = sum(self.ranks)
    self.down_kernel = nnx.Param(
        layers.torch_kernel_init()(rngs.params(), (3, 3, channels, total)))
    self.down_bias = nnx.Param(jnp.zeros((total,), jnp.float32))
    # Each expert's 1x1 conv has its own fan-in r_i: U(+-1/sqrt(r_i)) row by row.
    bound = np.repeat(1.0 / np.sqrt(self.ranks), self.ranks).astype(np.float32)[:, None]
    self.up_kernel = nnx.Param(
        jax.random.uniform(rngs.params(), (total, channels), jnp.float32, -1.0, 1.0) * bound)
    self.up_bias = nnx.Param(jnp.zeros((len(self.ranks), channels), jnp.float32))

  def _rank_scale(self, gates: jax.Array) -> jax.Array:
    """(B, E) gates -> (B, R): each expert's gate repeated over its r_i channels."""
    return jnp.repeat(gates, np.asarray(self.ranks), axis=1, total_repeat_length=sum(self.ranks))

  def __call__(self, x: jax.Array, gates: jax.Array) -> jax.Array:
    """x (B, h, w, C), gates (B, E) -> sum_i gates[:, i] * Expert_i(x), (B, h, w, C)."""
    x, gates = x.astype(self.dtype), gates.astype(self.dtype)
    down, down_bias = self.down_kernel[...].astype(self.dtype), self.down_bias[...]
    up, up_bias = self.up_kernel[...].astype(self.dtype), self.up_bias[...]
    if not self.fused:
      out, start = 0.0, 0
      for i, r in enumerate(self.ranks):
        sl = slice(start, start + r)
        start += r
        y = _conv2d(x, down[..., sl], self.matmul) + down_bias[sl].astype(self.dtype)
        y = y @ up[sl] + up_bias[i].astype(self.dtype)
        out = out + gates[:, i, None, None, None] * y
      return out
    y = (_conv2d(x, down, self.matmul) + down_bias.astype(self.dtype)) * self._rank_scale(gates)[:, None, None]
    return y @ up + (gates @ up_bias.astype(self.dtype))[:, None, None]

  def dense(self, gates: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The gated mixture as one dense 3x3 conv per sample: kernels (B, 3, 3, C, C), biases (B, C).

    K[b, ..., o] = sum_r down[..., r] * g_b(r) * up[r, o] (the torch `virt_conv` of every expert,
    mixed); bias = (g_b(r) * b_down) @ up + g_b @ b_up (§3.4).
    """
    scale = self._rank_scale(gates.astype(jnp.float32))
    up = self.up_kernel[...]
    kernel = jnp.einsum('yxir,br,ro->byxio', self.down_kernel[...], scale, up)
    bias = (scale * self.down_bias[...]) @ up + gates @ self.up_bias[...]
    return kernel, bias


class Router(nnx.Module):
  """SpatialAtt + 1x1 conv C/2 -> 2E + 1 (torch `router_1.<task>`, §3.2 steps 2-3).

  Branch a (torch names in brackets): `pool_conv1` [0.conv1] 1x1 C -> C/4, `pool_ln` [0.ln]
  LayerNorm over channels, GELU, `pool_conv2` [0.conv3] 1x1 C/4 -> C/4, mean over positions.
  Branch b: `pos_linear` [0.convsp] Linear over the h*w row-major positions (per channel),
  `pos_ln` [0.ln_sp] LayerNorm over C, GELU, `pos_conv` [0.conv2] 1x1 C -> C/4.
  `proj` [1] maps concat[branch a, branch b] to [E logits | E noise scales | mix]. LN eps 1e-5.
  """

  def __init__(self, channels: int, grid: tuple[int, int], num_experts: int, *, dtype,
               rngs: nnx.Rngs):
    quarter = channels // 4
    conv = lambda cin, cout: layers.conv(cin, cout, 1, matmul=True, dtype=dtype, rngs=rngs)
    self.pool_conv1 = conv(channels, quarter)
    self.pool_ln = nnx.LayerNorm(quarter, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.pool_conv2 = conv(quarter, quarter)
    self.pos_linear = nnx.Linear(grid[0] * grid[1], 1, kernel_init=layers.trunc_normal(0.02),
                                 bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs)
    self.pos_ln = nnx.LayerNorm(channels, epsilon=1e-5, dtype=dtype, rngs=rngs)
    self.pos_conv = conv(channels, quarter)
    self.proj = conv(2 * quarter, 2 * num_experts + 1)

  def __call__(self, u: jax.Array) -> jax.Array:
    """u (B, h, w, C) -> raw router output (B, 2E + 1) float32."""
    b, h, w, c = u.shape
    pooled = self.pool_conv2(layers.gelu(self.pool_ln(self.pool_conv1(u)))).mean(axis=(1, 2))
    positional = self.pos_linear(u.reshape(b, h * w, c).swapaxes(1, 2))[..., 0]  # (B, C)
    positional = self.pos_conv(layers.gelu(self.pos_ln(positional))[:, None, None])[:, 0, 0]
    r = jnp.concatenate([pooled, positional], axis=-1)
    return self.proj(r[:, None, None])[:, 0, 0].astype(jnp.float32)


def top_k_gates(logits: jax.Array, topk: int, pre_softmax: bool) -> jax.Array:
  """(B, E) logits -> gates with the E - topk smallest experts dropped (§3.2 step 4).

  pre_softmax=False: softmax over all E, dropped gates set to 0, kept ones not renormalised;
  True: dropped logits set to -1e10 before the softmax (kept gates sum to 1).
  """
  num_experts = logits.shape[-1]
  drop = num_experts - topk
  if drop <= 0:
    return jax.nn.softmax(logits, axis=-1)
  _, dropped = jax.lax.top_k(-logits, drop)
  mask = jnp.any(jax.nn.one_hot(dropped, num_experts, dtype=jnp.bool_), axis=-2)
  if pre_softmax:
    return jax.nn.softmax(jnp.where(mask, -1e10, logits), axis=-1)
  return jnp.where(mask, 0.0, jax.nn.softmax(logits, axis=-1))


class TaskBranch(nnx.Module):
  """The per-task parts of an MoE block (§3.2); `MoEBlock` stacks one per task on a leading axis.

  `conv1` (1x1), `task_lora` (torch `conv2.<task>`, rank spe_rank), `conv3` (1x1), `bn_all`
  (normalises the expert mixture), `bn` (normalises the sum V), `router` (torch `router_1.<task>`).
  Its convs run as matmuls (layers.conv_as_matmul): under the task vmap a conv with per-task
  kernels is a grouped conv, 10-30x slower on XLA:CPU.
  """

  def __init__(self, channels: int, grid: tuple[int, int], num_experts: int, spe_rank: int, *,
               dtype, rngs: nnx.Rngs):
    c = channels
    self.conv1 = layers.conv(c, c, 1, matmul=True, dtype=dtype, rngs=rngs)
    self.task_lora = LowRankExperts(c, (spe_rank,), matmul=True, dtype=dtype, rngs=rngs)
    self.conv3 = layers.conv(c, c, 1, matmul=True, dtype=dtype, rngs=rngs)
    self.bn_all = layers.BatchNorm(c)
    self.bn = layers.BatchNorm(c)
    self.router = Router(c, grid, num_experts, dtype=dtype, rngs=rngs)


class MoEBlock(nnx.Module):
  """One MLoRE block (torch `MLoRE_{1,2}.<stage>`, §3.2) for all tasks at once.

  Shared by the tasks: `lora_experts` [lora_list_1] and `share_conv`. `branches` holds one
  `TaskBranch` per task, stacked on a leading task axis (in config.tasks order) and run under
  `jax.vmap` on their split state (so the block also works inside plain jax transforms): one
  batched op per layer instead of one per task (and a T-times smaller graph).
  `deterministic` (model.train()/eval()) turns the router noise off; the noise comes from the
  block's own RNG stream tagged 'router'. `repara` selects the §3.4 path when BatchNorm uses
  running statistics (eval).
  """

  def __init__(self, channels: int, grid: tuple[int, int], num_tasks: int,
               ranks: Sequence[int], spe_rank: int, topk: int, pre_softmax: bool, *,
               repara: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
    self.num_experts = len(ranks)
    self.topk = topk
    self.pre_softmax = pre_softmax
    self.repara = repara
    self.deterministic = False
    self.lora_experts = LowRankExperts(channels, ranks, dtype=dtype, rngs=rngs)
    self.share_conv = layers.conv(channels, channels, 3, dtype=dtype, rngs=rngs)

    @nnx.split_rngs(splits=num_tasks)
    @nnx.vmap(in_axes=0, out_axes=0)
    def branches(rngs):
      return TaskBranch(channels, grid, self.num_experts, spe_rank, dtype=dtype, rngs=rngs)

    self.branches = branches(rngs)
    self.noise_rng = nnx.RngStream(rngs.router(), tag='router')

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x: (B, h, w, C) shared by the tasks or (T, B, h, w, C) per task -> (outputs
    (T, B, h, w, C), gates (T, B, E), raw router outputs (T, B, 2E + 1))."""
    num_tasks = self.branches.conv1.kernel.shape[0]
    batch = x.shape[-4]
    noise = None
    if not self.deterministic:
      noise = jax.random.normal(self.noise_rng(), (num_tasks, batch, self.num_experts))
    graphdef, state = nnx.split(self.branches)

    def run(state, x, noise):
      branch = nnx.merge(graphdef, state)
      u = branch.conv1(x)
      z = branch.router(u)
      e = self.num_experts
      logits, noise_scale, mix = z[:, :e], z[:, e:2 * e], z[:, 2 * e:]
      if noise is not None:
        logits = logits + noise * noise_scale
      gates = top_k_gates(logits, self.topk, self.pre_softmax)
      if self.repara and branch.bn_all.use_running_average:
        v = _reparameterised(u, gates, mix, self.lora_experts, branch, self.share_conv)
      else:
        v = (branch.bn_all(self.lora_experts(u, gates)) + branch.task_lora(u, mix)
             + self.share_conv(jax.lax.stop_gradient(u)))
      out = branch.conv3(layers.gelu(branch.bn(v)))
      return out, gates, z, nnx.state(branch, nnx.BatchStat)

    in_axes = (0, None if x.ndim == 4 else 0, None if noise is None else 0)
    out, gates, z, batch_stats = jax.vmap(run, in_axes=in_axes)(state, x, noise)
    if not self.branches.bn.use_running_average:  # training: the updated running statistics
      nnx.update(self.branches, batch_stats)
    return out, gates, z


def _reparameterised(u: jax.Array, gates: jax.Array, mix: jax.Array, experts: LowRankExperts,
                     branch: TaskBranch, share_conv: nnx.Conv) -> jax.Array:
  """V of §3.2 step 6 as one 3x3 conv per sample (§3.4): the gated experts folded with bn_all's
  running statistics, plus mix * task LoRA and share_conv; a vmapped conv over the batch."""
  kernel, bias = experts.dense(gates)
  bn = branch.bn_all
  mul = bn.scale[...] * jax.lax.rsqrt(bn.var[...] + bn.epsilon)
  bias = bn.bias[...] + (bias - bn.mean[...]) * mul
  lora_kernel, lora_bias = branch.task_lora.dense(mix)
  kernel = kernel * mul + lora_kernel + share_conv.kernel[...]
  bias = bias + lora_bias + share_conv.bias[...]
  out = jax.vmap(lambda x, k: _conv2d(x[None], k, matmul=True)[0])(u, kernel.astype(u.dtype))
  return out + bias.astype(u.dtype)[:, None, None]


class StageFusion(nnx.Module):
  """Per-task stage weights (torch `task_mask.<task>`, §3.1 step 4): `conv_in` [0] 1x1 4C -> C,
  `bn` [1], GELU, `conv_out` [3] 3x3 C -> 4. Returns the stage logits (before the softmax)."""

  def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
    self.conv_in = layers.conv(NUM_STAGES * channels, channels, 1, dtype=dtype, rngs=rngs)
    self.bn = layers.BatchNorm(channels)
    self.conv_out = layers.conv(channels, NUM_STAGES, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv_out(layers.gelu(self.bn(self.conv_in(x))))


class MLoRE(nnx.Module):
  """The MLoRE decoder (§3.1): 4 ViT maps -> ({task: (B, 4h, 4w, C)}, {'gates': [8 gate sets]}).

  Torch names: `fea_fuse` = backbone.fea_fuse, `mlore_1`/`mlore_2` = backbone.MLoRE_1/MLoRE_2,
  `task_mask` = backbone.task_mask.
  """

  def __init__(self, in_channels: int, grid: tuple[int, int], tasks: Sequence[str],
               channels: int, rank_list: Sequence[int], spe_rank: int, topk: int,
               pre_softmax: bool, *, repara: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
    if channels % 4:
      raise ConfigError(f'config.model.mlore.channels={channels} must be divisible by 4 (the '
                        'router concatenates two C/4 branches)')
    if not 1 <= topk <= len(rank_list):
      raise ConfigError(f'config.model.mlore.topk={topk} must be in [1, {len(rank_list)}] '
                        f'(the number of experts, len(rank_list))')
    self.tasks = tuple(tasks)
    block = lambda: MoEBlock(channels, tuple(grid), len(self.tasks), rank_list, spe_rank, topk,
                             pre_softmax, repara=repara, dtype=dtype, rngs=rngs)
    self.fea_fuse = nnx.List([layers.conv(in_channels, channels, 1, dtype=dtype, rngs=rngs)
                              for _ in range(NUM_STAGES)])
    self.mlore_1 = nnx.List([block() for _ in range(NUM_STAGES)])
    self.mlore_2 = nnx.List([block() for _ in range(NUM_STAGES)])
    self.task_mask = nnx.Dict({t: StageFusion(channels, dtype=dtype, rngs=rngs) for t in tasks})

  def __call__(self, features: Sequence[jax.Array]) -> tuple[dict[str, jax.Array], dict]:
    maps, aux, _ = self.forward_with_intermediates(features)
    return maps, aux

  def forward_with_intermediates(self, features: Sequence[jax.Array]
                                 ) -> tuple[dict[str, jax.Array], dict, dict[str, jax.Array]]:
    """Also returns the intermediates under their fixture names (§10), NHWC: `fuse/<s>`,
    `moe1|moe2/<s>/<t>`, `route1|route2/<s>/<t>`, `router_logits/moe1|moe2/<s>/<t>`,
    `stage_logits/<t>`, `dec/<t>`."""
    if len(features) != NUM_STAGES:
      raise ValueError(f'MLoRE needs {NUM_STAGES} feature maps (3 taps + final), got '
                       f'{len(features)}; set config.model.backbone.taps to 3 blocks')
    inter = {}
    gates_1, gates_2 = [], []
    stage_maps = {t: [] for t in self.tasks}
    for s, feature in enumerate(features):
      inter[f'fuse/{s}'] = fused = self.fea_fuse[s](feature)
      a, g1, z1 = self.mlore_1[s](fused)  # (T, B, ...) in task order
      y, g2, z2 = self.mlore_2[s](a)
      gates_1.append({t: g1[i] for i, t in enumerate(self.tasks)})
      gates_2.append({t: g2[i] for i, t in enumerate(self.tasks)})
      for i, t in enumerate(self.tasks):
        inter[f'moe1/{s}/{t}'], inter[f'route1/{s}/{t}'] = a[i], g1[i]
        inter[f'moe2/{s}/{t}'], inter[f'route2/{s}/{t}'] = y[i], g2[i]
        inter[f'router_logits/moe1/{s}/{t}'] = z1[i]
        inter[f'router_logits/moe2/{s}/{t}'] = z2[i]
        stage_maps[t].append(y[i])
    maps = {}
    for t in self.tasks:
      logits = self.task_mask[t](jnp.concatenate(stage_maps[t], axis=-1))
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)
      fused = sum(weights[..., s, None] * y for s, y in enumerate(stage_maps[t]))
      b, h, w, _ = fused.shape
      maps[t] = layers.resize_bilinear(fused, (4 * h, 4 * w))
      inter[f'stage_logits/{t}'], inter[f'dec/{t}'] = logits, maps[t]
    return maps, {'gates': gates_1 + gates_2}, inter


def build(config, tasks: Mapping[str, tasks_lib.Task], backbone: vit.ViT, *,
          rngs: nnx.Rngs) -> multitask.MultiTaskModel:
  """ViT `backbone` + MLoRE decoder + one ConvHead per task, from `config.model.mlore`."""
  cfg = config.model.mlore
  if len(backbone.taps) != NUM_STAGES - 1:
    raise ConfigError(f'MLoRE needs exactly 3 ViT taps, got config.model.backbone.taps='
                      f'{backbone.taps}')
  dtype = jnp.dtype(config.model.dtype)
  decoder = MLoRE(backbone.embed_dim, backbone.grid, list(tasks), cfg.channels,
                  tuple(cfg.rank_list), cfg.spe_rank, cfg.topk, cfg.pre_softmax,
                  repara=cfg.repara, dtype=dtype, rngs=rngs)
  heads = {name: multitask.ConvHead(cfg.channels, task.num_outputs, dtype=dtype, rngs=rngs)
           for name, task in tasks.items()}
  return multitask.MultiTaskModel(backbone, decoder, heads)


# ------------------------------------------------------------------------------------------------
# Parity family (mtl_jax/tools/parity.py) and checkpoint conversion (§8).

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
  tasks = tasks_lib.get_tasks(config.tasks, config.dataset.name, config.convention)
  for name, n in num_output.items():
    if name not in tasks or tasks[name].num_outputs != n:
      raise ConfigError(f'fixture task {name!r} has {n} outputs, the task registry '
                        f'{tasks[name].num_outputs if name in tasks else "does not list it"} '
                        f'(tasks {task_names})')
  return config


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One torch tensor: its shape, where it goes and how (`join`: pieces of one fused array)."""
  key: str
  shape: tuple[int, ...]
  collection: str  # 'params' | 'batch_stats'
  path: tuple  # in the nested pure dict of nnx.state(model, collection)
  convert: Callable[[np.ndarray], np.ndarray] = lambda w: w
  join: str = ''  # '' | 'concat_last' | 'concat_first' | 'stack'


def _conv_entries(key, path, cin, cout, k, join=''):
  return [_Entry(f'{key}.weight', (cout, cin, k, k), 'params', path + ('kernel',),
                 layers.conv_kernel_from_torch, join),
          _Entry(f'{key}.bias', (cout,), 'params', path + ('bias',), join=join)]


def _linear_entries(key, path, din, dout, join=''):
  return [_Entry(f'{key}.weight', (dout, din), 'params', path + ('kernel',),
                 layers.linear_kernel_from_torch, join),
          _Entry(f'{key}.bias', (dout,), 'params', path + ('bias',), join=join)]


def _norm_entries(key, path, dim, running=False, join=''):
  out = [_Entry(f'{key}.weight', (dim,), 'params', path + ('scale',), join=join),
         _Entry(f'{key}.bias', (dim,), 'params', path + ('bias',), join=join)]
  if running:  # BatchNorm
    out += [_Entry(f'{key}.running_mean', (dim,), 'batch_stats', path + ('mean',), join=join),
            _Entry(f'{key}.running_var', (dim,), 'batch_stats', path + ('var',), join=join)]
  return out


def _lowrank_entries(key, path, channels, rank, *, task_stacked=False):
  """torch `{key}.W` (3x3 C -> r) and `.M` (1x1 r -> C) as one expert of `LowRankExperts`:
  concatenated with the block's other experts (§3.2.1), or the one expert of a task LoRA,
  stacked over tasks."""
  concat = 'stack' if task_stacked else 'concat_last'
  return [
      _Entry(f'{key}.W.weight', (rank, channels, 3, 3), 'params', path + ('down_kernel',),
             layers.conv_kernel_from_torch, concat),
      _Entry(f'{key}.W.bias', (rank,), 'params', path + ('down_bias',), join=concat),
      _Entry(f'{key}.M.weight', (channels, rank, 1, 1), 'params', path + ('up_kernel',),
             lambda w: w[:, :, 0, 0].T, 'stack' if task_stacked else 'concat_first'),
      _Entry(f'{key}.M.bias', (channels,), 'params', path + ('up_bias',),
             (lambda w: w[None]) if task_stacked else (lambda w: w), 'stack'),
  ]


def _vit_arch(config) -> dict:
  """patch_size, embed_dim, depth, ... of config.model.backbone (as models.build_model reads it)."""
  cfg = config.model.backbone
  if cfg.get('variant'):
    if cfg.variant not in vit.VARIANTS:
      raise ConfigError(f'unknown config.model.backbone.variant {cfg.variant!r}; known: '
                        f'{", ".join(vit.VARIANTS)}')
    return vit.VARIANTS[cfg.variant]
  return {k: cfg[k] for k in ('patch_size', 'embed_dim', 'depth', 'num_heads', 'taps')}


def _torch_entries(config) -> list[_Entry]:
  """Every tensor of the official state dict (§8) for `config`, in state-dict order, without
  `num_batches_tracked` and the ViT-B keys that the forward never uses (§3.5).

  Per-task tensors of the MoE blocks are stacked over tasks in config.tasks order ('stack');
  the experts of a block are concatenated along their rank axis (§3.2.1).
  """
  tasks = tasks_lib.get_tasks(config.tasks, config.dataset.name.split('/')[0],
                              config.convention)
  arch = _vit_arch(config)
  d, p, depth = arch['embed_dim'], arch['patch_size'], arch['depth']
  h, w = (size // p for size in config.input.crop_size)
  cfg = config.model.mlore
  c, e = cfg.channels, len(cfg.rank_list)
  entries = [
      _Entry('backbone.pos_embed', (1, h * w + 1, d), 'params', ('backbone', 'pos_embed')),
      *_conv_entries('backbone.patch_embed.proj', ('backbone', 'patch_embed'), 3, d, p)]
  for i in range(depth):
    k, path = f'backbone.blocks.{i}', ('backbone', 'blocks', i)
    entries += [*_norm_entries(f'{k}.norm1', path + ('norm1',), d),
                *_linear_entries(f'{k}.attn.qkv', path + ('attn', 'qkv'), d, 3 * d),
                *_linear_entries(f'{k}.attn.proj', path + ('attn', 'proj'), d, d),
                *_norm_entries(f'{k}.norm2', path + ('norm2',), d),
                *_linear_entries(f'{k}.mlp.fc1', path + ('mlp', 'fc1'), d, 4 * d),
                *_linear_entries(f'{k}.mlp.fc2', path + ('mlp', 'fc2'), 4 * d, d)]
  entries += _norm_entries('backbone.norm', ('backbone', 'norm'), d)
  for s in range(NUM_STAGES):
    entries += _conv_entries(f'backbone.fea_fuse.{s}', ('decoder', 'fea_fuse', s), d, c, 1)
  for m in (1, 2):
    for s in range(NUM_STAGES):
      k, path = f'backbone.MLoRE_{m}.{s}', ('decoder', f'mlore_{m}', s)
      bp = path + ('branches',)
      for i, rank in enumerate(cfg.rank_list):
        entries += _lowrank_entries(f'{k}.lora_list_1.{i}', path + ('lora_experts',), c, rank)
      for t in tasks:
        entries += [*_conv_entries(f'{k}.conv1.{t}', bp + ('conv1',), c, c, 1, 'stack'),
                    *_lowrank_entries(f'{k}.conv2.{t}', bp + ('task_lora',), c, cfg.spe_rank,
                                      task_stacked=True),
                    *_conv_entries(f'{k}.conv3.{t}', bp + ('conv3',), c, c, 1, 'stack')]
      entries += _conv_entries(f'{k}.share_conv', path + ('share_conv',), c, c, 3)
      for t in tasks:
        entries += _norm_entries(f'{k}.bn.{t}', bp + ('bn',), c, True, 'stack')
      for t in tasks:
        entries += _norm_entries(f'{k}.bn_all.{t}', bp + ('bn_all',), c, True, 'stack')
      rp = bp + ('router',)
      for t in tasks:
        r = f'{k}.router_1.{t}'
        entries += [
            *_conv_entries(f'{r}.0.conv1', rp + ('pool_conv1',), c, c // 4, 1, 'stack'),
            *_norm_entries(f'{r}.0.ln', rp + ('pool_ln',), c // 4, join='stack'),
            *_linear_entries(f'{r}.0.convsp', rp + ('pos_linear',), h * w, 1, 'stack'),
            *_norm_entries(f'{r}.0.ln_sp', rp + ('pos_ln',), c, join='stack'),
            *_conv_entries(f'{r}.0.conv2', rp + ('pos_conv',), c, c // 4, 1, 'stack'),
            *_conv_entries(f'{r}.0.conv3', rp + ('pool_conv2',), c // 4, c // 4, 1, 'stack'),
            *_conv_entries(f'{r}.1', rp + ('proj',), c // 2, 2 * e + 1, 1, 'stack')]
  for t in tasks:
    k, path = f'backbone.task_mask.{t}', ('decoder', 'task_mask', t)
    entries += [*_conv_entries(f'{k}.0', path + ('conv_in',), NUM_STAGES * c, c, 1),
                *_norm_entries(f'{k}.1', path + ('bn',), c, running=True),
                *_conv_entries(f'{k}.3', path + ('conv_out',), c, NUM_STAGES, 3)]
  for t, task in tasks.items():
    k, path = f'heads.{t}', ('heads', t)
    entries += [*_conv_entries(f'{k}.mt_proj.0', path + ('conv',), c, c, 3),
                *_norm_entries(f'{k}.mt_proj.1', path + ('bn',), c, running=True),
                *_conv_entries(f'{k}.linear_pred', path + ('linear_pred',), c, task.num_outputs,
                               1)]
  return entries


def torch_state_dict_shapes(config) -> dict[str, tuple[int, ...]]:
  """{official state-dict key: shape} that `params_from_torch` reads for `config` (§8)."""
  return {e.key: e.shape for e in _torch_entries(config)}


# Keys of the official checkpoints that carry nothing the forward needs: BN counters, the
# unused ViT-B modules (§3.5) and the recomputed `virt_conv` tensors of reparameter() (§3.4).
_IGNORED = ('num_batches_tracked', 'backbone.q_fuse.', 'backbone.classify_route_1.',
            'backbone.classify_route_2.', 'aux_heads.', '.virt_conv.')


def _ignored(key: str) -> bool:
  return any(part in key for part in _IGNORED)


def params_from_torch(state_dict: Mapping[str, np.ndarray], config) -> dict[str, dict]:
  """Official MLoRE state dict -> {'params', 'batch_stats'} pure dicts of the `build` model (§8).

  Accepts the DDP `module.` prefix. Conv (O, I, kh, kw) -> (kh, kw, I, O); Linear (O, I) -> (I, O);
  the 15 experts' W/M tensors are concatenated into `LowRankExperts`' fused arrays. Raises one
  ConfigError listing every missing, unexpected and shape-mismatched key. With
  `jax.ShapeDtypeStruct` values the result is abstract (checks the layout of a large model,
  e.g. ViT-L, without memory).
  """
  if state_dict and all(k.startswith('module.') for k in state_dict):
    state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
  entries = _torch_entries(config)
  expected = {e.key: e.shape for e in entries}
  shape = lambda v: tuple(getattr(v, 'shape', np.shape(v)))
  missing = [k for k in expected if k not in state_dict]
  unexpected = [k for k in state_dict if k not in expected and not _ignored(k)]
  mismatched = [f'{k} {shape(state_dict[k])} (expected {want})' for k, want in expected.items()
                if k in state_dict and shape(state_dict[k]) != want]
  if missing or unexpected or mismatched:
    def show(name, keys):
      more = f' ... and {len(keys) - 20} more' if len(keys) > 20 else ''
      return f'\n  {len(keys)} {name}: ' + ', '.join(keys[:20]) + more if keys else ''
    raise ConfigError('the state dict does not match config.model / config.tasks / '
                      'config.input.crop_size' + show('missing', missing)
                      + show('unexpected', unexpected) + show('shape-mismatched', mismatched))
  needed = {k: state_dict[k] for k in expected}
  if any(isinstance(v, jax.ShapeDtypeStruct) for v in needed.values()):
    return jax.eval_shape(lambda sd: _assemble(sd, entries, jnp), needed)
  return _assemble(needed, entries, np)


def _assemble(state_dict: Mapping, entries: Sequence[_Entry], xp) -> dict[str, dict]:
  """The conversion proper, with the array namespace `xp` (numpy, or jax.numpy when traced)."""
  out = {'params': {}, 'batch_stats': {}}
  pieces = collections.defaultdict(list)
  for e in entries:
    value = e.convert(xp.asarray(state_dict[e.key], xp.float32))
    if e.join:
      pieces[(e.collection, e.path, e.join)].append(value)
    else:
      _set(out[e.collection], e.path, value)
  for (collection, path, join), values in pieces.items():
    joined = {'concat_last': lambda v: xp.concatenate(v, axis=-1),
              'concat_first': lambda v: xp.concatenate(v, axis=0),
              'stack': xp.stack}[join](values)
    _set(out[collection], path, joined)
  return out


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def params_to_torch(weights: Mapping[str, Mapping], config) -> dict[str, np.ndarray]:
  """Inverse of `params_from_torch`: {'params'[, 'batch_stats']} -> official state dict (§8).

  Also maps gradients (a `{'params': grads}` tree) to the official names and layouts, which is
  how tests compare them with the fixtures' `grad/*`. Collections absent from `weights` are
  skipped; `num_batches_tracked` is not produced.
  """
  entries = [e for e in _torch_entries(config) if e.collection in weights]
  offsets = collections.Counter()  # per joined array: next stack index / concat offset
  out = {}
  for e in entries:
    value = np.asarray(_get(weights[e.collection], e.path))
    group = (e.collection, e.path, e.join)
    if e.join == 'stack':
      value = value[offsets[group]]
      offsets[group] += 1
    elif e.join:  # a rank slice: 'concat_last' of W (r, C, 3, 3) / (r,), 'concat_first' of M
      size = e.shape[0] if e.join == 'concat_last' else e.shape[1]
      sl = slice(offsets[group], offsets[group] + size)
      value = value[..., sl] if e.join == 'concat_last' else value[sl]
      offsets[group] += size
    if len(e.shape) == 4:  # conv (kh, kw, I, O) -> (O, I, kh, kw); expert up (r, C) -> (C, r, 1, 1)
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T[..., None, None]
    elif len(e.shape) == 2:  # linear (I, O) -> (O, I)
      value = value.T
    out[e.key] = value.reshape(e.shape)
  return out


def _get(tree: Mapping, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


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
  blocks = [m for _, m in nnx.iter_graph(model) if isinstance(m, MoEBlock)]
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
