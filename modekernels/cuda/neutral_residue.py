"""``cuda`` backend of the gated residue block (``neutral_residue``): the cuda grouped GEMM with
one group (:mod:`modekernels.cuda.grouped_mm`) around the kernels of ``csrc/neutral_residue.cu``.
The formula is in :mod:`modekernels.reference.neutral_residue`.

Forward:

1. g = gate(x·w_gate + b_gate): one warp per row, a fixed-order dot product (ones for "none").
2. pre = x·[W_in; W_glu]ᵀ: one GEMM. The grouped GEMM takes one weight operand, so with GLU
   W_in and W_glu are copied into one (2·d_a, d) buffer each call (2·d_a·d elements, less than
   the (T, 2·d_a) concatenation that two GEMMs would need); without GLU, W_inᵀ is read in place.
3. An epilogue kernel adds b_in / b_glu (in place, so pre is the op's kept pre-activations) and
   writes h = act(u) ⊙ v.
4. a = h·W_outᵀ (W_outᵀ read in place), then an epilogue kernel: y = residual + g·(a + b_out),
   exactly the residual where g == 0, and each row's ℓ1 as a fixed-order block sum. a (T, d)
   makes a round trip through memory between the two: fusing them needs a GEMM with this
   epilogue, a new CUDA kernel.

The GEMMs round pre and a to x's dtype before the biases are added (the triton path adds them
to its float32 accumulators).

Gate-sparse mode (with a gate): the rows with g != 0 are listed first, in token order, by the
stable counting sort of :func:`modekernels.cuda.routing.sort_by_expert` with two classes (on,
off), whose first offset is their count: a device tensor, so no host sync. x's rows are
gathered in that order and both GEMMs run as one group ending at that count, so the rows gated
off are never multiplied (the grouped GEMM writes them as zeros, the project epilogue skips
their activation); a, and pre when kept, are then scattered back to token order, and the output
epilogue gives y = residual, ℓ1 = 0 where g == 0. A GEMM's output row depends only on its own
input row and on the kernel, and both modes give the GEMMs operands of the same layout and
alignment (:func:`_gemm_rows`), so the kernel family is the same: y, g, ℓ1 and the active rows
of pre are bit-identical to the dense path. A gated-off row of pre holds only the biases, which
the backward multiplies by g = 0. The cost beyond the active rows' GEMMs: the sort, the (T, d)
gather of x and the scatter of a (and of pre).

Backward: as the triton backend, the reference composition (torch GEMMs) around one fused
elementwise kernel (``glu_backward_kernel``: g·h, du, dv and the gate's dz, its row sum a
fixed-order block sum).
"""

from __future__ import annotations

import torch

from modekernels import _C
from modekernels.cuda import current_stream
from modekernels.cuda.grouped_mm import _ALIGNMENT_BYTES, _DTYPE_CODES, grouped_mm
from modekernels.cuda.routing import sort_by_expert
from modekernels.kernel_codes import ACTIVATION_CODES, GATE_CODES
from modekernels.reference import neutral_residue as reference


