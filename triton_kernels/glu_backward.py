"""Triton elementwise backward of an activation or GLU, with an optional per-row gate: one pass
over pre and dh, shared by ``moe_mlp`` (the first stage's activation) and ``neutral_residue``
(its adapter's activation under the per-token gate g).

For rows t and columns c < I, with u = pre[:, :I] (and v = pre[:, I:] for a GLU), h = act(u)
(or act(u)·v) and s = g[t] (1 without a row gate):

    du = s·dh·act'(u) (·v for a GLU),   dv = s·dh·act(u)

and optionally gh = s·h and, for a gated block, dz[t] = (Σ_c dh·h + extra[t])·gate'(g[t]), the
gradient of the gate's pre-activation (relu or sigmoid), stored as dpre's last column. Products
in float32, each result rounded once to pre's dtype; every row is owned by one program, so the
row sum is deterministic. Under the Triton interpreter the blocks are small.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from modekernels.kernel_codes import ACTIVATION_CODES, GATE_CODES
from modekernels.triton_kernels.common import INTERPRETING, activate, on_tensor_device

_BLOCK_M = 16 if INTERPRETING else 32
_BLOCK_N = 32 if INTERPRETING else 128


@triton.jit
def activation_derivative(z, ACTIVATION: tl.constexpr):
    """d act(z) / dz for the codes of ``activate`` (silu 1, gelu 2, relu 3)."""
    if ACTIVATION == 1:
        s = 1.0 / (1.0 + tl.exp(-z))
        d = s * (1.0 + z * (1.0 - s))
    elif ACTIVATION == 2:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        d = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    else:
        d = tl.where(z > 0, 1.0, 0.0)
    return d


@triton.jit
def _glu_backward_kernel(
    pre_ptr, dh_ptr, g_ptr, extra_ptr, gh_ptr, dpre_ptr,
    T, DA,
    stride_pt, stride_pa, stride_dht, stride_dha, stride_ght, stride_gha, stride_dpt, stride_dpa,
    ACTIVATION: tl.constexpr, GLU: tl.constexpr, GATE: tl.constexpr,
    ROW_SCALE: tl.constexpr, STORE_GH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Rows m·BLOCK_M..: du, dv (and gh, dz) as the module docstring says; g is read only when
    ROW_SCALE, gh stored only when STORE_GH, dz only when GATE != 0."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = rows < T
    r64 = rows.to(tl.int64)[:, None]
    if ROW_SCALE:
        g = tl.load(g_ptr + rows, mask=r_mask, other=0.0).to(tl.float32)
    else:
        g = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, DA, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        mask = r_mask[:, None] & (cols < DA)[None, :]
        u = tl.load(pre_ptr + r64 * stride_pt + cols[None, :] * stride_pa, mask=mask, other=0.0)
        u = u.to(tl.float32)
        dh = tl.load(dh_ptr + r64 * stride_dht + cols[None, :] * stride_dha, mask=mask, other=0.0)
        dh = dh.to(tl.float32)
        act = activate(u, ACTIVATION)
        du = g[:, None] * dh * activation_derivative(u, ACTIVATION)
        h = act
        if GLU:
            v_ptrs = pre_ptr + r64 * stride_pt + (cols + DA)[None, :] * stride_pa
            v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32)
            h = act * v
            du = du * v
            dv = g[:, None] * dh * act
            dv_ptrs = dpre_ptr + r64 * stride_dpt + (cols + DA)[None, :] * stride_dpa
            tl.store(dv_ptrs, dv.to(dpre_ptr.dtype.element_ty), mask=mask)
        if GATE != 0:
            dot += tl.sum(tl.where(mask, dh * h, 0.0), axis=1)
        if STORE_GH:
            gh_ptrs = gh_ptr + r64 * stride_ght + cols[None, :] * stride_gha
            tl.store(gh_ptrs, (g[:, None] * h).to(gh_ptr.dtype.element_ty), mask=mask)
        du_ptrs = dpre_ptr + r64 * stride_dpt + cols[None, :] * stride_dpa
        tl.store(du_ptrs, du.to(dpre_ptr.dtype.element_ty), mask=mask)
    if GATE != 0:
        extra = tl.load(extra_ptr + rows, mask=r_mask, other=0.0)
        if GATE == 1:
            slope = tl.where(g > 0, 1.0, 0.0)
        else:
            slope = g * (1.0 - g)
        dz_col = DA * (2 if GLU else 1)
        dz_ptrs = dpre_ptr + rows.to(tl.int64) * stride_dpt + dz_col * stride_dpa
        tl.store(dz_ptrs, ((dot + extra) * slope).to(dpre_ptr.dtype.element_ty), mask=r_mask)


@on_tensor_device
def glu_backward(
    pre: torch.Tensor,
    dh: torch.Tensor,
    activation: str,
    glu: bool,
    *,
    row_gate: torch.Tensor | None = None,
    gate: str = "none",
    gate_extra: torch.Tensor | None = None,
    with_gh: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(gh, dpre) for pre (T, I or 2·I) and dh (T, I), any strides; ``row_gate`` g (T,) float32
    scales each row (None: 1); ``gate`` ("none", "relu", "sigmoid") adds dz, which needs
    ``gate_extra`` (T,) float32; gh = g·h (T, I) only ``with_gh``, else None. dpre (T, n_pre
    [+ 1 when gated]) and gh in pre's dtype."""
    T = pre.shape[0]
    DA = dh.shape[1]
    gh = pre.new_empty(T, DA) if with_gh else None
    dpre = pre.new_empty(T, pre.shape[1] + int(gate != "none"))
    if T == 0:
        return gh, dpre
    unused = dpre  # never read or written when its constexpr switch is off
    _glu_backward_kernel[(triton.cdiv(T, _BLOCK_M),)](
        pre, dh,
        unused if row_gate is None else row_gate.contiguous(),
        unused if gate_extra is None else gate_extra.contiguous(),
        unused if gh is None else gh, dpre,
        T, DA,
        *pre.stride(), *dh.stride(), *((0, 0) if gh is None else gh.stride()), *dpre.stride(),
        ACTIVATION=ACTIVATION_CODES[activation], GLU=glu, GATE=GATE_CODES[gate],
        ROW_SCALE=row_gate is not None, STORE_GH=with_gh,
        BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
    )
    return gh, dpre
