"""``moe_mlp``: the fused expert MLP, as two differentiable torch ops.

Registered as ``torch.ops.modekernels.moe_mlp_up`` (the gathered first grouped GEMM with bias and
activation or GLU in its epilogue) and ``torch.ops.modekernels.moe_mlp_down`` (the second grouped
GEMM with bias, gate scaling and the fixed-order sum over k back to token order), each with a fake
kernel and an autograd formula. The backward of both is composed, for every backend, of the
stages themselves (``moe_mlp_up`` as the gathered GEMM dy[token]·w2ᵀ, ``moe_mlp_down`` as
dx = Σ_k dpre·w1ᵀ back in token order), ``grouped_mm_weight_grad`` (reading x[token] and
gate·dy[token] through the token index of each sorted row) and the one-pass row ops of
:mod:`modekernels.ops.moe_mlp_backward`; it is deterministic (no scatter-add). On the triton
backend no gathered (S, H) copy of x or dy is made.

Slots: token t's j-th expert choice is slot t·k + j of the S = T·k slots. ``perm`` (S,) int64
lists the slots sorted by expert, ``offs`` (E,) int32 the experts' cumulative ends in that order.
Sorted rows at or past ``offs[-1]`` belong to no expert: they contribute zero and get zero
gradient (capacity-dropped tokens, expert-parallel sentinels).
"""

from __future__ import annotations

from typing import Optional

import torch

from modekernels import backends
from modekernels._checks import (
    FLOAT_DTYPES,
    check_dim,
    check_index_range,
    check_offsets,
    check_tensor,
    values_visible,
)
from modekernels.ops import autocast
from modekernels.ops.grouped_mm import grouped_mm_weight_grad_op, is_linear_layout
from modekernels.ops.moe_mlp_backward import activation_backward_op, gate_backward_op
from modekernels.ops.routing import INDEX_DTYPES, sort_by_expert
from modekernels.reference.moe_mlp import ACTIVATIONS

# "identity" leaves the activation (or a model's own gate) to the caller.
STAGE_ACTIVATIONS = ACTIVATIONS + ("identity",)

_up = backends.Dispatch(
    "moe_mlp_up",
    reference="modekernels.reference.moe_mlp:moe_mlp_up",
    triton="modekernels.triton_kernels.moe_mlp:moe_mlp_up",
    cuda="modekernels.cuda.moe_mlp:moe_mlp_up",
)
_down = backends.Dispatch(
    "moe_mlp_down",
    reference="modekernels.reference.moe_mlp:moe_mlp_down",
    triton="modekernels.triton_kernels.moe_mlp:moe_mlp_down",
    cuda="modekernels.cuda.moe_mlp:moe_mlp_down",
)


def _check_activation(activation: object, allowed: tuple[str, ...]) -> None:
    if activation not in allowed:
        raise ValueError(f"activation must be one of {allowed}, got {activation!r}")


def _check_bias(name: str, b: object, dtype: torch.dtype, device, shape: tuple) -> None:
    if b is None:
        return
    check_tensor(name, b, rank=2, dtypes=(dtype,), device=device)
    if tuple(b.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(b.shape)}")


def _check_slots(perm: object, offs: object, slots: int, experts: int, device) -> None:
    check_tensor("perm", perm, rank=1, dtypes=(torch.int64,), device=device)
    check_dim("perm.shape[0]", perm.shape[0], slots, "the number of slots T·k")
    check_tensor("offs", offs, rank=1, dtypes=(torch.int32,), device=device)
    check_dim("offs.shape[0]", offs.shape[0], experts, "the number of experts E")


def _check_slot_values(perm: torch.Tensor, offs: torch.Tensor) -> None:
    check_offsets("offs", offs, perm.shape[0], "the number of slots T·k")
    slots = perm.shape[0]
    if values_visible(perm) and slots and bool((perm < 0).any() | (perm >= slots).any()):
        raise ValueError(f"perm must hold slot indices in [0, {slots}), got {perm.tolist()}")


