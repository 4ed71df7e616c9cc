"""``grouped_mm``: one GEMM per expert over contiguous row groups, as a differentiable torch op.

Registered as ``torch.ops.modekernels.grouped_mm`` (forward) and
``torch.ops.modekernels.grouped_mm_weight_grad`` (the grouped Xᵀ·dY of the backward), each with a
fake kernel, and the forward with an autograd formula.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from modekernels import backends
from modekernels._checks import (
    FLOAT_DTYPES,
    check_dim,
    check_index_range,
    check_offsets,
    check_tensor,
)
from modekernels.ops import autocast
from modekernels.reference.grouped_mm import empty_weight_grad


def _hopper_kernels_built() -> bool:
    """Whether ``modekernels._C`` imports and holds the Hopper CUTLASS 3 grouped GEMMs."""
    if backends.cuda_extension_error() is not None:
        return False
    from modekernels import _C

    return _C.has_sm90_kernels()


def _fastest_first(device: torch.device, args: Sequence) -> tuple[str, ...]:
    """cuda first where its Hopper CUTLASS 3 kernels (TMA + WGMMA) take the call: sm_90 with an
    extension built with them, float16/bfloat16, K and N multiples of 8 (16-byte rows).
    Elsewhere Triton first: for float32 and odd widths the cuda backend would run its CUDA-core
    kernel, and on other GPUs (or without the sm_90 kernels) its CUTLASS 2.x kernels and Triton
    both use tensor cores (Triton until a measurement says otherwise). args: the forward's
    (x, w, offs) or the weight gradient's (x, dy, offs, ...)."""
    x, other = args[0], args[1]
    hopper = torch.cuda.get_device_capability(device) == (9, 0)
    cutlass = x.dtype in (torch.float16, torch.bfloat16) and x.shape[1] % 8 == 0 and other.shape[-1] % 8 == 0
    if hopper and cutlass and _hopper_kernels_built():
        return backends.CUDA_FIRST
    return backends.TRITON_FIRST


_forward = backends.Dispatch(
    "grouped_mm",
    prefer=_fastest_first,
    reference="modekernels.reference.grouped_mm:grouped_mm",
    triton="modekernels.triton_kernels.grouped_mm:grouped_mm",
    cuda="modekernels.cuda.grouped_mm:grouped_mm",
)
_weight_grad = backends.Dispatch(
    "grouped_mm_weight_grad",
    prefer=_fastest_first,
    reference="modekernels.reference.grouped_mm:grouped_mm_weight_grad",
    triton="modekernels.triton_kernels.grouped_mm:grouped_mm_weight_grad",
    cuda="modekernels.cuda.grouped_mm:grouped_mm_weight_grad",
)


def _check_forward(x: object, w: object, offs: object) -> None:
    check_tensor("x", x, rank=2, dtypes=FLOAT_DTYPES)
    check_tensor("w", w, rank=3, dtypes=(x.dtype,), device=x.device)
    check_dim("w.shape[1]", w.shape[1], x.shape[1], "K, the columns of x")
    check_tensor("offs", offs, rank=1, dtypes=(torch.int32,), device=x.device)
    check_dim("offs.shape[0]", offs.shape[0], w.shape[0], "the number of groups E, w.shape[0]")


def _check_row_index(name: str, rows: object, device: torch.device) -> None:
    if rows is not None:
        check_tensor(name, rows, rank=1, dtypes=(torch.int64,), device=device)


def _check_weight_grad(
    x: object, dy: object, offs: object, x_rows: object, dy_rows: object, dy_scale: object
) -> int:
    """Metadata checks; returns S, the number of (gathered) rows."""
    check_tensor("x", x, rank=2, dtypes=FLOAT_DTYPES)
    check_tensor("dy", dy, rank=2, dtypes=(x.dtype,), device=x.device)
    _check_row_index("x_rows", x_rows, x.device)
    _check_row_index("dy_rows", dy_rows, x.device)
    rows = x.shape[0] if x_rows is None else x_rows.shape[0]
    if dy_rows is None:
        check_dim("dy.shape[0]", dy.shape[0], rows, "S, the rows of x (or the length of x_rows)")
    else:
        check_dim("dy_rows.shape[0]", dy_rows.shape[0], rows, "S, the rows of x (or the length of x_rows)")
    if dy_scale is not None:
        check_tensor("dy_scale", dy_scale, rank=1, dtypes=(torch.float32,), device=x.device)
        check_dim("dy_scale.shape[0]", dy_scale.shape[0], rows, "S, one scale per row")
    check_tensor("offs", offs, rank=1, dtypes=(torch.int32,), device=x.device)
    return rows


@torch.library.custom_op("modekernels::grouped_mm", mutates_args=())
def grouped_mm_op(
    x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, backend: Optional[str] = None
) -> torch.Tensor:
    _check_forward(x, w, offs)
    check_offsets("offs", offs, x.shape[0], "the number of rows S")
    return _forward(backend, x.device, x, w, offs)


