"""Triton gated residue block (``neutral_residue``): two fused kernels forward, one backward.

Forward (the formula is in :mod:`modekernels.reference.neutral_residue`):

1. ``_project_kernel``: x·[W_in; W_glu; w_gate]ᵀ, the weights logically concatenated (read in
   place, no copy). Program (m, 0) computes the gate of its BLOCK_M rows (a tl.dot against
   w_gate padded to 16 columns, then relu or sigmoid); program (m, n ≥ 1) computes the u and v
   column tiles n-1 of the same rows from one load of each x tile, with bias, activation and
   GLU in its epilogue, storing h (and, for the backward, pre = [u | v]).
2. ``_output_kernel``: a = h·W_outᵀ + b_out, then y = residual + g·a (y = residual exactly where
   g == 0), and each program's share of the row's ‖g·a‖₁, written to its own slot of a
   (D / OUT_BLOCK_N, T) partial buffer that a fixed-order sum reduces: deterministic.

Both kernels take their rows through a device-side row list and count. Dense: every row.
Gate-sparse: the gate programs run first over every row, ``_compact`` lists the rows with
g != 0 on the device (cumsum + scatter, no host sync, grid bounded by T), and both adapter
passes run over that list only, programs past the count exiting at once. Both modes run the
same compiled kernels with the same tiles, and the gate's K step is fixed (``_GATE_BLOCK_K``,
not the tuned BLOCK_K, so the untuned gate-only launch sums g in the fused launch's order),
so each computed row is bit-identical.

Backward: torch GEMMs (cuBLAS, already optimal for these shapes) composed by
:func:`modekernels.reference.neutral_residue.neutral_residue_backward`, around one fused Triton
kernel of :mod:`modekernels.triton_kernels.glu_backward`, which recomputes h from pre and
produces g·h, du, dv and the gate's dz (its row dot product owned by one program:
deterministic) in one pass.

Under the Triton interpreter one small tile configuration runs and half-precision tiles are
widened to float32 before ``tl.dot`` (triton-lang/triton#11584).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from modekernels.reference import neutral_residue as reference
from modekernels.kernel_codes import ACTIVATION_CODES, GATE_CODES
from modekernels.triton_kernels.common import (
    INTERPRETING,
    SharedMemoryPrune,
    accumulate_product,
    activate,
    dot_options,
    on_tensor_device,
    tile_configs,
)
from modekernels.triton_kernels.glu_backward import glu_backward

_GATE_COLUMNS = tl.constexpr(16)  # w_gate padded to the narrowest tl.dot operand
# The gate's K step, the same in every launch whatever the tuned BLOCK_K: g's float32 sum over
# d is then formed in one order (K tiles in turn into one accumulator, each tile a tl.dot of
# the same shape and operand dtypes), so the gate-only launch of gate-sparse mode and the
# fused dense launch give the same bits, and the same rows g == 0. The smallest tuned BLOCK_K,
# so the gate's tiles stay within what _PROJECT_PRUNE counts for the u/v tiles.
_GATE_BLOCK_K = tl.constexpr(32)
# Fixed, not tuned: the row list places each row at its own slot of a BLOCK_M tile (so dense and
# sparse launches compute every row at the same tile position), and kernel 2's column tile
# sets the number of ℓ1 partials the host allocates.
_BLOCK_M = 16 if INTERPRETING else 64
_OUT_BLOCK_N = 32 if INTERPRETING else 128

# Tuned per kernel: (BLOCK_N, BLOCK_K, num_warps, num_stages); configurations whose pipelined
# tiles overflow shared memory (wide fp32 tiles) are pruned before compiling.
_PROJECT_TILES = [(64, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 4), (128, 64, 4, 3), (64, 32, 4, 4)]
_OUTPUT_TILES = [
    (_OUT_BLOCK_N, 64, 8, 3),
    (_OUT_BLOCK_N, 32, 4, 4),
    (_OUT_BLOCK_N, 64, 4, 4),
    (_OUT_BLOCK_N, 128, 8, 3),
]
# float32 "ieee" (FmaConfig): a few spilled registers at most on sm_90
_PROJECT_FMA_TILES = [(64, 32, 8, 3), (32, 32, 8, 3)]
_OUTPUT_FMA_TILES = [(_OUT_BLOCK_N, 16, 8, 3), (_OUT_BLOCK_N, 32, 8, 3)]
# Shared memory of one pipeline stage: the x tile and the W_in (and W_glu) tiles; h and W_out.
_PROJECT_PRUNE = SharedMemoryPrune(
    "x_ptr", lambda m: m["BLOCK_K"] * (m["BLOCK_M"] + m["BLOCK_N"] * (2 if m["GLU"] else 1))
)
_OUTPUT_PRUNE = SharedMemoryPrune("h_ptr", lambda m: m["BLOCK_K"] * (m["BLOCK_M"] + m["BLOCK_N"]))


@triton.jit
def _apply_gate(z, GATE: tl.constexpr):
    if GATE == 1:
        z = tl.maximum(z, 0.0)
    else:
        z = 1.0 / (1.0 + tl.exp(-z))
    return z


@triton.jit
def _row_tile(rows_ptr, count_ptr, m_tile, BLOCK_M: tl.constexpr):
    """(positions in the row list, which hold a row, the x rows they name) of row tile m_tile;
    positions past the list's count, or holding -1, hold no row."""
    count = tl.load(count_ptr)
    pos = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(rows_ptr + pos, mask=pos < count, other=-1)
    valid = rows >= 0
    rows = tl.where(valid, rows, 0)
    return pos, valid, rows


