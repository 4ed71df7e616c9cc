"""Triton grouped GEMM: ``y[r] = x[r] @ w[e]`` over contiguous row groups, and its weight gradient.

Forward: one persistent launch walks the E groups plus a "tail" group, the rows
``[offs[E-1], S)``, which it stores as zeros; each program takes every ``num_programs``-th output
tile of the walk, computing each group's tile count from ``offs`` on the device, so the host
never reads ``offs``. Weight gradient: a grid of E x tiles(K) x tiles(N) programs, each looping
over its group's rows (an empty group stores zeros); the rows of x and dy may be read through
index arrays and dy's scaled per row (``moe_mlp``'s backward: x[token], gate·dy[token]).

Operands are addressed through their strides (``w`` may be a ``.transpose(1, 2)`` view, ``x`` any
slice), products accumulate in float32, and float32 inputs use TF32 where PyTorch's float32
matmul precision allows it. On a GPU the tile sizes are autotuned per (N, K, rows per group
rounded to a power of two, dtype, precision); under the Triton interpreter
(``TRITON_INTERPRET=1``) one small configuration runs, and half-precision tiles are widened to
float32 before ``tl.dot``, whose bf16 path the interpreter gets wrong (triton-lang/triton#11584).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from modekernels.reference.grouped_mm import empty_weight_grad
from modekernels.triton_kernels.common import (
    SharedMemoryPrune,
    accumulate_product,
    dot_options,
    group_end,
    on_tensor_device,
    persistent_grid,
    rows_bucket,
    tile_configs,
)

# Hopper-sized tiles. Configurations whose pipelined tiles overflow shared memory (wide fp32
# tiles) are pruned before compiling. Tensor dtypes are part of every Triton autotune key.
FORWARD_TILES = [  # output tile BLOCK_M x BLOCK_N, reduction over K by BLOCK_K
    (128, 128, 64, 4, 3),
    (128, 128, 64, 8, 4),
    (128, 256, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (64, 128, 64, 4, 3),
    (128, 64, 64, 4, 4),
    (128, 128, 32, 8, 3),  # float32 on TF32 and the gated up stage: the others spill there
    (16, 64, 128, 4, 4),  # decode: a few rows per expert, bound by reading the weights once
]
FORWARD_FMA_TILES = [  # float32 "ieee" (FmaConfig): a few spilled registers at most on sm_90
    (64, 64, 32, 8, 3),
    (128, 64, 16, 8, 3),
    (64, 128, 16, 8, 3),
    (64, 64, 16, 4, 3),
    (16, 64, 16, 4, 3),  # decode
]
_WEIGHT_GRAD_TILES = [  # output tile BLOCK_K x BLOCK_N, reduction over a group's rows by BLOCK_M
    (64, 128, 128, 4, 3),
    (64, 128, 128, 8, 4),
    (64, 256, 128, 8, 3),
    (64, 128, 64, 4, 4),
    (32, 128, 128, 4, 4),
    (32, 128, 128, 8, 3),
]
_WEIGHT_GRAD_FMA_TILES = [  # float32 "ieee" (FmaConfig), rows read in place and scaled too
    (32, 64, 64, 8, 3),
    (16, 128, 64, 8, 3),
    (16, 64, 128, 8, 3),
    (16, 64, 64, 4, 3),
]
_AUTOTUNE_KEY = ["N", "K", "rows_bucket", "INPUT_PRECISION"]
# Shared memory of one pipeline stage: the x and w tiles, or the x^T and dy tiles.
FORWARD_PRUNE = SharedMemoryPrune(
    "x_ptr", lambda m: m["BLOCK_K"] * (m["BLOCK_M"] + m["BLOCK_N"])
)
_WEIGHT_GRAD_PRUNE = SharedMemoryPrune(
    "x_ptr", lambda m: m["BLOCK_M"] * (m["BLOCK_K"] + m["BLOCK_N"])
)


@triton.jit
def _group_output_tile(
    x_ptr,
    w_ptr,
    y_ptr,
    row_start,
    row_end,
    m_tile,
    n_tile,
    k_end,
    N,
    stride_xs,
    stride_xk,
    stride_wk,
    stride_wn,
    stride_ys,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) output tile of one group: y[rows, cols] = x[rows, :k_end] @
    w_e[:k_end, cols], rows counted from row_start and stopping at row_end, w_ptr pointing at
    the group's (K, N) matrix. k_end = 0 stores a zero tile."""
    rows = row_start + m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < row_end
    col_mask = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = accumulate_product(
        acc,
        x_ptr,
        rows,
        row_mask,
        stride_xs,
        stride_xk,
        w_ptr,
        cols,
        col_mask,
        stride_wk,
        stride_wn,
        0,
        k_end,
        BLOCK_K,
        INPUT_PRECISION,
        DOT_IN_FP32,
    )
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ys + cols.to(tl.int64)[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.autotune(
    configs=tile_configs(FORWARD_TILES, fma_tiles=FORWARD_FMA_TILES),
    key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": FORWARD_PRUNE},
)
@triton.jit
def _grouped_mm_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    offs_ptr,
    S,
    N,
    K,
    E,
    rows_bucket,
    stride_xs,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    stride_ys,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """Persistent walk over groups 0..E-1 and the zero tail group E (rows offs[E-1]..S).

    The output tiles of all groups are numbered in group order, row tiles outer and column
    tiles inner; program p computes tiles p, p + num_programs, ...
    """
    tile = tl.program_id(0)
    num_programs = tl.num_programs(0)
    n_tiles = tl.cdiv(N, BLOCK_N)
    tiles_before = 0  # tiles of the groups already walked
    row_start = 0
    w_group_ptr = w_ptr  # the group's (K, N) matrix
    for group in range(0, E + 1):
        is_expert = group < E
        row_end = group_end(offs_ptr, group, E, row_start, S)
        group_tiles = tl.cdiv(row_end - row_start, BLOCK_M) * n_tiles
        k_end = tl.where(is_expert, K, 0)  # the tail group reduces over nothing: zeros
        while tile < tiles_before + group_tiles:
            local = tile - tiles_before
            _group_output_tile(
                x_ptr,
                w_group_ptr,
                y_ptr,
                row_start,
                row_end,
                local // n_tiles,
                local % n_tiles,
                k_end,
                N,
                stride_xs,
                stride_xk,
                stride_wk,
                stride_wn,
                stride_ys,
                stride_yn,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                INPUT_PRECISION,
                DOT_IN_FP32,
            )
            tile += num_programs
        tiles_before += group_tiles
        row_start = row_end
        w_group_ptr += stride_we


@triton.jit
def _accumulate_row_products(
    acc,
    x_ptr,
    x_rows_ptr,
    ks,
    k_mask,
    stride_xs,
    stride_xk,
    dy_ptr,
    dy_rows_ptr,
    dy_scale_ptr,
    ns,
    n_mask,
    stride_dys,
    stride_dyn,
    row_start,
    row_end,
    GATHER_X: tl.constexpr,
    GATHER_DY: tl.constexpr,
    SCALE_DY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """acc += Σ_r X[r, ks]ᵀ DY[r, ns] over the rows r in [row_start, row_end), BLOCK_M at a time:
    X[r] = x[x_rows[r]] when GATHER_X (else x[r]), DY[r] = dy[dy_rows[r]] when GATHER_DY, times
    dy_scale[r] rounded to dy's dtype when SCALE_DY."""
    for block_start in range(row_start, row_end, BLOCK_M):
        rows = block_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        x_src = rows
        if GATHER_X:
            x_src = tl.load(x_rows_ptr + rows, mask=row_mask, other=0)
        dy_src = rows
        if GATHER_DY:
            dy_src = tl.load(dy_rows_ptr + rows, mask=row_mask, other=0)
        a_ptrs = x_ptr + x_src.to(tl.int64)[None, :] * stride_xs + ks.to(tl.int64)[:, None] * stride_xk
        b_ptrs = dy_ptr + dy_src.to(tl.int64)[:, None] * stride_dys + ns.to(tl.int64)[None, :] * stride_dyn
        a = tl.load(a_ptrs, mask=k_mask[:, None] & row_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        if SCALE_DY:
            scale = tl.load(dy_scale_ptr + rows, mask=row_mask, other=0.0)
            b = (b.to(tl.float32) * scale[:, None]).to(dy_ptr.dtype.element_ty)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.autotune(
    configs=tile_configs(_WEIGHT_GRAD_TILES, fma_tiles=_WEIGHT_GRAD_FMA_TILES),
    key=_AUTOTUNE_KEY + ["GATHER_X", "GATHER_DY", "SCALE_DY"],
    prune_configs_by={"early_config_prune": _WEIGHT_GRAD_PRUNE},
)
@triton.jit
def _grouped_mm_weight_grad_kernel(
    x_ptr,
    dy_ptr,
    dw_ptr,
    offs_ptr,
    x_rows_ptr,
    dy_rows_ptr,
    dy_scale_ptr,
    S,
    N,
    K,
    E,
    rows_bucket,
    stride_xs,
    stride_xk,
    stride_dys,
    stride_dyn,
    stride_dwe,
    stride_dwk,
    stride_dwn,
    GATHER_X: tl.constexpr,
    GATHER_DY: tl.constexpr,
    SCALE_DY: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """Program (e, k tile, n tile): dw[e, ks, ns] = X[rows_e, ks]^T @ DY[rows_e, ns], reducing
    over the group's rows BLOCK_M at a time; an empty group stores zeros."""
    group = tl.program_id(0)
    row_start = tl.minimum(tl.maximum(tl.load(offs_ptr + group - 1, mask=group > 0, other=0), 0), S)
    row_end = group_end(offs_ptr, group, E, row_start, S)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask = ks < K
    n_mask = ns < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    acc = _accumulate_row_products(
        acc,
        x_ptr,
        x_rows_ptr,
        ks,
        k_mask,
        stride_xs,
        stride_xk,
        dy_ptr,
        dy_rows_ptr,
        dy_scale_ptr,
        ns,
        n_mask,
        stride_dys,
        stride_dyn,
        row_start,
        row_end,
        GATHER_X,
        GATHER_DY,
        SCALE_DY,
        BLOCK_M,
        INPUT_PRECISION,
        DOT_IN_FP32,
    )
    dw_ptrs = (
        dw_ptr
        + group.to(tl.int64) * stride_dwe
        + ks.to(tl.int64)[:, None] * stride_dwk
        + ns.to(tl.int64)[None, :] * stride_dwn
    )
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=k_mask[:, None] & n_mask[None, :])


@on_tensor_device
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """y[r] = x[r] @ w[e] for the rows r of group e; the kernel zeroes rows at or past offs[-1].

    x (S, K), w (E, K, N), offs (E,) int32 cumulative end rows, validated by the op, any
    strides (offs read as a contiguous copy where it is a strided view) -> y (S, N) in x's
    dtype, accumulated in float32.
    """
    S, K = x.shape
    E, _, N = w.shape
    y = torch.empty((S, N), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    _grouped_mm_kernel[persistent_grid(S, E, N, x.device)](
        x, w, y, offs.contiguous(), S, N, K, E, rows_bucket(S, E),
        *x.stride(), *w.stride(), *y.stride(), **dot_options(x.dtype),
    )
    return y


@on_tensor_device
def grouped_mm_weight_grad(
    x: torch.Tensor,
    dy: torch.Tensor,
    offs: torch.Tensor,
    x_rows: torch.Tensor | None = None,
    dy_rows: torch.Tensor | None = None,
    dy_scale: torch.Tensor | None = None,
    transposed: bool = False,
) -> torch.Tensor:
    """dw[e] = X[rows of e]^T @ DY[rows of e], zero for an empty group, where X[r] =
    x[x_rows[r]] and DY[r] = dy_scale[r]·dy[dy_rows[r]] (rounded to dy's dtype), each the
    identity when None: the gathered rows are read in place, never copied.

    x (K columns), dy (N columns), the S rows indexed by x_rows / dy_rows (S,) int64, dy_scale
    (S,) float32, offs (E,) int32, validated by the op, any strides (the 1-D ones read as
    contiguous copies where they are strided views) -> dw (E, K, N) in x's dtype, accumulated
    in float32; contiguous, or with the strides of a contiguous (E, N, K) when ``transposed``
    (the kernel stores through dw's strides: the same values either way).
    """
    K = x.shape[1]
    N = dy.shape[1]
    E = offs.shape[0]
    S = (x if x_rows is None else x_rows).shape[0]
    dw = empty_weight_grad(x, E, K, N, transposed)
    if dw.numel() == 0:
        return dw

    def grid(meta):
        return (E, triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(N, meta["BLOCK_N"]))

    offs = offs.contiguous()
    _grouped_mm_weight_grad_kernel[grid](
        x, dy, dw, offs,
        offs if x_rows is None else x_rows.contiguous(),  # never read unless GATHER_X, and so on
        offs if dy_rows is None else dy_rows.contiguous(),
        offs if dy_scale is None else dy_scale.contiguous(),
        S, N, K, E, rows_bucket(S, E), *x.stride(), *dy.stride(), *dw.stride(),
        GATHER_X=x_rows is not None, GATHER_DY=dy_rows is not None, SCALE_DY=dy_scale is not None,
        **dot_options(x.dtype),
    )
    return dw
