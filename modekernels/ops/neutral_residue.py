"""``neutral_residue``: the fused gated residue block y = r + g(x)·a(x), as a differentiable op.

Registered as ``torch.ops.modekernels.neutral_residue`` (forward) and
``torch.ops.modekernels.neutral_residue_backward``, each with a fake kernel, and the forward with
an autograd formula. Backends: ``reference``, ``triton`` and ``cuda``.
"""

from __future__ import annotations

from typing import Optional

import torch

from modekernels import backends
from modekernels._checks import FLOAT_DTYPES, check_dim, check_tensor
from modekernels.ops import autocast
from modekernels.reference.moe_mlp import ACTIVATIONS
from modekernels.reference.neutral_residue import GATES

_forward = backends.Dispatch(
    "neutral_residue",
    reference="modekernels.reference.neutral_residue:neutral_residue",
    triton="modekernels.triton_kernels.neutral_residue:neutral_residue",
    cuda="modekernels.cuda.neutral_residue:neutral_residue",
)
_backward_dispatch = backends.Dispatch(
    "neutral_residue_backward",
    reference="modekernels.reference.neutral_residue:neutral_residue_backward",
    triton="modekernels.triton_kernels.neutral_residue:neutral_residue_backward",
    cuda="modekernels.cuda.neutral_residue:neutral_residue_backward",
)


def _check_optional(name, t, shape, x) -> None:
    if t is None:
        return
    check_tensor(name, t, rank=len(shape), dtypes=(x.dtype,), device=x.device)
    for i, (actual, (expected, what)) in enumerate(zip(t.shape, shape)):
        check_dim(f"{name}.shape[{i}]", actual, expected, what)


def _check_forward(
    x, w_in, w_glu, w_out, w_gate, b_gate, b_in, b_glu, b_out, residual, activation, gate
) -> None:
    check_tensor("x", x, rank=2, dtypes=FLOAT_DTYPES)
    T, d = x.shape
    check_tensor("w_in", w_in, rank=2, dtypes=(x.dtype,), device=x.device)
    check_dim("w_in.shape[1]", w_in.shape[1], d, "d, the columns of x")
    d_a = w_in.shape[0]
    D = (d, "d, the columns of x")
    DA = (d_a, "d_adapter, w_in.shape[0]")
    check_tensor("w_out", w_out)  # required: the optional check below would pass None
    _check_optional("w_glu", w_glu, (DA, D), x)
    _check_optional("w_out", w_out, (D, DA), x)
    _check_optional("w_gate", w_gate, (D,), x)
    _check_optional("b_gate", b_gate, (), x)
    _check_optional("b_in", b_in, (DA,), x)
    _check_optional("b_glu", b_glu, (DA,), x)
    _check_optional("b_out", b_out, (D,), x)
    _check_optional("residual", residual, ((T, "T, the rows of x"), D), x)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    if (gate == "none") != (w_gate is None):
        raise ValueError(
            f"w_gate must be given exactly when gate is not 'none' (gate={gate!r}, "
            f"w_gate {'absent' if w_gate is None else 'given'})"
        )
    if b_gate is not None and w_gate is None:
        raise ValueError("b_gate was given without w_gate")
    if b_glu is not None and w_glu is None:
        raise ValueError("b_glu was given without w_glu")


def _pre_columns(w_in, w_glu) -> int:
    return w_in.shape[0] * (1 if w_glu is None else 2)