def _check_up(x, perm, offs, w1, b1, activation, gated, top_k) -> None:
    check_tensor("x", x, rank=2, dtypes=FLOAT_DTYPES)
    check_tensor("w1", w1, rank=3, dtypes=(x.dtype,), device=x.device)
    check_dim("w1.shape[1]", w1.shape[1], x.shape[1], "H, the columns of x")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    _check_slots(perm, offs, x.shape[0] * top_k, w1.shape[0], x.device)
    _check_activation(activation, STAGE_ACTIVATIONS)
    if gated and w1.shape[2] % 2:
        raise ValueError(f"a gated w1 has 2·I columns, an even number; got {w1.shape[2]}")
    _check_bias("b1", b1, x.dtype, x.device, (w1.shape[0], w1.shape[2]))


def _check_down(h, perm, offs, w2, b2, gate) -> None:
    check_tensor("h", h, rank=2, dtypes=FLOAT_DTYPES)
    check_tensor("w2", w2, rank=3, dtypes=(h.dtype,), device=h.device)
    check_dim("w2.shape[1]", w2.shape[1], h.shape[1], "I, the columns of h")
    check_tensor("gate", gate, rank=2, dtypes=FLOAT_DTYPES, device=h.device)
    _check_slots(perm, offs, gate.numel(), w2.shape[0], h.device)
    check_dim("h.shape[0]", h.shape[0], gate.numel(), "the number of slots T·k")
    _check_bias("b2", b2, h.dtype, h.device, (w2.shape[0], w2.shape[2]))


