"""``cuda`` backend of the gated residue block (``neutral_residue``): the cuda grouped GEMM with
one group of all T rows (:mod:`modekernels.cuda.grouped_mm`) around the kernels of
``csrc/neutral_residue.cu``. The formula is in :mod:`modekernels.reference.neutral_residue`.

Forward:

1. g = gate(x·w_gate + b_gate): one warp per row, a fixed-order dot product (ones for "none").
2. pre = x·[W_in; W_glu]ᵀ: one GEMM over the concatenated weights (a copy of W_in and W_glu
   each call, d_a·d elements each; without GLU, W_inᵀ is read in place).
3. An epilogue kernel adds b_in / b_glu (in place, so pre is the op's kept pre-activations) and
   writes h = act(u) ⊙ v.
4. a = h·W_outᵀ (W_outᵀ read in place), then an epilogue kernel: y = residual + g·(a + b_out),
   exactly the residual where g == 0, and each row's ℓ1 as a fixed-order block sum.

The GEMMs round pre and a to x's dtype before the biases are added (the triton path adds them
to its float32 accumulators).

Gate-sparse mode: both GEMMs still run over every row; only the activation of rows with g == 0
is skipped (their h rows are written as zeros). A GEMM's output row depends only on its own
input row, and a row with g == 0 gets y = residual and ℓ1 = 0 whatever its h, so y, g, ℓ1 and
pre are bit-identical to the dense path. Skipping the GEMM rows themselves would need a row
compaction whose results could differ in the last bit where the grouped GEMM picks another
kernel for the compacted buffer, so it is not done: this mode saves only elementwise work.

Backward: as the triton backend, the reference composition (torch GEMMs) around one fused
elementwise kernel (``glu_backward_kernel``: g·h, du, dv and the gate's dz, its row sum a
fixed-order block sum).
"""

from __future__ import annotations

import torch

from modekernels import _C
from modekernels.cuda import current_stream
from modekernels.cuda.grouped_mm import _DTYPE_CODES, grouped_mm
from modekernels.kernel_codes import ACTIVATION_CODES, GATE_CODES
from modekernels.reference import neutral_residue as reference



def _pointer(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def neutral_residue(
    x, w_in, w_glu, w_out, w_gate, b_gate, b_in, b_glu, b_out, residual, activation, gate,
    sparse, keep_pre,
):
    """The forward of the op (arguments validated by the op): (y (T, d), g (T,) float32,
    l1 (T,) float32, pre (T or 0, d_a or 2·d_a))."""
    T, d = x.shape
    d_a = w_in.shape[0]
    glu = w_glu is not None
    gated = w_gate is not None
    n_pre = d_a * (2 if glu else 1)
    if T == 0:
        empty = x.new_empty(0, dtype=torch.float32)
        return x.new_empty(0, d), empty, empty.clone(), x.new_empty(0, n_pre)
    device = x.device
    dtype = _DTYPE_CODES[x.dtype]
    b_in, b_glu, b_out = _contiguous(b_in), _contiguous(b_glu), _contiguous(b_out)
    with torch.cuda.device(device):
        stream = current_stream(device)
        one_group = torch.full((1,), T, dtype=torch.int32, device=device)
        if gated:
            g = torch.empty(T, dtype=torch.float32, device=device)
            _C.neutral_residue_gate(
                x=x.data_ptr(), T=T, d=d, x_stride_t=x.stride(0), x_stride_d=x.stride(1),
                w_gate=w_gate.data_ptr(), w_gate_stride=w_gate.stride(0),
                b_gate=_pointer(b_gate), gate=GATE_CODES[gate], g=g.data_ptr(), dtype=dtype,
                stream=stream,
            )
        else:
            g = torch.ones(T, dtype=torch.float32, device=device)
        w_pre = torch.cat([w_in, w_glu]) if glu else w_in  # (n_pre, d)
        pre = grouped_mm(x, w_pre.t().unsqueeze(0), one_group)  # (T, n_pre)
        h = torch.empty(T, d_a, dtype=x.dtype, device=device)
        _C.neutral_residue_project_epilogue(
            pre=pre.data_ptr(), T=T, d_a=d_a, glu=glu, b_in=_pointer(b_in),
            b_glu=_pointer(b_glu), activation=ACTIVATION_CODES[activation], keep=keep_pre,
            skip_gate=g.data_ptr() if sparse and gated else 0, h=h.data_ptr(), dtype=dtype,
            stream=stream,
        )
        a = grouped_mm(h, w_out.t().unsqueeze(0), one_group)  # (T, d)
        y = torch.empty(T, d, dtype=x.dtype, device=device)
        l1 = torch.empty(T, dtype=torch.float32, device=device)
        _C.neutral_residue_output_epilogue(
            a=a.data_ptr(), T=T, d=d, b_out=_pointer(b_out), g=g.data_ptr() if gated else 0,
            residual=_pointer(residual),
            residual_stride_t=0 if residual is None else residual.stride(0),
            residual_stride_d=0 if residual is None else residual.stride(1),
            y=y.data_ptr(), l1=l1.data_ptr(), dtype=dtype, stream=stream,
        )
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