@torch.library.custom_op("modekernels::neutral_residue", mutates_args=())
def _neutral_residue_op(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_glu: Optional[torch.Tensor],
    w_out: torch.Tensor,
    w_gate: Optional[torch.Tensor],
    b_gate: Optional[torch.Tensor],
    b_in: Optional[torch.Tensor],
    b_glu: Optional[torch.Tensor],
    b_out: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    activation: str,
    gate: str,
    sparse: bool,
    keep_pre: bool,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (x, w_in, w_glu, w_out, w_gate, b_gate, b_in, b_glu, b_out, residual, activation, gate)
    _check_forward(*args)
    return _forward(backend, x.device, *args, sparse, keep_pre)


@_neutral_residue_op.register_fake
def _(x, w_in, w_glu, w_out, w_gate, b_gate, b_in, b_glu, b_out, residual, activation, gate,
      sparse, keep_pre, backend=None):
    _check_forward(
        x, w_in, w_glu, w_out, w_gate, b_gate, b_in, b_glu, b_out, residual, activation, gate
    )
    T = x.shape[0]
    return (
        x.new_empty(x.shape),
        x.new_empty(T, dtype=torch.float32),
        x.new_empty(T, dtype=torch.float32),
        x.new_empty(T if keep_pre else 0, _pre_columns(w_in, w_glu)),
    )


@torch.library.custom_op("modekernels::neutral_residue_backward", mutates_args=())
def _neutral_residue_backward_op(
    dy: Optional[torch.Tensor],
    dg: Optional[torch.Tensor],
    dl1: Optional[torch.Tensor],
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_glu: Optional[torch.Tensor],
    w_out: torch.Tensor,
    w_gate: Optional[torch.Tensor],
    b_out: Optional[torch.Tensor],
    g: torch.Tensor,
    pre: torch.Tensor,
    activation: str,
    gate: str,
    backend: Optional[str] = None,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    _check_backward(x, w_in, w_glu, pre)
    return _backward_dispatch(
        backend, x.device, dy, dg, dl1, x, w_in, w_glu, w_out, w_gate, b_out, g, pre,
        activation, gate,
    )


def _check_backward(x, w_in, w_glu, pre) -> None:
    n_pre = _pre_columns(w_in, w_glu)
    if tuple(pre.shape) != (x.shape[0], n_pre):
        raise RuntimeError(
            "neutral_residue: the backward needs the pre-activations, which the forward keeps "
            "only when an input requires grad and grad mode is on"
        )


@_neutral_residue_backward_op.register_fake
def _(dy, dg, dl1, x, w_in, w_glu, w_out, w_gate, b_out, g, pre, activation, gate, backend=None):
    _check_backward(x, w_in, w_glu, pre)
    d, d_a = x.shape[1], w_in.shape[0]
    empty_w, empty_b = x.new_empty(0, d), x.new_empty(0)
    return (
        x.new_empty(x.shape),
        x.new_empty(d_a, d),
        x.new_empty(d_a),
        x.new_empty(d_a, d) if w_glu is not None else empty_w,
        x.new_empty(d_a) if w_glu is not None else empty_b.clone(),
        x.new_empty(d, d_a),
        x.new_empty(d),
        x.new_empty(d) if w_gate is not None else empty_b.clone(),
        x.new_empty(()) if w_gate is not None else empty_b.clone(),
    )


def _setup_context(ctx, inputs, output):
    x, w_in, w_glu, w_out, w_gate, _, _, _, b_out, _, activation, gate, _, _, backend = inputs
    _, g, _, pre = output
    ctx.set_materialize_grads(False)  # unused outputs (g, l1) then skip their terms
    ctx.activation, ctx.gate = activation, gate
    ctx.backend = backends.backward_request(backend, output[0])
    ctx.save_for_backward(x, w_in, w_glu, w_out, w_gate, b_out, g, pre)


def _backward(ctx, dy, dg, dl1, _dpre):
    x, w_in, w_glu, w_out, w_gate, b_out, g, pre = ctx.saved_tensors
    dx, dw_in, db_in, dw_glu, db_glu, dw_out, db_out, dw_gate, db_gate = (
        _neutral_residue_backward_op(
            dy, dg, dl1, x, w_in, w_glu, w_out, w_gate, b_out, g, pre,
            ctx.activation, ctx.gate, ctx.backend,
        )
    )
    need = ctx.needs_input_grad
    grads = (dx, dw_in, dw_glu, dw_out, dw_gate, db_gate, db_in, db_glu, db_out, dy)
    return tuple(t if need[i] else None for i, t in enumerate(grads)) + (None,) * 5


_neutral_residue_op.register_autograd(_backward, setup_context=_setup_context)
# Every tensor input (x, the weights, the biases, the residual) in the autocast dtype, as
# autocast gives addmm; the backward runs in the dtypes the forward saved.
autocast.register("modekernels::neutral_residue", cast=range(10))
autocast.register("modekernels::neutral_residue_backward")


def neutral_residue(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_glu: torch.Tensor | None,
    w_out: torch.Tensor,
    w_gate: torch.Tensor | None = None,
    b_gate: torch.Tensor | None = None,
    *,
    b_in: torch.Tensor | None = None,
    b_glu: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: str = "silu",
    gate: str | None = None,
    sparse: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gated residue block (neutral residues; a bottleneck adapter without GLU and gate).

    Per token x_t::

        h   = act(W_in x + b_in) ⊙ (W_glu x + b_glu)     (act(W_in x + b_in) when w_glu is None)
        a   = W_out h + b_out
        g   = relu(w_gate·x + b_gate), sigmoid(...), or 1 when gate is "none"
        y_a = g·a                                         (exactly 0 where g == 0)
        y   = residual + y_a                              (y_a alone without residual)

    Args:
        x: (T, d) float32, float16 or bfloat16.
        w_in, w_glu: (d_adapter, d), the ``nn.Linear`` layout; w_glu None for no GLU.
        w_out: (d, d_adapter).
        w_gate: (d,), None exactly when ``gate == "none"``.
        b_gate: () scalar tensor or None. b_in, b_glu: (d_adapter,); b_out: (d,); all optional.
        residual: (T, d) or None, added in the output kernel (no extra pass).
        activation: ``"silu"``, ``"gelu"`` (exact erf) or ``"relu"``.
        gate: ``"relu"``, ``"sigmoid"`` or ``"none"``; None means ``"relu"`` when w_gate is
            given, else ``"none"``.
        sparse: rows whose gate is exactly 0 skip both adapter GEMMs (inference with the ReLU
            gate); the output is bit-identical to the dense path. Device-side, no host sync.
        backend: ``"reference"``, ``"triton"``, ``"cuda"`` or None (see
            :mod:`modekernels.backends`).

    All tensors share x's dtype and device. Under ``torch.autocast`` every one of them is first
    cast to the autocast dtype of x's device type (as ``addmm`` casts its operands), so float32
    weights and a bfloat16 x mix; y then comes in that dtype, g and l1 stay float32.

    Returns:
        (y (T, d) in x's dtype, g (T,) float32, l1 (T,) float32 = ‖y_a‖₁ per row, the
        residual excluded). Differentiable in x, every weight and bias, and the residual,
        through all three outputs.

    The backward recomputes h = act(u)⊙v elementwise from the stored pre-activations
    [u | v] (T, d_adapter or 2·d_adapter), which the forward keeps, in x's dtype, only when
    grad mode is on and an input requires grad; it stores neither h nor a (T, d), and
    recomputes a = W_out h + b_out (one GEMM) only when l1 receives a gradient.
    """
    if gate is None:
        gate = "none" if w_gate is None else "relu"
    tensors = autocast.autocast_operands(
        (x, w_in, w_glu, w_out, w_gate, b_gate, b_in, b_glu, b_out, residual)
    )  # as the op's autocast rule casts them, so that the checks see the dtypes it runs in
    _check_forward(*tensors, activation, gate)  # before the schema's less specific type errors
    if not isinstance(sparse, bool):
        raise TypeError(f"sparse must be a bool, got {sparse!r}")
    keep_pre = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors
    )
    y, g, l1, _ = _neutral_residue_op(*tensors, activation, gate, sparse, keep_pre, backend)
    return y, g, l1