def _pointer(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _gemm_rows(x: torch.Tensor) -> torch.Tensor:
    """x (T, d) as the first GEMM's rows: x itself when it is contiguous and 16-byte aligned,
    else an (aligned) contiguous copy, like the rows gate-sparse mode gathers, so that both
    modes run the grouped GEMM's kernel family for aligned rows."""
    if x.stride() == (x.shape[1], 1) and x.data_ptr() % _ALIGNMENT_BYTES == 0:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _active_rows_first(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm (T,) int64: the rows with g != 0 in order, then the others in order; count (1,)
    int32: how many rows have g != 0), on the device."""
    perm, offs = sort_by_expert((g == 0).to(torch.int32), 2)
    return perm, offs[:1]


def _gathered_rows(x: torch.Tensor, perm: torch.Tensor, stream: int) -> torch.Tensor:
    """(T, d) contiguous: row r is x[perm[r]]."""
    rows = torch.empty(perm.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    _C.gather_rows(
        x=x.data_ptr(), T=x.shape[0], K=x.shape[1], x_stride_t=x.stride(0),
        x_stride_k=x.stride(1), perm=perm.data_ptr(), S=perm.shape[0], top_k=1,
        dst=rows.data_ptr(), element_bytes=x.element_size(), stream=stream,
    )
    return rows


def _token_order(sorted_rows: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The rows listed in perm's order put back in token order: out[perm[r]] = sorted_rows[r]."""
    return torch.empty_like(sorted_rows).index_copy_(0, perm, sorted_rows)


def _gate(x, w_gate, b_gate, gate, stream) -> torch.Tensor:
    """g (T,) float32 = gate(x·w_gate + b_gate)."""
    T, d = x.shape
    g = torch.empty(T, dtype=torch.float32, device=x.device)
    _C.neutral_residue_gate(
        x=x.data_ptr(), T=T, d=d, x_stride_t=x.stride(0), x_stride_d=x.stride(1),
        w_gate=w_gate.data_ptr(), w_gate_stride=w_gate.stride(0), b_gate=_pointer(b_gate),
        gate=GATE_CODES[gate], g=g.data_ptr(), dtype=_DTYPE_CODES[x.dtype], stream=stream,
    )
    return g


def _adapter(rows, count, skip_gate, w_in, w_glu, w_out, b_in, b_glu, activation, keep_pre,
             stream) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre (T, n_pre) biased, a (T, d) = h·W_outᵀ) for the first ``count`` (1,) int32 rows of
    ``rows`` (T, d) contiguous; the rows past it come out as zeros in a. ``skip_gate`` (T,)
    float32 or None: rows where it is 0 get h = 0 without the activation."""
    T = rows.shape[0]
    d_a = w_in.shape[0]
    glu = w_glu is not None
    b_in, b_glu = _contiguous(b_in), _contiguous(b_glu)  # alive until the launch
    w_pre = torch.cat([w_in, w_glu]) if glu else w_in  # (n_pre, d)
    pre = grouped_mm(rows, w_pre.t().unsqueeze(0), count)  # (T, n_pre)
    h = torch.empty(T, d_a, dtype=rows.dtype, device=rows.device)
    _C.neutral_residue_project_epilogue(
        pre=pre.data_ptr(), T=T, d_a=d_a, glu=glu, b_in=_pointer(b_in), b_glu=_pointer(b_glu),
        activation=ACTIVATION_CODES[activation], keep=keep_pre, skip_gate=_pointer(skip_gate),
        h=h.data_ptr(), dtype=_DTYPE_CODES[rows.dtype], stream=stream,
    )
    return pre, grouped_mm(h, w_out.t().unsqueeze(0), count)


def _output(a, g, b_out, residual, stream) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (T, d) = residual + g·(a + b_out), exactly the residual where g == 0; l1 (T,) float32
    = Σ |g·(a + b_out)| per row) for a (T, d) contiguous, g (T,) float32 or None (1)."""
    T, d = a.shape
    b_out = _contiguous(b_out)  # alive until the launch
    y = torch.empty(T, d, dtype=a.dtype, device=a.device)
    l1 = torch.empty(T, dtype=torch.float32, device=a.device)
    _C.neutral_residue_output_epilogue(
        a=a.data_ptr(), T=T, d=d, b_out=_pointer(b_out), g=_pointer(g),
        residual=_pointer(residual),
        residual_stride_t=0 if residual is None else residual.stride(0),
        residual_stride_d=0 if residual is None else residual.stride(1),
        y=y.data_ptr(), l1=l1.data_ptr(), dtype=_DTYPE_CODES[a.dtype], stream=stream,
    )
    return y, l1


