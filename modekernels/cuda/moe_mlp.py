"""``cuda`` backend of the expert MLP's two stages (``moe_mlp_up``, ``moe_mlp_down``): the cuda
grouped GEMM (:mod:`modekernels.cuda.grouped_mm`) around the kernels of ``csrc/moe_mlp.cu``.

Up: the CUTLASS grouped GEMM reads each group's A rows as one contiguous block and cannot gather
rows through an index, so this path first copies the rows of x into expert order
(x_sorted[r] = x[perm[r] // k], an (S, H) buffer: the one difference from the fused triton path,
which gathers inside its GEMM), runs pre = grouped_mm(x_sorted, w1, offs), then an epilogue
kernel adds b1[e] and applies the activation or GLU (pre keeps its bias in place when asked).

Down: out = grouped_mm(h, w2, offs) in expert order, then one kernel per token sums
gate[t·k + j]·(out[row of slot t·k + j] + b2[e]) over j in order in float32, through the inverse
of perm: deterministic, no atomics. Rows at or past offs[-1] belong to no expert: h rows zero,
no contribution to y. The grouped GEMM rounds pre and out to x's dtype before the bias is added
(the triton path adds it to the float32 accumulator). The backward is the op's composition of
``grouped_mm`` calls, which run this backend's grouped GEMM.
"""

from __future__ import annotations

import torch

from modekernels import _C
from modekernels.cuda import current_stream
from modekernels.cuda.grouped_mm import _DTYPE_CODES, grouped_mm
from modekernels.cuda.neutral_residue import glu_backward
from modekernels.kernel_codes import ACTIVATION_CODES


def _bias_args(b: torch.Tensor | None) -> dict:
    if b is None:
        return dict(bias=0, bias_stride_e=0, bias_stride_n=0)
    return dict(bias=b.data_ptr(), bias_stride_e=b.stride(0), bias_stride_n=b.stride(1))


def moe_mlp_up(
    x: torch.Tensor,
    perm: torch.Tensor,
    offs: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    activation: str,
    gated: bool,
    top_k: int,
    keep_preactivation: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h[r] = act(x[perm[r] // top_k] @ w1[e] + b1[e]) (GLU when gated) for the sorted rows r of
    expert e; rows past offs[-1] zero. Inputs validated by the op. Returns (h (S, I), pre
    (S, N1), or (0, N1) unless keep_preactivation), both in x's dtype."""
    S = perm.shape[0]
    E, K, N = w1.shape
    inner = N // 2 if gated else N
    if S * inner == 0:
        return x.new_empty((S, inner)), x.new_empty((S if keep_preactivation else 0, N))
    perm = perm.contiguous()
    offs = offs.contiguous()
    with torch.cuda.device(x.device):
        stream = current_stream(x.device)
        x_sorted = torch.empty((S, K), dtype=x.dtype, device=x.device)
        _C.gather_rows(
            x=x.data_ptr(), T=x.shape[0], K=K, x_stride_t=x.stride(0), x_stride_k=x.stride(1),
            perm=perm.data_ptr(), S=S, top_k=top_k, dst=x_sorted.data_ptr(),
            element_bytes=x.element_size(), stream=stream,
        )
        pre = grouped_mm(x_sorted, w1, offs)
        if activation == "identity" and not gated and b1 is None and not keep_preactivation:
            return pre, x.new_empty((0, N))  # h = pre (the backward's gathered dy·w2ᵀ): no pass
        h = torch.empty((S, inner), dtype=x.dtype, device=x.device)
        _C.moe_mlp_up_epilogue(
            pre=pre.data_ptr(), **_bias_args(b1), offs=offs.data_ptr(), S=S, E=E, I=inner,
            gated=gated, activation=ACTIVATION_CODES[activation], keep=keep_preactivation,
            h=h.data_ptr(), dtype=_DTYPE_CODES[x.dtype], stream=stream,
        )
    return h, pre if keep_preactivation else x.new_empty((0, N))


def moe_mlp_down(
    h: torch.Tensor,
    perm: torch.Tensor,
    offs: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    gate: torch.Tensor,
) -> torch.Tensor:
    """y[t] = Σ_j gate[t, j]·(h[r] @ w2[e] + b2[e]) over the sorted rows r holding slots t·k + j,
    summed over j in order. Inputs validated by the op -> y (T, H) in h's dtype."""
    T, top_k = gate.shape
    S = perm.shape[0]
    E, _, N = w2.shape
    y = torch.empty((T, N), dtype=h.dtype, device=h.device)
    if y.numel() == 0:
        return y
    perm = perm.contiguous()
    offs = offs.contiguous()
    gate_by_slot = gate.reshape(-1).to(torch.float32).contiguous()
    with torch.cuda.device(h.device):
        out = grouped_mm(h, w2, offs)
        slot_row = torch.empty(S, dtype=torch.int64, device=h.device)
        slot_expert = torch.empty(S, dtype=torch.int32, device=h.device)
        _C.moe_mlp_down_combine(
            out=out.data_ptr(), perm=perm.data_ptr(), offs=offs.data_ptr(), S=S, E=E, N=N, T=T,
            top_k=top_k, **_bias_args(b2), gate=gate_by_slot.data_ptr(),
            slot_row=slot_row.data_ptr(), slot_expert=slot_expert.data_ptr(), y=y.data_ptr(),
            dtype=_DTYPE_CODES[h.dtype], stream=current_stream(h.device),
        )
    return y


def activation_backward(
    dh: torch.Tensor, pre: torch.Tensor, activation: str, gated: bool
) -> torch.Tensor:
    """d pre (S, N1) in pre's dtype from dh (S, I) and the kept pre (S, N1), in one pass of the
    GLU backward kernel the neutral-residue block uses, without its row gate."""
    return glu_backward(pre, dh, activation, gated)[1]


def gate_backward(
    dh_unscaled: torch.Tensor, h: torch.Tensor, sorted_gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh = gate·dh_unscaled in h's dtype, Σ_c dh_unscaled·h (S,) float32) per sorted row, in
    one pass; inputs validated by the op, any strides."""
    S, inner = h.shape
    dh = torch.empty((S, inner), dtype=h.dtype, device=h.device)
    dot = torch.empty(S, dtype=torch.float32, device=h.device)
    if S == 0:
        return dh, dot
    scale = sorted_gate.contiguous()
    with torch.cuda.device(h.device):
        _C.moe_mlp_gate_backward(
            a=dh_unscaled.data_ptr(), a_stride_s=dh_unscaled.stride(0),
            a_stride_i=dh_unscaled.stride(1), h=h.data_ptr(), h_stride_s=h.stride(0),
            h_stride_i=h.stride(1), scale=scale.data_ptr(), S=S, I=inner, dh=dh.data_ptr(),
            dot=dot.data_ptr(), dtype=_DTYPE_CODES[h.dtype], stream=current_stream(h.device),
        )
    return dh, dot
