"""MLoRE: mixture of low-rank experts decoder on the ViT (docs/mlore.md §3).

Model (`build_decoder`, assembled in models/__init__.py): `MultiTaskModel(vit.ViT, MLoRE,
{task: ConvHead})`. The ViT gives 3 taps + the final normed map (§2); per stage s a shared
1x1 conv `fea_fuse[s]` (D -> C), then per task two independent MoE blocks `mlore_1[s]`,
`mlore_2[s]` (§3.2); per task a stage fusion `task_mask[t]` (softmax over 4 stages per pixel,
§3.1 step 4), x4 bilinear (applied inside the heads, `head_upsample`); the heads run at 1/4
resolution and `MultiTaskModel` resizes their logits to the input. aux = {'gates': [8 gate
sets]}, each {task: (B, E)}: MoE 1 stages 0-3, then MoE 2 stages 0-3 (L_cv of §4,
mtl_jax/losses.py).

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
  mlore.fused (optional, default True): evaluate the experts fused or one by one as the
    reference (False; tests and benchmarks/mlore_step.py compare the two).
  mlore.repara: use the re-parameterised path in eval mode (same outputs, §3.4); it can also be
    switched on a built model with `model.eval(repara=True)` / `model.set_attributes(repara=...)`.
`config.input.crop_size` fixes the token grid: the router's position-Linear is resolution-locked.

Official checkpoints and parity fixtures: mtl_jax/convert/mlore.py (docs/mlore.md §8, §10).
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtl_jax import ConfigError
from mtl_jax import tasks as tasks_lib
from mtl_jax.models import layers
from mtl_jax.models import multitask

NUM_STAGES = 4  # 3 ViT taps + the final normed map (§2); hard-coded in the reference


def _conv2d(x: jax.Array, kernel: jax.Array, matmul: bool = False) -> jax.Array:
  """Stride-1 'same' NHWC conv with an HWIO kernel of odd size, no bias; `matmul`: as
  patches @ kernel (layers.conv_as_matmul), for kernels that differ along a vmapped axis."""
  pad = kernel.shape[0] // 2
  conv = layers.conv_as_matmul if matmul else layers.conv_general
  return conv(x, kernel, (1, 1), [(pad, pad)] * 2, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class LowRankExperts(nnx.Module):
  """E rank-r_i factorised 3x3 convs C -> C, mixed with per-sample gates (§3.2 step 5, §3.2.1).

  Expert i = 3x3 conv C -> r_i (bias) then 1x1 conv r_i -> C (bias), torch `lora_list_1.<i>.{W,M}`
  (and, with one expert, the task LoRA `conv2.<task>.{W,M}`). The experts' parameters are stored
  concatenated: `down_kernel` (3, 3, C, R), `down_bias` (R,), `up_kernel` (R, C), `up_bias`
  (E, C), R = sum r_i. Init (§3.6): kaiming_uniform(a=sqrt(5)) weights, zero biases.

  `fused=True` (config.model.mlore.fused) computes sum_i g_i Expert_i(x) as one conv C -> R, a
  per-sample scaling of each expert's r_i channels by g_i, one matmul R -> C and the bias sum_i g_i
  b_up_i; or, where that takes fewer products (R large against C: ViT-S's 540 vs 192), as the
  mixture's dense 3x3 C -> C kernel per sample (`dense`, the §3.4 re-parameterisation without
  BatchNorm, so also in training) applied as patches @ kernel. `fused=False` loops over the
  experts as the reference does (tests and benchmarks/mlore_step.py). All are equal up to
  summation order. `matmul` computes the 3x3 conv as patches @ kernel (the task LoRA, whose
  kernels differ per task under the task vmap of `MoEBlock`).
  """

  def __init__(self, channels: int, ranks: Sequence[int], *, matmul: bool = False,
               fused: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
    self.ranks = tuple(int(r) for r in ranks)
    self.matmul = matmul
    self.fused = fused
    self.dense_mixture = None  # fused: dense per-sample kernels (True) or not; None: fewer products
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
    dense = self.dense_mixture
    if self.fused and (dense if dense is not None
                       else self._dense_is_cheaper(x.shape[1] * x.shape[2])):
      kernel, bias = self.dense(gates, self.dtype)
      b, h, w, c = x.shape
      patches = layers.im2col(x, 3, 3, [(1, 1)] * 2).reshape(b, h * w, -1)
      y = jnp.einsum('bpk,bkc->bpc', patches, kernel.reshape(b, -1, c)).reshape(b, h, w, c)
      return y + bias[:, None, None]
    down, down_bias = self.down_kernel[...].astype(self.dtype), self.down_bias[...]
    up, up_bias = self.up_kernel[...].astype(self.dtype), self.up_bias[...]
    if not self.fused:
      out, start = 0.0, 0
      for i, r in enumerate(self.ranks):
        sl = slice(start, start + r)
        start += r
        y = _conv2d(x, down[..., sl], self.matmul) + down_bias[sl].astype(self.dtype)
        y = layers.matmul(y, up[sl]) + up_bias[i].astype(self.dtype)
        out = out + gates[:, i, None, None, None] * y
      return out
    y = _conv2d(x, down, self.matmul) + down_bias.astype(self.dtype)
    y = y * self._rank_scale(gates)[:, None, None]
    return layers.matmul(y, up) + (gates @ up_bias.astype(self.dtype))[:, None, None]

  def _dense_is_cheaper(self, positions: int) -> bool:
    """Whether the mixture as one dense 3x3 conv per sample (`dense`) takes fewer products on
    `positions` pixels than the factorised C -> R -> C convs: 9 C² + 9 C² R / positions (the
    kernel) < 9 C R + R C per pixel (MLoRE ViT-S: C 192, R 540, 32²: 0.51 M vs 1.04 M)."""
    _, _, c, total = self.down_kernel.shape
    return 9 * c * c * (1 + total / positions) < 10 * c * total

  def dense(self, gates: jax.Array, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """The gated mixture as one dense 3x3 conv per sample: kernels (B, 3, 3, C, C), biases (B, C).

    K[b, ..., o] = sum_r down[..., r] * g_b(r) * up[r, o] (the torch `virt_conv` of every expert,
    mixed); bias = (g_b(r) * b_down) @ up + g_b @ b_up (§3.4). Computed in `dtype`; the gates
    scale `up`, so all samples' kernels are one (9 C, R) @ (R, B C) matmul.
    """
    kh, kw, c, total = self.down_kernel.shape
    gates = gates.astype(dtype)
    scale = self._rank_scale(gates)
    down = self.down_kernel[...].astype(dtype).reshape(kh * kw * c, total)
    scaled_up = scale[:, :, None] * self.up_kernel[...].astype(dtype)  # (B, R, C)
    kernel = layers.matmul(down, scaled_up.transpose(1, 0, 2).reshape(total, -1))
    kernel = kernel.reshape(kh, kw, c, -1, c).transpose(3, 0, 1, 2, 4)
    bias = (jnp.einsum('r,brc->bc', self.down_bias[...].astype(dtype), scaled_up)
            + gates @ self.up_bias[...].astype(dtype))
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
               repara: bool = False, fused: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
    self.num_experts = len(ranks)
    self.topk = topk
    self.pre_softmax = pre_softmax
    self.repara = repara
    self.deterministic = False
    self.lora_experts = LowRankExperts(channels, ranks, fused=fused, dtype=dtype, rngs=rngs)
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
  """The MLoRE decoder (§3.1): 4 backbone maps -> ({task: (B, h, w, C)}, {'gates': [8 gate
  sets]}), (h, w) the grid of the first map. The maps are returned before the x4 bilinear
  upsampling, which the heads apply (`head_upsample`, models/multitask.py: the heads' 3x3 convs
  then run their channel products at (h, w), 16x fewer).

  `in_channels` / `grids`: the 4 stages' channels and grids (the backbone contract,
  models/backbone.py). The ViT's 4 maps share one grid, as in the reference; on a backbone with
  coarser later stages (Swin) each stage's MoE output is resized (bilinear) to the first grid
  before the stage fusion. Torch names: `fea_fuse` = backbone.fea_fuse, `mlore_1`/`mlore_2` =
  backbone.MLoRE_1/MLoRE_2, `task_mask` = backbone.task_mask.
  """

  def __init__(self, in_channels: Sequence[int], grids: Sequence[tuple[int, int]],
               tasks: Sequence[str], channels: int, rank_list: Sequence[int], spe_rank: int,
               topk: int, pre_softmax: bool, *, repara: bool = False, fused: bool = True,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if len(in_channels) != NUM_STAGES or len(grids) != NUM_STAGES:
      raise ConfigError(f'MLoRE needs {NUM_STAGES} backbone stages, got {len(in_channels)}; for '
                        'the ViT set config.model.backbone.taps to 3 blocks')
    if channels % 4:
      raise ConfigError(f'config.model.mlore.channels={channels} must be divisible by 4 (the '
                        'router concatenates two C/4 branches)')
    if not 1 <= topk <= len(rank_list):
      raise ConfigError(f'config.model.mlore.topk={topk} must be in [1, {len(rank_list)}] '
                        f'(the number of experts, len(rank_list))')
    self.tasks = tuple(tasks)
    self.head_upsample = 4  # the x4 bilinear of §3.1 step 4, applied by the heads
    block = lambda grid: MoEBlock(channels, tuple(grid), len(self.tasks), rank_list, spe_rank,
                                  topk, pre_softmax, repara=repara, fused=fused, dtype=dtype,
                                  rngs=rngs)
    self.fea_fuse = nnx.List([layers.conv(d, channels, 1, dtype=dtype, rngs=rngs)
                              for d in in_channels])
    self.mlore_1 = nnx.List([block(grid) for grid in grids])
    self.mlore_2 = nnx.List([block(grid) for grid in grids])
    self.task_mask = nnx.Dict({t: StageFusion(channels, dtype=dtype, rngs=rngs) for t in tasks})

  def __call__(self, features: Sequence[jax.Array]) -> tuple[dict[str, jax.Array], dict]:
    maps, aux, _ = self.forward_with_intermediates(features)
    return maps, aux

  def forward_with_intermediates(self, features: Sequence[jax.Array]
                                 ) -> tuple[dict[str, jax.Array], dict, dict[str, jax.Array]]:
    """Also returns the intermediates under their fixture names (§10), NHWC: `fuse/<s>`,
    `moe1|moe2/<s>/<t>`, `route1|route2/<s>/<t>`, `router_logits/moe1|moe2/<s>/<t>`,
    `stage_logits/<t>`, `dec/<t>`."""
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
    size = stage_maps[self.tasks[0]][0].shape[1:3]
    for t in self.tasks:
      stage_maps[t] = [y if y.shape[1:3] == size else layers.resize_bilinear(y, size)
                       for y in stage_maps[t]]
      logits = self.task_mask[t](jnp.concatenate(stage_maps[t], axis=-1))
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)
      maps[t] = sum(weights[..., s, None] * y for s, y in enumerate(stage_maps[t]))
      h, w = size
      inter[f'stage_logits/{t}'] = logits
      inter[f'dec/{t}'] = layers.resize_bilinear(maps[t], (self.head_upsample * h,
                                                           self.head_upsample * w))
    return maps, {'gates': gates_1 + gates_2}, inter


def build_decoder(config, tasks: Mapping[str, tasks_lib.Task], backbone, *, rngs: nnx.Rngs
                  ) -> tuple[MLoRE, dict[str, multitask.ConvHead]]:
  """MLoRE decoder on `backbone`'s 4 stages (models/backbone.py) + one ConvHead per task, from
  `config.model.mlore`."""
  cfg = config.model.mlore
  if len(backbone.stage_dims) != NUM_STAGES:
    raise ConfigError(f'MLoRE needs {NUM_STAGES} backbone stages, got '
                      f'{len(backbone.stage_dims)}; for the ViT set config.model.backbone.taps '
                      'to exactly 3 blocks')
  dtype = jnp.dtype(config.model.dtype)
  decoder = MLoRE(backbone.stage_dims, backbone.stage_grids, list(tasks), cfg.channels,
                  tuple(cfg.rank_list), cfg.spe_rank, cfg.topk, cfg.pre_softmax,
                  repara=cfg.repara, fused=cfg.get('fused', True), dtype=dtype, rngs=rngs)
  heads = {name: multitask.ConvHead(cfg.channels, task.num_outputs, dtype=dtype, rngs=rngs)
           for name, task in tasks.items()}
  return decoder, heads
