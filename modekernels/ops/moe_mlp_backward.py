"""The elementwise steps of ``moe_mlp``'s backward, as torch ops with one fused pass each.

Registered as ``torch.ops.modekernels.moe_mlp_act_backward`` (d pre of the first stage from dh
and the kept pre-activation, through the activation or GLU) and
``torch.ops.modekernels.moe_mlp_gate_backward`` (the second stage's dh = gate·dy·w2ᵀ and the
gate's row sums), each with a fake kernel. Written in eager torch these steps make several
float32 temporaries the size of pre; the triton and cuda kernels read each input once and
write each result once (the first is the neutral-residue block's GLU backward without its row
gate, on both backends).
"""

from __future__ import annotations

from typing import Optional

import torch

from modekernels import backends
from modekernels._checks import FLOAT_DTYPES, check_dim, check_tensor
from modekernels.ops import autocast
from modekernels.reference.moe_mlp import ACTIVATIONS

_act_backward = backends.Dispatch(
    "moe_mlp_act_backward",
    reference="modekernels.reference.moe_mlp:activation_backward",
    triton="modekernels.triton_kernels.moe_mlp:activation_backward",
    cuda="modekernels.cuda.moe_mlp:activation_backward",
)
_gate_backward = backends.Dispatch(
    "moe_mlp_gate_backward",
    reference="modekernels.reference.moe_mlp:gate_backward",
    triton="modekernels.triton_kernels.moe_mlp:gate_backward",
    cuda="modekernels.cuda.moe_mlp:gate_backward",
)


def _check_act_backward(dh: object, pre: object, activation: object, gated: bool) -> None:
    check_tensor("pre", pre, rank=2, dtypes=FLOAT_DTYPES)
    check_tensor("dh", dh, rank=2, dtypes=(pre.dtype,), device=pre.device)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if gated and pre.shape[1] % 2:
        raise ValueError(f"a gated pre has 2·I columns, an even number; got {pre.shape[1]}")
    check_dim("dh.shape[0]", dh.shape[0], pre.shape[0], "S, the rows of pre")
    inner = pre.shape[1] // 2 if gated else pre.shape[1]
    check_dim("dh.shape[1]", dh.shape[1], inner, "I, the columns of h")


@torch.library.custom_op("modekernels::moe_mlp_act_backward", mutates_args=())
def activation_backward_op(
    dh: torch.Tensor,
    pre: torch.Tensor,
    activation: str,
    gated: bool,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """d pre (S, N1) in pre's dtype for h = act(pre) (or act(pre[:, :I])·pre[:, I:] when gated),
    from dh (S, I) and pre (S, N1); products in float32."""
    _check_act_backward(dh, pre, activation, gated)
    return _act_backward(backend, pre.device, dh, pre, activation, gated)


@activation_backward_op.register_fake
def _(dh, pre, activation, gated, backend=None):
    _check_act_backward(dh, pre, activation, gated)
    return pre.new_empty(pre.shape)  # contiguous, as every backend returns it


def _check_gate_backward(dh_unscaled: object, h: object, sorted_gate: object) -> None:
    check_tensor("h", h, rank=2, dtypes=FLOAT_DTYPES)
    check_tensor("dh_unscaled", dh_unscaled, rank=2, dtypes=(h.dtype,), device=h.device)
    if tuple(dh_unscaled.shape) != tuple(h.shape):
        raise ValueError(
            f"dh_unscaled must have h's shape {tuple(h.shape)}, got {tuple(dh_unscaled.shape)}"
        )
    check_tensor("sorted_gate", sorted_gate, rank=1, dtypes=(torch.float32,), device=h.device)
    check_dim("sorted_gate.shape[0]", sorted_gate.shape[0], h.shape[0], "S, the rows of h")


@torch.library.custom_op("modekernels::moe_mlp_gate_backward", mutates_args=())
def gate_backward_op(
    dh_unscaled: torch.Tensor,
    h: torch.Tensor,
    sorted_gate: torch.Tensor,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sorted row r: (dh[r] = sorted_gate[r]·dh_unscaled[r] in h's dtype,
    Σ_c dh_unscaled[r, c]·h[r, c] in float32), from dh_unscaled, h (S, I) and sorted_gate (S,)
    float32."""
    _check_gate_backward(dh_unscaled, h, sorted_gate)
    return _gate_backward(backend, h.device, dh_unscaled, h, sorted_gate)


@gate_backward_op.register_fake
def _(dh_unscaled, h, sorted_gate, backend=None):
    _check_gate_backward(dh_unscaled, h, sorted_gate)
    return h.new_empty(h.shape), sorted_gate.new_empty(h.shape[0])  # contiguous, as the backends'


# Run in the dtypes the forward saved (see modekernels.ops.autocast).
autocast.register("modekernels::moe_mlp_act_backward")
autocast.register("modekernels::moe_mlp_gate_backward")