@grouped_mm_op.register_fake
def _(x, w, offs, backend=None):
    _check_forward(x, w, offs)
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("modekernels::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad_op(
    x: torch.Tensor,
    dy: torch.Tensor,
    offs: torch.Tensor,
    x_rows: Optional[torch.Tensor] = None,
    dy_rows: Optional[torch.Tensor] = None,
    dy_scale: Optional[torch.Tensor] = None,
    transposed: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """dw[e] = X[rows of e]ᵀ·DY[rows of e] over the S rows grouped by offs (E,) int32, with
    X[r] = x[x_rows[r]] and DY[r] = dy_scale[r]·dy[dy_rows[r]] rounded to dy's dtype; each of
    x_rows, dy_rows (S,) int64 and dy_scale (S,) float32 is the identity when None. The triton
    backend reads the gathered rows in place; reference and cuda gather copies first. The
    backward of ``grouped_mm`` and of ``moe_mlp`` (whose sorted rows index tokens) call it.

    dw is (E, K, N) in x's dtype: contiguous, or when ``transposed`` with the strides of a
    contiguous (E, N, K) tensor (``new_empty(E, N, K).transpose(1, 2)``), the same values, so
    that the gradient of a weight stored in the ``nn.Linear`` layout reaches it without a copy
    (see :func:`is_linear_layout`)."""
    rows = _check_weight_grad(x, dy, offs, x_rows, dy_rows, dy_scale)
    check_offsets("offs", offs, rows, "the number of rows S")
    if x_rows is not None:
        check_index_range("x_rows", x_rows, x.shape[0], "rows of x")
    if dy_rows is not None:
        check_index_range("dy_rows", dy_rows, dy.shape[0], "rows of dy")
    return _weight_grad(backend, x.device, x, dy, offs, x_rows, dy_rows, dy_scale, transposed)


@grouped_mm_weight_grad_op.register_fake
def _(x, dy, offs, x_rows=None, dy_rows=None, dy_scale=None, transposed=False, backend=None):
    _check_weight_grad(x, dy, offs, x_rows, dy_rows, dy_scale)
    return empty_weight_grad(x, offs.shape[0], x.shape[1], dy.shape[1], transposed)


def is_linear_layout(w: torch.Tensor) -> bool:
    """Whether w (E, K, N) is the transposed view of a contiguous (E, N, K) tensor, the
    ``nn.Linear`` layout, and not contiguous itself: its weight gradient is then asked for in
    that layout (``transposed=True``), which autograd accumulates into the (E, N, K) tensor's
    .grad without a copy. Where size-1 or empty dimensions make w both (the two layouts hold
    the same dense memory order) and for any other layout, the contiguous default."""
    return w.transpose(1, 2).is_contiguous() and not w.is_contiguous()


def _setup_context(ctx, inputs, output):
    x, w, offs, backend = inputs
    ctx.backend = backends.backward_request(backend, output)
    ctx.save_for_backward(x, w, offs)


def _backward(ctx, dy):
    x, w, offs = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = grouped_mm_op(dy, w.transpose(1, 2), offs, ctx.backend)
    if ctx.needs_input_grad[1]:
        dw = grouped_mm_weight_grad_op(
            x, dy, offs, transposed=is_linear_layout(w), backend=ctx.backend
        )
    return dx, dw, None, None


grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)
# Like torch._grouped_mm, which autocast leaves alone: both run in their inputs' dtypes.
autocast.register("modekernels::grouped_mm")
autocast.register("modekernels::grouped_mm_weight_grad")


def grouped_mm(
    x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Grouped GEMM over contiguous row groups: ``y[r] = x[r] @ w[e]`` for each row r of group e.

    Args:
        x: (S, K) float32, float16 or bfloat16; any strides.
        w: (E, K, N), same dtype and device. The ``nn.Linear`` layout is accepted without a copy
            as ``w_linear.transpose(1, 2)`` of an (E, N, K) tensor (its gradient is written in
            that layout, so none is made accumulating it into ``w_linear.grad`` either).
        offs: (E,) int32 cumulative end rows of the groups, as ``torch._grouped_mm`` takes them:
            group e holds rows ``offs[e-1]:offs[e]`` (``offs[-1] = 0``); groups may be empty.
        backend: ``"reference"``, ``"triton"``, ``"cuda"`` or None (see
            :mod:`modekernels.backends`).

    Returns:
        y (S, N) in x's dtype, accumulated in float32. Rows at or past ``offs[-1]`` are zero and
        get zero gradient. Differentiable in x (grouped dY·Wᵀ) and w (grouped Xᵀ·dY).

    Like ``torch._grouped_mm``, which ``torch.autocast`` leaves alone, it casts nothing under
    autocast: it runs in its inputs' dtype (float32 stays float32), and they must match.

    Offsets are value-checked (non-decreasing, within S) only for CPU tensors in eager mode; on
    CUDA they stay on the device and are not read by the host.
    """
    _check_forward(x, w, offs)  # before the schema's less specific type errors
    return grouped_mm_op(x, w, offs, backend)