@torch.library.custom_op("modekernels::moe_mlp_up", mutates_args=())
def _moe_mlp_up_op(
    x: torch.Tensor,
    perm: torch.Tensor,
    offs: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    activation: str,
    gated: bool,
    top_k: int,
    keep_preactivation: bool,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_up(x, perm, offs, w1, b1, activation, gated, top_k)
    _check_slot_values(perm, offs)
    return _up(
        backend, x.device, x, perm, offs, w1, b1, activation, gated, top_k, keep_preactivation
    )


@_moe_mlp_up_op.register_fake
def _(x, perm, offs, w1, b1, activation, gated, top_k, keep_preactivation, backend=None):
    _check_up(x, perm, offs, w1, b1, activation, gated, top_k)
    n1 = w1.shape[2]
    h = x.new_empty(perm.shape[0], n1 // 2 if gated else n1)
    return h, x.new_empty(perm.shape[0] if keep_preactivation else 0, n1)


@torch.library.custom_op("modekernels::moe_mlp_down", mutates_args=())
def _moe_mlp_down_op(
    h: torch.Tensor,
    perm: torch.Tensor,
    offs: torch.Tensor,
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    gate: torch.Tensor,
    backend: Optional[str] = None,
) -> torch.Tensor:
    _check_down(h, perm, offs, w2, b2, gate)
    _check_slot_values(perm, offs)
    return _down(backend, h.device, h, perm, offs, w2, b2, gate)


@_moe_mlp_down_op.register_fake
def _(h, perm, offs, w2, b2, gate, backend=None):
    _check_down(h, perm, offs, w2, b2, gate)
    return h.new_empty(gate.shape[0], w2.shape[2])


def slot_order_sum(
    sorted_rows: torch.Tensor, perm: torch.Tensor, num_tokens: int, top_k: int
) -> torch.Tensor:
    """(S, N) rows in expert order -> (T, N): back to slot order, then Σ over each token's k
    slots, in float32."""
    rows = sorted_rows[torch.argsort(perm)]
    if top_k == 1:
        return rows
    summed = rows.view(num_tokens, top_k, rows.shape[1]).sum(1, dtype=torch.float32)
    return summed.to(rows.dtype)


def _group_sums(
    rows: torch.Tensor,
    offs: torch.Tensor,
    backend: str | None,
    dy_rows: torch.Tensor | None = None,
    dy_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ of each expert's sorted rows R (E, N), as the grouped 1ᵀ·R (deterministic), with
    R[r] = dy_scale[r]·rows[dy_rows[r]] read in place where the index and scale are given."""
    ones = rows.new_ones(rows.shape[0] if dy_rows is None else dy_rows.shape[0], 1)
    return grouped_mm_weight_grad_op(
        ones, rows, offs, dy_rows=dy_rows, dy_scale=dy_scale, backend=backend
    )[:, 0]


def _gathered_product(
    rows_of: torch.Tensor, perm: torch.Tensor, offs: torch.Tensor, w: torch.Tensor, top_k: int, backend
) -> torch.Tensor:
    """rows_of[perm[r] // top_k] @ w[e] for the sorted rows r of expert e (S, N), the rows read
    through perm in place: ``moe_mlp_up``'s gathered GEMM with no bias or activation."""
    return _moe_mlp_up_op(rows_of, perm, offs, w, None, "identity", False, top_k, False, backend)[0]


def _bias_terms(
    dy: torch.Tensor, b2: torch.Tensor, tokens: torch.Tensor, offs: torch.Tensor
) -> torch.Tensor:
    """<dy[token(r)], b2[expert(r)]> (S,) float32 for each sorted row r, 0 past offs[-1]: one
    (T, H)·(H, E) product (each token's row read once, not k times) and a gather by the rows'
    token and expert, found from offs on the device."""
    num_experts = offs.shape[0]
    if num_experts == 0:
        return dy.new_zeros(tokens.shape[0], dtype=torch.float32)
    per_token = torch.mm(dy, b2.t()).float()  # (T, E)
    rows = torch.arange(tokens.shape[0], device=tokens.device, dtype=offs.dtype)
    experts = torch.searchsorted(offs, rows, right=True)  # E for rows past offs[-1]
    terms = per_token[tokens, experts.clamp(max=num_experts - 1)]
    return torch.where(experts < num_experts, terms, 0.0)


def _up_setup_context(ctx, inputs, output):
    x, perm, offs, w1, b1, activation, gated, top_k, keep, backend = inputs
    ctx.activation, ctx.gated, ctx.top_k = activation, gated, top_k
    ctx.keep, ctx.backend = keep, backends.backward_request(backend, output[0])
    ctx.has_b1 = b1 is not None
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, perm, offs, w1, output[1])


def _up_backward(ctx, dh, _dpre):
    x, perm, offs, w1, pre = ctx.saved_tensors
    if ctx.activation == "identity":
        dpre = dh
    elif ctx.keep:
        dpre = activation_backward_op(dh, pre, ctx.activation, ctx.gated, ctx.backend)
    else:
        raise RuntimeError(
            "moe_mlp_up ran with keep_preactivation=False, so it has no backward; "
            "call it with keep_preactivation=True when gradients are needed"
        )
    dx = dw1 = db1 = None
    if ctx.needs_input_grad[0]:
        # dx[t] = Σ_j dpre[r(t, j)]·w1ᵀ: the down stage's GEMM, scatter to slots and fixed-order
        # sum over k, with unit gates
        unit_gates = torch.ones(x.shape[0], ctx.top_k, dtype=torch.float32, device=x.device)
        dx = _moe_mlp_down_op(dpre, perm, offs, w1.transpose(1, 2), None, unit_gates, ctx.backend)
    if ctx.needs_input_grad[3]:
        dw1 = grouped_mm_weight_grad_op(x, dpre, offs, x_rows=perm // ctx.top_k,
                                        transposed=is_linear_layout(w1), backend=ctx.backend)
    if ctx.has_b1 and ctx.needs_input_grad[4]:
        db1 = _group_sums(dpre, offs, ctx.backend)
    return dx, None, None, dw1, db1, None, None, None, None, None


def _down_setup_context(ctx, inputs, output):
    h, perm, offs, w2, b2, gate, backend = inputs
    ctx.backend = backends.backward_request(backend, output)
    ctx.save_for_backward(h, perm, offs, w2, b2, gate)


def _down_backward(ctx, dy):
    h, perm, offs, w2, b2, gate = ctx.saved_tensors
    top_k = gate.shape[1]
    dy = dy.to(h.dtype)
    tokens = perm // top_k  # (S,): the token of each sorted row, whose gradient row it reads
    sorted_gate = gate.reshape(-1)[perm].float()
    dh = dw2 = db2 = dgate = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[5]:
        dh_unscaled = _gathered_product(dy, perm, offs, w2.transpose(1, 2), top_k, ctx.backend)
        # d gate = <dy_t, h·w2 + b2> = <dy_t·w2ᵀ, h> + <dy_t, b2>; rows past offs[-1] give 0.
        dh, dgate_sorted = gate_backward_op(dh_unscaled, h, sorted_gate, ctx.backend)
        if not ctx.needs_input_grad[0]:
            dh = None
        if ctx.needs_input_grad[5]:
            if b2 is not None:
                dgate_sorted = dgate_sorted + _bias_terms(dy, b2, tokens, offs)
            dgate = dgate_sorted[torch.argsort(perm)].view_as(gate).to(gate.dtype)
    # d of each sorted row's unscaled output: gate·dy[token], read through the index in place
    dout = {"dy_rows": tokens, "dy_scale": sorted_gate}
    if ctx.needs_input_grad[3]:
        dw2 = grouped_mm_weight_grad_op(h, dy, offs, transposed=is_linear_layout(w2),
                                        backend=ctx.backend, **dout)
    if b2 is not None and ctx.needs_input_grad[4]:
        db2 = _group_sums(dy, offs, ctx.backend, **dout)
    return dh, None, None, dw2, db2, dgate, None


_moe_mlp_up_op.register_autograd(_up_backward, setup_context=_up_setup_context)
_moe_mlp_down_op.register_autograd(_down_backward, setup_context=_down_setup_context)
# x or h, w and b in the autocast dtype, as autocast gives linear; the gate keeps its dtype.
autocast.register("modekernels::moe_mlp_up", cast=(0, 3, 4))
autocast.register("modekernels::moe_mlp_down", cast=(0, 3, 4))


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def moe_mlp_up(
    x: torch.Tensor,
    perm: torch.Tensor,
    offs: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None = None,
    *,
    activation: str,
    gated: bool,
    top_k: int,
    backend: str | None = None,
) -> torch.Tensor:
    """First stage: h[r] = activate(x[perm[r] // top_k] @ w1[e] + b1[e]) for the sorted rows r of
    expert e, reading x through perm (no permuted copy). x (T, H), perm (T·top_k,), offs (E,),
    w1 (E, H, N1), b1 (E, N1) -> h (T·top_k, I) in expert order; rows past offs[-1] are zero.
    ``activation="identity"`` (not gated) returns the raw projection for a custom gate. Under
    ``torch.autocast``, x, w1 and b1 are cast to the autocast dtype, and so is h."""
    keep = activation != "identity" and _needs_grad(x, w1, b1)
    h, _ = _moe_mlp_up_op(x, perm, offs, w1, b1, activation, gated, top_k, keep, backend)
    return h


def moe_mlp_down(
    h: torch.Tensor,
    perm: torch.Tensor,
    offs: torch.Tensor,
    w2: torch.Tensor,
    gate: torch.Tensor,
    b2: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Second stage: y[t] = Σ_j gate[t, j]·(h[r] @ w2[e] + b2[e]) where sorted row r of expert e
    holds slot t·k + j, summed over j in order. h (S, I), gate (T, k), w2 (E, I, H), b2 (E, H)
    -> y (T, H) in h's dtype. Under ``torch.autocast``, h, w2 and b2 are cast to the autocast
    dtype (the gate keeps its own), and so is y."""
    return _moe_mlp_down_op(h, perm, offs, w2, b2, gate, backend)


def moe_mlp_sorted(
    x: torch.Tensor,
    perm: torch.Tensor,
    offs: torch.Tensor,
    gate: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    *,
    activation: str,
    gated: bool,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """:func:`moe_mlp` with the slots already sorted by expert: gate (T, k), perm and offs as
    :func:`modekernels.sort_by_expert` (or a :class:`~modekernels.Routing`) gives them."""
    h = moe_mlp_up(x, perm, offs, w1, b1, activation=activation, gated=gated,
                   top_k=gate.shape[1], backend=backend)
    return moe_mlp_down(h, perm, offs, w2, gate, b2, backend=backend)


def _check_routing(x, expert_idx, gate, w1, w2, b1, b2, activation, gated) -> None:
    check_tensor("x", x, rank=2, dtypes=FLOAT_DTYPES)
    check_tensor("expert_idx", expert_idx, dtypes=INDEX_DTYPES, device=x.device)
    if expert_idx.dim() not in (1, 2):
        raise ValueError(f"expert_idx must be (T,) or (T, k), got shape {tuple(expert_idx.shape)}")
    check_dim("expert_idx.shape[0]", expert_idx.shape[0], x.shape[0], "T, the rows of x")
    check_tensor("gate", gate, dtypes=FLOAT_DTYPES, device=x.device)
    if gate.shape != expert_idx.shape:
        raise ValueError(
            f"gate must have expert_idx's shape {tuple(expert_idx.shape)}, got {tuple(gate.shape)}"
        )
    check_tensor("w1", w1, rank=3, dtypes=(x.dtype,), device=x.device)
    check_tensor("w2", w2, rank=3, dtypes=(x.dtype,), device=x.device)
    _check_activation(activation, ACTIVATIONS)
    if not isinstance(gated, bool):
        raise TypeError(f"gated must be a bool, got {gated!r}")
    num_experts = w1.shape[0]
    check_dim("w2.shape[0]", w2.shape[0], num_experts, "the number of experts E, w1.shape[0]")
    inner = w1.shape[2] // 2 if gated else w1.shape[2]
    check_dim("w2.shape[1]", w2.shape[1], inner, "I, w1.shape[2]" + (" / 2" if gated else ""))
    check_dim("w2.shape[2]", w2.shape[2], x.shape[1], "H, the columns of x")
    top_k = expert_idx.shape[1] if expert_idx.dim() == 2 else 1
    if not 1 <= top_k <= num_experts:
        raise ValueError(
            f"k = expert_idx.shape[1] = {top_k} must be in [1, {num_experts}], the number of "
            f"experts"
        )
    _check_bias("b1", b1, x.dtype, x.device, (num_experts, w1.shape[2]))
    _check_bias("b2", b2, x.dtype, x.device, (num_experts, x.shape[1]))
    check_index_range("expert_idx", expert_idx, num_experts, "the number of experts E")


def moe_mlp(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    gate: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    *,
    activation: str,
    gated: bool,
    b1: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The fused expert MLP: y_t = Σ_j gate_tj·(h_tj @ w2[e_tj] + b2[e_tj]), with
    h_tj = act(x_t @ w1[e] + b1[e]), or act(x_t @ w1_gate + b1_gate) ⊙ (x_t @ w1_up + b1_up) when
    ``gated`` (w1's first I columns the gate half, the last I the linear half).

    Args:
        x: (T, H) float32, float16 or bfloat16.
        expert_idx: (T,) or (T, k) int64 or int32 expert of each token's choices, in [0, E).
        gate: the weight of each choice, expert_idx's shape; float32, float16 or bfloat16,
            whatever x's dtype (applied in float32).
        w1: (E, H, I), or (E, H, 2·I) when gated; x's dtype. w2: (E, I, H). Either may be a
            ``.transpose(1, 2)`` view of the ``nn.Linear`` layout (E, N, K), used without a copy
            (its gradient is written in that layout, so none is made accumulating it either).
        activation: ``"silu"``, ``"gelu"`` (exact erf) or ``"relu"``.
        b1: (E, I or 2·I), b2: (E, H), optional, x's dtype.
        backend: ``"reference"``, ``"triton"``, ``"cuda"`` or None (see
            :mod:`modekernels.backends`), for every op of the call, the sort by expert included.

    Returns:
        y (T, H) in x's dtype, accumulated in float32; bit-identical from run to run (the sum
        over k runs in slot order, without atomics) for the same kernel configuration: the
        tile sizes Triton's autotuning picks in one process may differ in another, which can
        change the last bits (``MODEKERNELS_AUTOTUNE=0`` fixes them). Differentiable in x,
        gate, w1, w2, b1, b2.

    Under ``torch.autocast``, x, w1, w2, b1 and b2 are first cast to the autocast dtype of x's
    device type, as ``linear`` casts its operands, so float32 weights and a bfloat16 x mix; y
    then comes in that dtype. The gate keeps its dtype.
    """
    # cast as the stages' autocast rules cast them, so that the checks see the dtypes they run in
    x, w1, w2, b1, b2 = autocast.autocast_operands((x, w1, w2, b1, b2))
    _check_routing(x, expert_idx, gate, w1, w2, b1, b2, activation, gated)
    top_k = expert_idx.shape[1] if expert_idx.dim() == 2 else 1
    perm, offs = sort_by_expert(expert_idx, w1.shape[0], backend=backend)
    return moe_mlp_sorted(x, perm, offs, gate.reshape(x.shape[0], top_k), w1, w2,
                          activation=activation, gated=gated, b1=b1, b2=b2, backend=backend)
