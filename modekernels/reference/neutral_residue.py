"""Reference gated residue block: the formula of ``neutral_residue`` and its backward.

Shapes: x (T, d); w_in, w_glu (d_a, d); w_out (d, d_a); w_gate (d,); biases b_in, b_glu (d_a,),
b_out (d,), b_gate () (a scalar tensor); residual (T, d). Per token t::

    u = W_in x + b_in,  v = W_glu x + b_glu
    h = act(u) ⊙ v          (act(u) without a GLU), rounded to x's dtype as the kernels store it
    a = W_out h + b_out
    g = gate(w_gate·x + b_gate)   (relu, sigmoid, or 1 for gate "none")
    y_a = g·a, exactly 0 where g == 0;  y = residual + y_a (exactly residual where g == 0)
    l1 = ‖y_a‖₁

``pre`` = [u | v] (T, d_a or 2·d_a) in x's dtype is what the backward needs: its own output of
the op (empty (0, ·) when not kept).

The backward is composed here once: torch GEMMs around one elementwise step
(:func:`glu_backward`), which a backend may replace by a fused kernel.
"""

from __future__ import annotations

from typing import Callable

import torch

from modekernels.reference.grouped_mm import accumulation_dtype
from modekernels.reference.moe_mlp import activate, activation_grad

GATES = ("relu", "sigmoid", "none")


def apply_gate(z: torch.Tensor, gate: str) -> torch.Tensor:
    """g = relu(z), sigmoid(z), or ones for gate "none"."""
    if gate == "relu":
        return torch.relu(z)
    if gate == "sigmoid":
        return torch.sigmoid(z)
    return torch.ones_like(z)


def gate_derivative(g: torch.Tensor, gate: str) -> torch.Tensor:
    """dg/dz from the gate's value g: 1[g > 0] (relu), g(1-g) (sigmoid), 0 (none)."""
    if gate == "relu":
        return (g > 0).to(g.dtype)
    if gate == "sigmoid":
        return g * (1 - g)
    return torch.zeros_like(g)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, acc: torch.dtype):
    out = x.to(acc) @ w.to(acc).T
    return out if b is None else out + b.to(acc)


