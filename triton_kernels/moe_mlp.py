"""Triton fused expert MLP: the two grouped GEMMs of ``moe_mlp`` with their epilogues.

Up (``moe_mlp_up``): for the sorted rows r of expert e, pre[r] = x[perm[r] // k] @ w1[e] + b1[e]
and h[r] = act(pre[r]) (or the GLU act(gate) ⊙ up). The rows of x are gathered through perm
inside the GEMM's A loads, so no permuted copy of x exists. When gated, each tile's accumulator
holds gate and up columns interleaved (column 2c the gate half's column c, 2c + 1 the up half's),
so one ``tl.dot`` computes both halves and the epilogue splits them in registers.

Down (``moe_mlp_down``): o[r] = gate[perm[r]]·(h[r] @ w2[e] + b2[e]) stored at slot perm[r]: for
k = 1 that is y itself (token order); for k > 1 it is a float32 (T·k, H) buffer that a second
kernel sums over each token's k slots in slot order. No atomics: every run gives the same bits.

Both walk the E groups plus the "tail" rows [offs[E-1], S), stored as zeros, with the persistent
tile schedule and the ``@triton.jit`` tile product of :mod:`modekernels.triton_kernels.grouped_mm`
(its row-index operand does the gather). :mod:`modekernels.ops.moe_mlp` composes the backward
from these kernels, the grouped GEMM ops (whose weight gradient reads rows through an index too)
and two one-pass row kernels here: ``activation_backward`` (d pre through the activation or
GLU) and ``gate_backward`` (dh = gate·dh_unscaled and the gate's row sums).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from modekernels.kernel_codes import ACTIVATION_CODES
from modekernels.triton_kernels.common import (
    INTERPRETING,
    SharedMemoryPrune,
    accumulate_product,
    activate,
    dot_options,
    group_end,
    on_tensor_device,
    persistent_grid,
    rows_bucket,
    tile_configs,
)
from modekernels.triton_kernels.glu_backward import glu_backward
from modekernels.triton_kernels.grouped_mm import FORWARD_FMA_TILES, FORWARD_PRUNE, FORWARD_TILES

_SUM_BLOCK = 256
# Row kernels of the backward: BLOCK_M rows per program, BLOCK_N columns at a time.
_ROWS_BLOCK_M = 16 if INTERPRETING else 32
_ROWS_BLOCK_N = 32 if INTERPRETING else 128
# The up kernel's operands are named as the grouped GEMM's; the down kernel's A operand is h.
_DOWN_PRUNE = SharedMemoryPrune("h_ptr", FORWARD_PRUNE.stage_elements)


@triton.jit
def _up_tile(
    x_ptr, perm_ptr, w_ptr, b_ptr, h_ptr, pre_ptr,
    row_start, row_end, m_tile, n_tile, k_end, is_expert, I, K, top_k,
    stride_xt, stride_xk, stride_wk, stride_wn, stride_bn, stride_hs, stride_hn, stride_ps, stride_pn,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, KEEP_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    """One tile of h (BLOCK_M rows; BLOCK_N columns, or BLOCK_N / 2 when gated) of one group."""
    rows = row_start + m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    tokens = tl.load(perm_ptr + rows, mask=row_mask, other=0) // top_k
    j = tl.arange(0, BLOCK_N)
    if GATED:
        OUT_N: tl.constexpr = BLOCK_N // 2
        out_cols = n_tile * OUT_N + j // 2
        w_cols = out_cols + (j % 2) * I  # gate column c, then up column I + c
    else:
        OUT_N: tl.constexpr = BLOCK_N
        out_cols = n_tile * OUT_N + j
        w_cols = out_cols
    col_mask = out_cols < I
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = accumulate_product(
        acc, x_ptr, tokens, row_mask, stride_xt, stride_xk,
        w_ptr, w_cols, col_mask, stride_wk, stride_wn, 0, k_end,
        BLOCK_K, INPUT_PRECISION, DOT_IN_FP32,
    )
    if HAS_BIAS:
        # (a bias only inside a group; masks built by comparison: the interpreter mishandles bool & bool)
        bias = tl.load(b_ptr + w_cols * stride_bn, mask=out_cols < tl.where(is_expert, I, 0), other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if KEEP_PRE:
        pre_ptrs = pre_ptr + rows.to(tl.int64)[:, None] * stride_ps + w_cols.to(tl.int64)[None, :] * stride_pn
        tl.store(pre_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
    if GATED:
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, OUT_N, 2)))
        h = activate(gate, ACTIVATION) * up
    else:
        h = activate(acc, ACTIVATION)
    cols = n_tile * OUT_N + tl.arange(0, OUT_N)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hs + cols.to(tl.int64)[None, :] * stride_hn
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_mask[:, None] & (cols < I)[None, :])


@triton.autotune(
    configs=tile_configs(FORWARD_TILES, fma_tiles=FORWARD_FMA_TILES),
    key=["N", "K", "rows_bucket", "GATED", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": FORWARD_PRUNE},
)
@triton.jit
def _moe_up_kernel(
    x_ptr, perm_ptr, offs_ptr, w_ptr, b_ptr, h_ptr, pre_ptr,
    S, N, I, K, E, top_k, rows_bucket,
    stride_xt, stride_xk, stride_we, stride_wk, stride_wn, stride_be, stride_bn,
    stride_hs, stride_hn, stride_ps, stride_pn,
    ACTIVATION: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, KEEP_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    """Persistent walk over groups 0..E-1 and the zero tail group E, as the grouped GEMM's."""
    tile = tl.program_id(0)
    num_programs = tl.num_programs(0)
    n_tiles = tl.cdiv(I, BLOCK_N // 2 if GATED else BLOCK_N)
    tiles_before = 0
    row_start = 0
    w_group_ptr = w_ptr  # the group's (K, N) matrix and bias, advanced by pointer: no int32 product
    b_group_ptr = b_ptr
    for group in range(0, E + 1):
        is_expert = group < E
        row_end = group_end(offs_ptr, group, E, row_start, S)
        group_tiles = tl.cdiv(row_end - row_start, BLOCK_M) * n_tiles
        k_end = tl.where(is_expert, K, 0)
        while tile < tiles_before + group_tiles:
            local = tile - tiles_before
            _up_tile(
                x_ptr, perm_ptr, w_group_ptr, b_group_ptr, h_ptr, pre_ptr,
                row_start, row_end, local // n_tiles, local % n_tiles, k_end, is_expert, I, K, top_k,
                stride_xt, stride_xk, stride_wk, stride_wn, stride_bn, stride_hs, stride_hn,
                stride_ps, stride_pn,
                ACTIVATION, GATED, HAS_BIAS, KEEP_PRE, BLOCK_M, BLOCK_N, BLOCK_K,
                INPUT_PRECISION, DOT_IN_FP32,
            )
            tile += num_programs
        tiles_before += group_tiles
        row_start = row_end
        w_group_ptr += stride_we
        b_group_ptr += stride_be


@triton.jit
def _down_tile(
    h_ptr, perm_ptr, w_ptr, b_ptr, gate_ptr, out_ptr,
    row_start, row_end, m_tile, n_tile, k_end, is_expert, N,
    stride_hs, stride_hk, stride_wk, stride_wn, stride_bn, stride_os, stride_on,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    """One tile of o of one group, scaled by the rows' gates and stored at their slots."""
    rows = row_start + m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    slots = tl.load(perm_ptr + rows, mask=row_mask, other=0)
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = accumulate_product(
        acc, h_ptr, rows, row_mask, stride_hs, stride_hk,
        w_ptr, cols, col_mask, stride_wk, stride_wn, 0, k_end,
        BLOCK_K, INPUT_PRECISION, DOT_IN_FP32,
    )
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols * stride_bn, mask=cols < tl.where(is_expert, N, 0), other=0.0)
        acc += bias.to(tl.float32)[None, :]
    gate = tl.load(gate_ptr + slots, mask=rows < tl.where(is_expert, row_end, 0), other=0.0)
    out = tl.where(is_expert, acc * gate.to(tl.float32)[:, None], 0.0)
    out_ptrs = out_ptr + slots.to(tl.int64)[:, None] * stride_os + cols.to(tl.int64)[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.autotune(
    configs=tile_configs(FORWARD_TILES, fma_tiles=FORWARD_FMA_TILES),
    key=["N", "K", "rows_bucket", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _DOWN_PRUNE},
)
@triton.jit
def _moe_down_kernel(
    h_ptr, perm_ptr, offs_ptr, w_ptr, b_ptr, gate_ptr, out_ptr,
    S, N, K, E, rows_bucket,
    stride_hs, stride_hk, stride_we, stride_wk, stride_wn, stride_be, stride_bn,
    stride_os, stride_on,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    """Persistent walk over groups 0..E-1 and the zero tail group E, as the grouped GEMM's."""
    tile = tl.program_id(0)
    num_programs = tl.num_programs(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    tiles_before = 0
    row_start = 0
    w_group_ptr = w_ptr  # as the up kernel's
    b_group_ptr = b_ptr
    for group in range(0, E + 1):
        is_expert = group < E
        row_end = group_end(offs_ptr, group, E, row_start, S)
        group_tiles = tl.cdiv(row_end - row_start, BLOCK_M) * n_tiles
        k_end = tl.where(is_expert, K, 0)
        while tile < tiles_before + group_tiles:
            local = tile - tiles_before
            _down_tile(
                h_ptr, perm_ptr, w_group_ptr, b_group_ptr, gate_ptr,
                out_ptr, row_start, row_end, local // n_tiles, local % n_tiles, k_end, is_expert, N,
                stride_hs, stride_hk, stride_wk, stride_wn, stride_bn, stride_os, stride_on,
                HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, DOT_IN_FP32,
            )
            tile += num_programs
        tiles_before += group_tiles
        row_start = row_end
        w_group_ptr += stride_we
        b_group_ptr += stride_be


@triton.jit
def _sum_slots_kernel(out_ptr, y_ptr, N, top_k, stride_ys, stride_yn, BLOCK: tl.constexpr):
    """y[t, cols] = Σ_j out[t·k + j, cols] for j = 0..k-1 in order; out is contiguous."""
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    row_ptr = out_ptr + token.to(tl.int64) * top_k * N + cols
    for _ in range(0, top_k):
        acc += tl.load(row_ptr, mask=mask, other=0.0)
        row_ptr += N
    y_ptrs = y_ptr + token.to(tl.int64) * stride_ys + cols.to(tl.int64) * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@on_tensor_device
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
    expert e; rows past offs[-1] zero. Inputs validated by the op, any strides (perm and offs
    read as contiguous copies where they are strided views). Returns
    (h (S, I), pre (S, N1), or (0, N1) unless keep_preactivation), both in x's dtype."""
    S = perm.shape[0]
    E, K, N = w1.shape
    inner = N // 2 if gated else N
    h = torch.empty((S, inner), dtype=x.dtype, device=x.device)
    pre = torch.empty((S if keep_preactivation else 0, N), dtype=x.dtype, device=x.device)
    if h.numel() == 0:
        return h, pre
    bias = b1 if b1 is not None else w1  # never read when HAS_BIAS is false
    _moe_up_kernel[persistent_grid(S, E, inner, x.device, gated)](
        x, perm.contiguous(), offs.contiguous(), w1, bias, h, pre, S, N, inner, K, E, top_k, rows_bucket(S, E),
        *x.stride(), *w1.stride(), *(b1.stride() if b1 is not None else (0, 0)), *h.stride(),
        *(pre.stride() if keep_preactivation else (0, 0)),
        ACTIVATION=ACTIVATION_CODES[activation], GATED=gated, HAS_BIAS=b1 is not None,
        KEEP_PRE=keep_preactivation, **dot_options(x.dtype),
    )
    return h, pre


@on_tensor_device
def moe_mlp_down(
    h: torch.Tensor,
    perm: torch.Tensor,
    offs: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    gate: torch.Tensor,
) -> torch.Tensor:
    """y[t] = Σ_j gate[t, j]·(h[r] @ w2[e] + b2[e]) over the sorted rows r holding slots t·k + j,
    summed over j in order. Inputs validated by the op, any strides (perm, offs and gate read
    as contiguous copies where they are strided views) -> y (T, H) in h's dtype."""
    T, top_k = gate.shape
    S = perm.shape[0]
    E, K, N = w2.shape
    y = torch.empty((T, N), dtype=h.dtype, device=h.device)
    if y.numel() == 0:
        return y
    out = y if top_k == 1 else torch.empty((S, N), dtype=torch.float32, device=h.device)
    bias = b2 if b2 is not None else w2[0]  # never read when HAS_BIAS is false
    _moe_down_kernel[persistent_grid(S, E, N, h.device)](
        h, perm.contiguous(), offs.contiguous(), w2, bias, gate.reshape(-1).contiguous(), out,
        S, N, K, E, rows_bucket(S, E),
        *h.stride(), *w2.stride(), *(b2.stride() if b2 is not None else (0, 0)), *out.stride(),
        HAS_BIAS=b2 is not None, **dot_options(h.dtype),
    )
    if top_k > 1:
        _sum_slots_kernel[(T, triton.cdiv(N, _SUM_BLOCK))](
            out, y, N, top_k, *y.stride(), BLOCK=_SUM_BLOCK
        )
    return y


def activation_backward(
    dh: torch.Tensor, pre: torch.Tensor, activation: str, gated: bool
) -> torch.Tensor:
    """d pre (S, N1) in pre's dtype from dh (S, I) and the kept pre (S, N1), in one pass
    (:func:`modekernels.triton_kernels.glu_backward.glu_backward` without a row gate)."""
    return glu_backward(pre, dh, activation, gated)[1]


@triton.jit
def _gate_backward_kernel(
    a_ptr, h_ptr, scale_ptr, dh_ptr, dot_ptr, S, I,
    stride_as, stride_ai, stride_hs, stride_hi, stride_ds, stride_di,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Rows m·BLOCK_M..: dh = scale·a rounded to dh's dtype, dot = Σ_c a·h in float32; each row
    owned by one program (deterministic)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = rows < S
    r64 = rows.to(tl.int64)[:, None]
    scale = tl.load(scale_ptr + rows, mask=r_mask, other=0.0)
    dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, I, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        mask = r_mask[:, None] & (cols < I)[None, :]
        a = tl.load(a_ptr + r64 * stride_as + cols.to(tl.int64)[None, :] * stride_ai, mask=mask, other=0.0)
        a = a.to(tl.float32)
        h = tl.load(h_ptr + r64 * stride_hs + cols.to(tl.int64)[None, :] * stride_hi, mask=mask, other=0.0)
        dot += tl.sum(a * h.to(tl.float32), axis=1)
        dh = (scale[:, None] * a).to(dh_ptr.dtype.element_ty)
        tl.store(dh_ptr + r64 * stride_ds + cols.to(tl.int64)[None, :] * stride_di, dh, mask=mask)
    tl.store(dot_ptr + rows, dot, mask=r_mask)


@on_tensor_device
def gate_backward(
    dh_unscaled: torch.Tensor, h: torch.Tensor, sorted_gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh = gate·dh_unscaled in h's dtype, Σ_c dh_unscaled·h (S,) float32) per sorted row, in
    one pass; inputs validated by the op, any strides."""
    S, I = h.shape
    dh = h.new_empty(S, I)  # contiguous whatever h's layout, as the op declares
    dot = torch.empty(S, dtype=torch.float32, device=h.device)
    if S == 0:
        return dh, dot
    _gate_backward_kernel[(triton.cdiv(S, _ROWS_BLOCK_M),)](
        dh_unscaled, h, sorted_gate.contiguous(), dh, dot, S, I,
        *dh_unscaled.stride(), *h.stride(), *dh.stride(),
        BLOCK_M=_ROWS_BLOCK_M, BLOCK_N=_ROWS_BLOCK_N,
    )
    return dh, dot
