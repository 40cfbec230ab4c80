"""MTLoRALinear: a frozen Linear with task-agnostic and task-specific low-rank updates.

Follows docs/mtlora.md §2 (MTLoRA repo: models/lora.py, SHARED_MODE 'matrix'):

  base   = x W + b                                   (the pretrained Linear, frozen)
  xd     = dropout(x)                                (LoRA dropout: only the low-rank inputs)
  y      = base + s_sh * (xd A_sh) B_sh              (TA-LoRA, "shared")
  y_t    = base + s_t * (u_t A_t) B_t                (TS-LoRA of task t; no TA term)
  u_t    = x_tasks[t] if given (no dropout) else xd  (the very same dropout sample)

The task outputs reuse the base projection of the *shared* input. Scales are direct multipliers
(not alpha / r). A ~ U(+-1/sqrt(in)) (kaiming_uniform(a=sqrt(5))), B = 0, so a fresh layer
equals its base. Rank 0 gives the plain base Linear. Parameter names follow the reference
state dict: `linear/{kernel,bias}`, `lora_shared_{A,B}`, `lora_tasks_{A,B}/<task>`; A is stored
(in, r) and B (r, out), the transposes of the torch tensors.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mtl_jax.models import layers


def base_linear(in_features: int, out_features: int, *, use_bias: bool = True,
                dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
  """nn.Linear with the Swin init: trunc_normal(.02) kernel, zero bias (mtlora.md §2)."""
  return layers.linear(in_features, out_features, use_bias=use_bias,
                       kernel_init=layers.trunc_normal(0.02), dtype=dtype, rngs=rngs)


class MTLoRALinear(nnx.Module):
  """`__call__(x, x_tasks=None) -> (y_shared, {task: y_task})` (docs/mtlora.md §2).

  Args:
    rank: TA-LoRA rank; 0 disables every low-rank term (task ones included, as the reference).
    task_ranks: {task: TS-LoRA rank}; empty for layers without task-specific outputs (qkv, the
      non-last blocks, PatchMerging, SHARED_MODE 'lora_only'). Then the task dict is empty.
    shared_scale, task_scales: multipliers s_sh and {task: s_t}.
    dropout: LoRA dropout rate (stream 'dropout').
  """

  def __init__(self, in_features: int, out_features: int, *, rank: int,
               task_ranks: Mapping[str, int] | None = None, shared_scale: float = 1.0,
               task_scales: Mapping[str, float] | None = None, dropout: float = 0.0,
               use_bias: bool = True, dtype=jnp.float32, rngs: nnx.Rngs):
    self.linear = base_linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                              rngs=rngs)
    self.rank = rank
    self.dtype = dtype
    task_ranks = dict(task_ranks or {}) if rank else {}
    task_scales = dict(task_scales or {})
    if set(task_ranks) - set(task_scales):
      raise ValueError(f'task_scales {task_scales} lacks tasks of task_ranks {task_ranks}')
    self.shared_scale = float(shared_scale)
    self.task_scales = tuple((t, float(task_scales[t])) for t in task_ranks)
    if rank:
      a_init = layers.torch_kernel_init()  # U(+-1/sqrt(in)) for an (in, r) kernel
      self.lora_shared_A = nnx.Param(a_init(rngs.params(), (in_features, rank)))
      self.lora_shared_B = nnx.Param(jnp.zeros((rank, out_features)))
      if task_ranks:
        self.lora_tasks_A = nnx.Dict({t: nnx.Param(a_init(rngs.params(), (in_features, r)))
                                      for t, r in task_ranks.items()})
        self.lora_tasks_B = nnx.Dict({t: nnx.Param(jnp.zeros((r, out_features)))
                                      for t, r in task_ranks.items()})
      self.dropout = layers.Dropout(dropout, rngs=rngs)

  def _delta(self, x: jax.Array, a: nnx.Param, b: nnx.Param, scale: float) -> jax.Array:
    """((x A) B) * scale, in the reference's evaluation order."""
    down = layers.matmul(x.astype(self.dtype), a[...].astype(self.dtype))
    return layers.matmul(down, b[...].astype(self.dtype)) * scale

  def __call__(self, x: jax.Array, x_tasks: Mapping[str, jax.Array] | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    base = self.linear(x)
    if not self.rank:
      return base, {}
    xd = self.dropout(x)
    y = base + self._delta(xd, self.lora_shared_A, self.lora_shared_B, self.shared_scale)
    y_tasks = {
        t: base + self._delta(xd if x_tasks is None else x_tasks[t], self.lora_tasks_A[t],
                              self.lora_tasks_B[t], scale)
        for t, scale in self.task_scales}
    return y, y_tasks