def neutral_residue(
    x, w_in, w_glu, w_out, w_gate, b_gate, b_in, b_glu, b_out, residual, activation, gate,
    sparse, keep_pre,
):
    """The forward of the op (arguments validated by the op): (y (T, d), g (T,) float32,
    l1 (T,) float32, pre (T or 0, d_a or 2·d_a)); see the module docstring for gate-sparse
    mode."""
    T, d = x.shape
    n_pre = w_in.shape[0] * (1 if w_glu is None else 2)
    gated = w_gate is not None
    if T == 0:
        empty = x.new_empty(0, dtype=torch.float32)
        return x.new_empty(0, d), empty, empty.clone(), x.new_empty(0, n_pre)
    sparse = sparse and gated
    with torch.cuda.device(x.device):
        stream = current_stream(x.device)
        if gated:
            g = _gate(x, w_gate, b_gate, gate, stream)
        else:
            g = torch.ones(T, dtype=torch.float32, device=x.device)
        if sparse:
            perm, count = _active_rows_first(g)
            rows, skip_gate = _gathered_rows(x, perm, stream), g[perm]
        else:
            rows, skip_gate = _gemm_rows(x), None
            count = torch.full((1,), T, dtype=torch.int32, device=x.device)
        pre, a = _adapter(
            rows, count, skip_gate, w_in, w_glu, w_out, b_in, b_glu, activation, keep_pre, stream
        )
        if sparse:
            a = _token_order(a, perm)
            pre = _token_order(pre, perm) if keep_pre else pre
        y, l1 = _output(a, g if gated else None, b_out, residual, stream)
    return y, g, l1, pre if keep_pre else x.new_empty(0, n_pre)


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
    """(gh, dpre) for pre (T, I or 2·I) and dh (T, I), any strides, in one CUDA pass, as
    :func:`modekernels.triton_kernels.glu_backward.glu_backward`: ``row_gate`` g (T,) scales each
    row (None: 1), ``gate`` ("none", "relu", "sigmoid") adds dz and needs ``gate_extra`` (T,),
    gh = g·h only ``with_gh`` (else None). dpre and gh contiguous in pre's dtype."""
    T = pre.shape[0]
    d_a = dh.shape[1]
    gh = pre.new_empty(T, d_a) if with_gh else None
    dpre = pre.new_empty(T, pre.shape[1] + int(gate != "none"))
    if T == 0:
        return gh, dpre
    g = None if row_gate is None else row_gate.to(torch.float32).contiguous()
    extra = None if gate_extra is None else gate_extra.to(torch.float32).contiguous()
    with torch.cuda.device(pre.device):
        _C.neutral_residue_glu_backward(
            pre=pre.data_ptr(), pre_stride_t=pre.stride(0), pre_stride_a=pre.stride(1),
            dh=dh.data_ptr(), dh_stride_t=dh.stride(0), dh_stride_a=dh.stride(1),
            g=_pointer(g), extra=_pointer(extra), T=T, d_a=d_a, glu=glu,
            activation=ACTIVATION_CODES[activation], gate=GATE_CODES[gate], gh=_pointer(gh),
            dpre=dpre.data_ptr(), dtype=_DTYPE_CODES[pre.dtype],
            stream=current_stream(pre.device),
        )
    return gh, dpre


def _glu_backward(pre, dh_raw, g, dgate_extra, activation, glu, gate):
    """:func:`modekernels.reference.neutral_residue.glu_backward` as one fused kernel."""
    return glu_backward(
        pre, dh_raw, activation, glu, row_gate=g, gate=gate, gate_extra=dgate_extra, with_gh=True
    )


def neutral_residue_backward(
    dy, dg, dl1, x, w_in, w_glu, w_out, w_gate, b_out, g, pre, activation, gate
):
    """The backward of the op: torch GEMMs composed by the reference backward around the fused
    elementwise kernel."""
    return reference.neutral_residue_backward(
        dy, dg, dl1, x, w_in, w_glu, w_out, w_gate, b_out, g, pre, activation, gate,
        elementwise=_glu_backward,
    )