@triton.autotune(
    configs=tile_configs(_PROJECT_TILES, names=("BLOCK_N", "BLOCK_K"), fma_tiles=_PROJECT_FMA_TILES),
    key=["D", "DA", "GLU", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _PROJECT_PRUNE},
)
@triton.jit(do_not_specialize=["first_program"])
def _project_kernel(
    x_ptr, rows_ptr, count_ptr,
    w_in_ptr, b_in_ptr, w_glu_ptr, b_glu_ptr, w_gate_ptr, b_gate_ptr,
    h_ptr, pre_ptr, g_ptr,
    D, DA, first_program,
    stride_xt, stride_xd,
    stride_wi_a, stride_wi_d, stride_wv_a, stride_wv_d, stride_wg,
    stride_ht, stride_ha, stride_pt, stride_pa,
    HAS_B_IN: tl.constexpr, GLU: tl.constexpr, HAS_B_GLU: tl.constexpr,
    GATE: tl.constexpr, HAS_B_GATE: tl.constexpr, ACTIVATION: tl.constexpr,
    KEEP_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    """Program (m, n): row tile m of the row list; n + first_program = 0 the gate (g stored
    by x row), ≥ 1 the u/v column tile n + first_program - 1 (pre stored by x row, h by
    position in the row list)."""
    m_tile = tl.program_id(0)
    n_tile = tl.program_id(1) + first_program
    pos, valid, rows = _row_tile(rows_ptr, count_ptr, m_tile, BLOCK_M)
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        if n_tile == 0:
            # w_gate (D,) as a (D, 16) operand whose columns past the first read as zero
            gcols = tl.arange(0, _GATE_COLUMNS)
            acc_g = tl.zeros((BLOCK_M, _GATE_COLUMNS), dtype=tl.float32)
            acc_g = accumulate_product(
                acc_g, x_ptr, rows, valid, stride_xt, stride_xd,
                w_gate_ptr, gcols, gcols == 0, stride_wg, 0,
                0, D, _GATE_BLOCK_K, INPUT_PRECISION, DOT_IN_FP32,
            )
            z = tl.sum(tl.where(gcols[None, :] == 0, acc_g, 0.0), axis=1)
            if HAS_B_GATE:
                z += tl.load(b_gate_ptr).to(tl.float32)
            tl.store(g_ptr + rows, _apply_gate(z, GATE), mask=valid)
        else:
            # one load of each x tile feeds both products, so not accumulate_product's loop
            ks = tl.arange(0, BLOCK_K)
            x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xt + ks[None, :] * stride_xd
            cols = (n_tile - 1) * BLOCK_N + tl.arange(0, BLOCK_N)
            c_mask = cols < DA
            wi_ptrs = w_in_ptr + ks[:, None] * stride_wi_d + cols.to(tl.int64)[None, :] * stride_wi_a
            wv_ptrs = w_glu_ptr + ks[:, None] * stride_wv_d + cols.to(tl.int64)[None, :] * stride_wv_a
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_v = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                k_mask = (k0 + ks) < D
                w_mask = k_mask[:, None] & c_mask[None, :]
                xt = tl.load(x_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
                wi = tl.load(wi_ptrs, mask=w_mask, other=0.0)
                if DOT_IN_FP32:
                    xt = xt.to(tl.float32)
                    wi = wi.to(tl.float32)
                acc_u = tl.dot(xt, wi, acc_u, input_precision=INPUT_PRECISION)
                if GLU:
                    wv = tl.load(wv_ptrs, mask=w_mask, other=0.0)
                    if DOT_IN_FP32:
                        wv = wv.to(tl.float32)
                    acc_v = tl.dot(xt, wv, acc_v, input_precision=INPUT_PRECISION)
                    wv_ptrs += BLOCK_K * stride_wv_d
                x_ptrs += BLOCK_K * stride_xd
                wi_ptrs += BLOCK_K * stride_wi_d
            if HAS_B_IN:
                acc_u += tl.load(b_in_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
            h = activate(acc_u, ACTIVATION)
            if GLU:
                if HAS_B_GLU:
                    acc_v += tl.load(b_glu_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)[
                        None, :
                    ]
                h = h * acc_v
            out_mask = valid[:, None] & c_mask[None, :]
            h_ptrs = h_ptr + pos.to(tl.int64)[:, None] * stride_ht + cols.to(tl.int64)[None, :] * stride_ha
            tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=out_mask)
            if KEEP_PRE:
                p_ptrs = pre_ptr + rows.to(tl.int64)[:, None] * stride_pt + cols.to(tl.int64)[None, :] * stride_pa
                tl.store(p_ptrs, acc_u.to(pre_ptr.dtype.element_ty), mask=out_mask)
                if GLU:
                    tl.store(
                        p_ptrs + DA * stride_pa,
                        acc_v.to(pre_ptr.dtype.element_ty),
                        mask=out_mask,
                    )


# The gate-only launch of gate-sparse mode (a (T, D)·(D, 16) product, bound by reading x): the
# same kernel, untuned, in the first configuration (its gate steps by _GATE_BLOCK_K like the
# tuned launches'). Tuning it would hand the adapter launches, which share its autotune key, a
# configuration timed on the gate alone.
_project_gate_kernel = _project_kernel.fn
# It fixes the switches that only the u/v tiles read, so that one compilation serves them all.
_GATE_ONLY_CONFIG = tile_configs(_PROJECT_TILES, names=("BLOCK_N", "BLOCK_K"))[0]
_GATE_ONLY_SWITCHES = dict(
    HAS_B_IN=False, GLU=False, HAS_B_GLU=False, ACTIVATION=ACTIVATION_CODES["identity"], KEEP_PRE=False
)


@triton.autotune(
    configs=tile_configs(_OUTPUT_TILES, names=("BLOCK_N", "BLOCK_K"), fma_tiles=_OUTPUT_FMA_TILES),
    key=["D", "DA", "INPUT_PRECISION"],
    prune_configs_by={"early_config_prune": _OUTPUT_PRUNE},
)
@triton.jit
def _output_kernel(
    h_ptr, rows_ptr, count_ptr, g_ptr, w_out_ptr, b_out_ptr, r_ptr, y_ptr, l1_ptr,
    T, D, DA,
    stride_ht, stride_ha, stride_wo_d, stride_wo_a, stride_rt, stride_rd, stride_yt, stride_yd,
    HAS_B_OUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, GATED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    """Program (m, n): y[rows, cols] = r + g·(h[pos]·W_out[cols]ᵀ + b_out[cols]) for row tile m
    and column tile n; l1[n, rows] = Σ_cols |g·a|."""
    m_tile = tl.program_id(0)
    n_tile = tl.program_id(1)
    pos, valid, rows = _row_tile(rows_ptr, count_ptr, m_tile, BLOCK_M)
    if tl.max(valid.to(tl.int32), axis=0) > 0:
        cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        c_mask = cols < D
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = accumulate_product(
            acc, h_ptr, pos, valid, stride_ht, stride_ha,
            w_out_ptr, cols, c_mask, stride_wo_a, stride_wo_d,
            0, DA, BLOCK_K, INPUT_PRECISION, DOT_IN_FP32,
        )
        if HAS_B_OUT:
            acc += tl.load(b_out_ptr + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        y_a = acc
        if GATED:
            g = tl.load(g_ptr + rows, mask=valid, other=0.0)
            off = (g == 0.0)[:, None]
            y_a = tl.where(off, 0.0, g[:, None] * acc)
        y_a = tl.where(c_mask[None, :], y_a, 0.0)
        out_mask = valid[:, None] & c_mask[None, :]
        y = y_a
        if HAS_RESIDUAL:
            r_ptrs = r_ptr + rows.to(tl.int64)[:, None] * stride_rt + cols.to(tl.int64)[None, :] * stride_rd
            r = tl.load(r_ptrs, mask=out_mask, other=0.0).to(tl.float32)
            y = r + y_a
            if GATED:
                y = tl.where(off, r, y)
        y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_yt + cols.to(tl.int64)[None, :] * stride_yd
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=out_mask)
        tl.store(l1_ptr + n_tile.to(tl.int64) * T + rows, tl.sum(tl.abs(y_a), axis=1), mask=valid)


def _all_rows(T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense row list: (arange(T) int32, its count (1,) int32); row r sits at position r."""
    return (
        torch.arange(T, dtype=torch.int32, device=device),
        torch.full((1,), T, dtype=torch.int32, device=device),
    )


def _compact(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The row list of the rows with g != 0, built on the device (no host sync).

    Row r keeps its slot r % BLOCK_M within a tile, as in the dense list: the k-th active row
    of slot s goes to position k·BLOCK_M + s, empty positions hold -1, and the count is
    BLOCK_M × the most active rows of any slot. Every row is so computed at the same tile
    position as in the dense launch (bit-identical results whatever the GEMM's reduction
    order per position); with random gates the tiles are nearly as few as a full compaction's.
    Returns (rows (tiles·BLOCK_M + 1,) int32, count (1,) int32).
    """
    T = g.shape[0]
    n = triton.cdiv(T, _BLOCK_M) * _BLOCK_M
    active = torch.zeros(n, dtype=torch.int32, device=g.device)
    active[:T] = g != 0
    active = active.view(-1, _BLOCK_M)
    rank = torch.cumsum(active, dim=0, dtype=torch.int32) - 1  # among the slot's active rows
    slot = torch.arange(_BLOCK_M, dtype=torch.int32, device=g.device)
    position = torch.where(active.bool(), rank * _BLOCK_M + slot, n)  # n: a spare, never read
    rows = torch.full((n + 1,), -1, dtype=torch.int32, device=g.device)
    rows.scatter_(0, position.flatten().long(), torch.arange(n, dtype=torch.int32, device=g.device))
    count = (rank[-1].amax(dim=0, keepdim=True) + 1) * _BLOCK_M
    return rows, count


@on_tensor_device
def neutral_residue(
    x, w_in, w_glu, w_out, w_gate, b_gate, b_in, b_glu, b_out, residual, activation, gate,
    sparse, keep_pre,
):
    """The forward of the op (arguments validated by the op): (y, g, l1, pre); see the module
    docstring for the kernels and the gate-sparse path. The kernels read the bias vectors with
    unit stride: strided views are copied first."""
    T, D = x.shape
    DA = w_in.shape[0]
    glu = w_glu is not None
    gated = w_gate is not None
    n_pre = DA * (2 if glu else 1)
    device = x.device
    pre = x.new_empty(T if keep_pre else 0, n_pre)
    if T == 0:
        empty = x.new_empty(0, dtype=torch.float32)
        return x.new_empty(0, D), empty, empty.clone(), pre
    if sparse and keep_pre:
        pre.zero_()  # skipped rows: h = act(0)⊙0 = 0 in the backward, whose terms g = 0 zeroes
    g = torch.empty(T, dtype=torch.float32, device=device) if gated else x.new_ones(
        T, dtype=torch.float32
    )
    h = x.new_empty(triton.cdiv(T, _BLOCK_M) * _BLOCK_M, DA)  # by position in the row list
    dot = dot_options(x.dtype)
    some = x  # a placeholder pointer for absent optional tensors
    project_args = dict(
        w_in_ptr=w_in,
        b_in_ptr=some if b_in is None else b_in.contiguous(),
        w_glu_ptr=w_in if w_glu is None else w_glu,
        b_glu_ptr=some if b_glu is None else b_glu.contiguous(),
        w_gate_ptr=some if w_gate is None else w_gate,
        b_gate_ptr=some if b_gate is None else b_gate,
        h_ptr=h,
        pre_ptr=pre if keep_pre else h,
        g_ptr=g,
        D=D,
        DA=DA,
        stride_xt=x.stride(0),
        stride_xd=x.stride(1),
        stride_wi_a=w_in.stride(0),
        stride_wi_d=w_in.stride(1),
        stride_wv_a=(w_in if w_glu is None else w_glu).stride(0),
        stride_wv_d=(w_in if w_glu is None else w_glu).stride(1),
        stride_wg=0 if w_gate is None else w_gate.stride(0),
        stride_ht=h.stride(0),
        stride_ha=h.stride(1),
        stride_pt=n_pre,
        stride_pa=1,
        HAS_B_IN=b_in is not None,
        GLU=glu,
        HAS_B_GLU=b_glu is not None,
        GATE=GATE_CODES[gate],
        HAS_B_GATE=b_gate is not None,
        ACTIVATION=ACTIVATION_CODES[activation],
        KEEP_PRE=keep_pre,
        **dot,
    )

    def project(rows, count, gate_programs: bool, adapter_programs: bool):
        def grid(meta):
            n = int(gate_programs) + (triton.cdiv(DA, meta["BLOCK_N"]) if adapter_programs else 0)
            return (triton.cdiv(T, _BLOCK_M), n)

        first_program = 0 if gate_programs else 1
        if adapter_programs:
            _project_kernel[grid](
                x, rows, count, first_program=first_program, BLOCK_M=_BLOCK_M, **project_args
            )
        else:
            config = _GATE_ONLY_CONFIG
            _project_gate_kernel[grid](
                x, rows, count, first_program=first_program, BLOCK_M=_BLOCK_M,
                **{**project_args, **_GATE_ONLY_SWITCHES}, **config.kwargs,
                num_warps=config.num_warps, num_stages=config.num_stages,
            )

    rows, count = _all_rows(T, device)
    sparse = sparse and gated
    if sparse:
        project(rows, count, True, False)
        rows, count = _compact(g)
        project(rows, count, False, True)
    else:
        project(rows, count, gated, True)
    n_col_tiles = triton.cdiv(D, _OUT_BLOCK_N)
    if sparse:
        y = x.new_zeros(T, D) if residual is None else residual.clone(
            memory_format=torch.contiguous_format
        )
        l1_parts = torch.zeros(n_col_tiles, T, dtype=torch.float32, device=device)
    else:
        y = x.new_empty(T, D)
        l1_parts = torch.empty(n_col_tiles, T, dtype=torch.float32, device=device)
    _output_kernel[(triton.cdiv(T, _BLOCK_M), n_col_tiles)](
        h, rows, count, g, w_out, some if b_out is None else b_out.contiguous(),
        some if residual is None else residual, y, l1_parts,
        T, D, DA,
        *h.stride(), *w_out.stride(),
        *((0, 0) if residual is None else residual.stride()), *y.stride(),
        HAS_B_OUT=b_out is not None, HAS_RESIDUAL=residual is not None, GATED=gated,
        BLOCK_M=_BLOCK_M, **dot,
    )
    return y, g, l1_parts.sum(dim=0), pre


def _glu_backward(pre, dh_raw, g, dgate_extra, activation, glu, gate):
    """:func:`modekernels.reference.neutral_residue.glu_backward` as one fused kernel."""
    return glu_backward(
        pre, dh_raw, activation, glu, row_gate=g, gate=gate, gate_extra=dgate_extra, with_gh=True
    )


def neutral_residue_backward(
    dy, dg, dl1, x, w_in, w_glu, w_out, w_gate, b_out, g, pre, activation, gate
):
    """The backward of the op: torch GEMMs composed by the reference backward around the fused
    elementwise kernel (:func:`modekernels.triton_kernels.glu_backward.glu_backward`)."""
    return reference.neutral_residue_backward(
        dy, dg, dl1, x, w_in, w_glu, w_out, w_gate, b_out, g, pre, activation, gate,
        elementwise=_glu_backward,
    )