def neutral_residue(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_glu: torch.Tensor | None,
    w_out: torch.Tensor,
    w_gate: torch.Tensor | None,
    b_gate: torch.Tensor | None,
    b_in: torch.Tensor | None,
    b_glu: torch.Tensor | None,
    b_out: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str,
    gate: str,
    sparse: bool,
    keep_pre: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (T, d) in x's dtype, g (T,) float32, l1 (T,) float32, pre (T or 0, d_a or 2·d_a)).

    Differentiable by autograd (the tests' oracle). ``sparse`` changes nothing here: skipping
    gated-off rows is the kernels' optimisation and must give this same output.
    """
    acc = accumulation_dtype(x.dtype)
    out_acc = torch.float64 if acc == torch.float64 else torch.float32
    glu = w_glu is not None
    pre = _linear(x, w_in, b_in, acc)
    if glu:
        pre = torch.cat([pre, _linear(x, w_glu, b_glu, acc)], dim=1)
    h = activate(pre, activation, glu).to(x.dtype)
    a = _linear(h, w_out, b_out, acc)
    if w_gate is None:
        g = x.new_ones(x.shape[0], dtype=out_acc)
    else:
        z = x.to(acc) @ w_gate.to(acc)
        if b_gate is not None:
            z = z + b_gate.to(acc)
        g = apply_gate(z, gate).to(out_acc)
    off = (g == 0)[:, None]
    y_a = torch.where(off, 0.0, g[:, None].to(acc) * a)
    y = y_a if residual is None else torch.where(off, residual.to(acc), residual.to(acc) + y_a)
    l1 = y_a.abs().sum(dim=1).to(out_acc)
    pre = pre.to(x.dtype) if keep_pre else pre.new_empty(0, pre.shape[1], dtype=x.dtype)
    return y.to(x.dtype), g, l1, pre


def glu_backward(
    pre: torch.Tensor,
    dh_raw: torch.Tensor,
    g: torch.Tensor,
    dgate_extra: torch.Tensor,
    activation: str,
    glu: bool,
    gate: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The elementwise step of the backward, per row t.

    Inputs: pre (T, d_a or 2·d_a), dh_raw = dy_a·W_out (T, d_a) (dy_a the gradient of the
    adapter output g·a), g (T,) float32, dgate_extra (T,) float32 = dy_a·b_out + dL/dg.
    Returns (gh = g·h (T, d_a) in pre's dtype, dpre (T, n_pre + [1 if gated]) in pre's dtype):
    dpre = [du | dv | dz] with d h = g·dh_raw through the activation and GLU, and
    dz = (dh_raw·h + dgate_extra)·gate'(g), the gradient of the gate's pre-activation.
    """
    acc = accumulation_dtype(pre.dtype)
    h = activate(pre.to(acc), activation, glu)
    gf = g.to(acc)[:, None]
    dpre = activation_grad(gf * dh_raw.to(acc), pre, activation, glu)
    if gate != "none":
        dz = ((dh_raw.to(acc) * h).sum(dim=1) + dgate_extra.to(acc)) * gate_derivative(
            g.to(acc), gate
        )
        dpre = torch.cat([dpre, dz[:, None]], dim=1)
    return (gf * h).to(pre.dtype), dpre.to(pre.dtype)


def neutral_residue_backward(
    dy: torch.Tensor | None,
    dg: torch.Tensor | None,
    dl1: torch.Tensor | None,
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_glu: torch.Tensor | None,
    w_out: torch.Tensor,
    w_gate: torch.Tensor | None,
    b_out: torch.Tensor | None,
    g: torch.Tensor,
    pre: torch.Tensor,
    activation: str,
    gate: str,
    elementwise: Callable = glu_backward,
) -> tuple[torch.Tensor, ...]:
    """Gradients (dx, dw_in, db_in, dw_glu, db_glu, dw_out, db_out, dw_gate, db_gate) from the
    gradients of the outputs y, g, l1 (each may be None: unused).

    Recomputed, not stored: h = act(u)⊙v (elementwise from ``pre``) and, only when l1 has a
    gradient, the adapter output a = W_out h + b_out for the sign of ‖y_a‖₁. The gradient of
    the residual is dy itself and is not computed here. Absent weights (w_glu, w_gate) get
    (0, d) / (0,) gradients. ``elementwise`` is :func:`glu_backward` or a fused equivalent.
    """
    T, d = x.shape
    d_a = w_in.shape[0]
    glu = w_glu is not None
    gated = w_gate is not None
    acc = accumulation_dtype(x.dtype)
    gf = g.to(acc)[:, None]
    dya = dy.to(acc) if dy is not None else x.new_zeros(T, d, dtype=acc)
    if dl1 is not None:
        h = activate(pre.to(acc), activation, glu).to(x.dtype)
        a = _linear(h, w_out, b_out, acc)
        dya = dya + dl1.to(acc)[:, None] * torch.sign(a) * (gf > 0)
    dya = dya.to(x.dtype)
    dh_raw = dya @ w_out
    extra = torch.zeros(T, dtype=acc, device=x.device)
    if b_out is not None:
        extra = extra + dya.to(acc) @ b_out.to(acc)
    if dg is not None:
        extra = extra + dg.to(acc)
    gh, dpre = elementwise(pre, dh_raw, g, extra, activation, glu, gate if gated else "none")
    dw_out = (dya.T @ gh).to(w_out.dtype)
    db_out = (dya.to(acc).T @ gf[:, 0]).to(x.dtype)
    w_cat = torch.cat(
        [w_in] + ([w_glu] if glu else []) + ([w_gate[None, :]] if gated else [])
    )
    dx = (dpre @ w_cat).to(x.dtype)
    dw_cat = dpre.T @ x
    db_cat = dpre.to(acc).sum(dim=0).to(x.dtype)
    # Separate tensors, not views of dw_cat: a custom op's outputs must not alias each other.
    dw_in, db_in = dw_cat[:d_a].clone(), db_cat[:d_a].clone()
    if glu:
        dw_glu, db_glu = dw_cat[d_a : 2 * d_a].clone(), db_cat[d_a : 2 * d_a].clone()
    else:
        dw_glu, db_glu = x.new_empty(0, d), x.new_empty(0)
    if gated:
        dw_gate, db_gate = dw_cat[-1].clone(), db_cat[-1].clone()
    else:
        dw_gate, db_gate = x.new_empty(0), x.new_empty(0)
    return dx, dw_in, db_in, dw_glu, db_glu, dw_out, db_out, dw_gate, db_gate
