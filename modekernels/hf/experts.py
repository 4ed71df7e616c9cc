"""The ``"modekernels"`` experts implementation for transformers' ``ExpertsInterface``.

After :func:`register` (run by ``import modekernels.hf``), every experts module built with
transformers' ``use_experts_implementation`` runs on the modekernels ops through
``from_pretrained(..., experts_implementation="modekernels")`` or
``model.set_experts_implementation("modekernels")``, honouring the module's flags as
transformers' own ``grouped_mm`` implementation does:

- ``has_gate`` / ``is_concatenated``: with the default ``_apply_gate`` (``act(gate) * up`` over
  the concatenated halves) and an activation the kernels have (silu, exact gelu, relu), the GLU
  runs in the first GEMM's epilogue; a model's own ``_apply_gate`` (gpt-oss: interleaved halves,
  clamping, its own sigmoid) or another activation runs in torch between the two GEMMs.
- ``has_bias``, ``is_transposed`` (the (E, in, out) layout; otherwise (E, out, in), used through
  a transposed view without a copy).
- ``has_post_expert_norm``: the norm needs each expert output before the routing weight, so the
  second GEMM is then :func:`modekernels.grouped_mm` followed by the norm, the weighting and the
  slot-order sum in torch.
- ``_is_expert_parallel``: expert ids ``>= num_experts`` are sentinels of tokens owned by other
  ranks. They sort into one bucket past ``offs[-1]``, where the kernels compute nothing and write
  zeros, so they add nothing to the output and get no gradient. A module without the flag
  (transformers before it, whose expert parallelism sets sentinels unflagged) is handled so.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import activations
from transformers.integrations.moe import _default_apply_gate

from modekernels.ops.autocast import autocast_operands
from modekernels.ops.grouped_mm import grouped_mm
from modekernels.ops.moe_mlp import slot_order_sum, moe_mlp_down, moe_mlp_up
from modekernels.ops.routing import sort_by_expert

IMPLEMENTATION = "modekernels"


def _kernel_activation(act_fn: object) -> str | None:
    """The kernels' name for a transformers activation module, or None if they lack it. (The
    transformers imports sit at module level: torch.compile cannot trace an import of
    transformers' lazy modules, and breaks the graph there.)"""
    silu = tuple(c for c in (nn.SiLU, getattr(activations, "SiLUActivation", None)) if c)
    if isinstance(act_fn, silu):
        return "silu"
    if isinstance(act_fn, activations.GELUActivation) or (
        isinstance(act_fn, nn.GELU) and act_fn.approximate == "none"
    ):
        return "gelu"
    if type(act_fn) is nn.ReLU:
        return "relu"
    return None


def _fused_activation(module: nn.Module) -> str | None:
    """The activation to fuse into the first GEMM, or None when torch must apply the gate."""
    if module.has_gate:
        if getattr(type(module), "_apply_gate", None) is not _default_apply_gate:
            return None
    return _kernel_activation(getattr(module, "act_fn", None))


def modekernels_experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """transformers' experts forward on modekernels: hidden_states (T, H), top_k_index and
    top_k_weights (T, k) -> (T, H) in hidden_states' dtype."""
    num_experts = self.num_experts
    top_k = top_k_index.shape[-1]
    expert_idx = top_k_index.reshape(-1, top_k)
    gate = top_k_weights.reshape(-1, top_k)
    if getattr(self, "_is_expert_parallel", True):
        perm, offs = sort_by_expert(expert_idx.clamp(max=num_experts), num_experts + 1)
        offs = offs[:num_experts]
    else:
        perm, offs = sort_by_expert(expert_idx, num_experts)

    prefix = "gate_up_proj" if self.has_gate else "up_proj"
    w1, w2 = getattr(self, prefix), self.down_proj
    if not self.is_transposed:
        w1, w2 = w1.transpose(1, 2), w2.transpose(1, 2)
    b1 = getattr(self, prefix + "_bias") if self.has_bias else None
    b2 = self.down_proj_bias if self.has_bias else None
    x = hidden_states.to(w1.dtype)

    activation = _fused_activation(self)
    if activation is not None:
        h = moe_mlp_up(x, perm, offs, w1, b1, activation=activation, gated=self.has_gate,
                       top_k=top_k)
    else:
        h = moe_mlp_up(x, perm, offs, w1, b1, activation="identity", gated=False, top_k=top_k)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)

    if not getattr(self, "has_post_expert_norm", False):
        return moe_mlp_down(h, perm, offs, w2, gate, b2).to(hidden_states.dtype)

    out = grouped_mm(*autocast_operands((h, w2)), offs)  # rows past offs[-1] (sentinels) are zero
    if b2 is not None:
        sorted_experts = expert_idx.reshape(-1)[perm].clamp(max=num_experts - 1)
        in_group = torch.arange(out.shape[0], device=out.device) < offs[-1]
        out = out + b2[sorted_experts] * in_group[:, None]
    out = self.post_expert_norm(out) * gate.reshape(-1)[perm, None]
    return slot_order_sum(out, perm, gate.shape[0], top_k).to(hidden_states.dtype)


def register() -> None:
    """Add ``"modekernels"`` to transformers' ``ExpertsInterface`` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, modekernels_experts_forward)
