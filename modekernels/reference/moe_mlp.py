"""Reference fused expert MLP: the formula of ``moe_mlp``, its two grouped stages, and the
activation (or GLU) with its derivative, which the backward of every backend uses.

Shapes: x (T, H); k experts per token, S = T·k slots (slot t·k + j is token t's j-th choice);
w1 (E, H, N1) with N1 = I, or 2·I when gated (first I columns the activated gate half, last I the
linear half); w2 (E, I, H); b1 (E, N1); b2 (E, H). ``perm`` (S,) lists the slots sorted by expert
and ``offs`` (E,) int32 holds each expert's cumulative end in that order; sorted rows at or past
``offs[-1]`` belong to no expert and contribute nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from modekernels.reference.grouped_mm import accumulation_dtype, group_bounds

# The activations the fused kernels have in their epilogue; "identity" is internal (a custom
# gate applied outside the kernel).
ACTIVATIONS = ("silu", "gelu", "relu")


def _act(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "relu":
        return F.relu(z)
    return z


def _act_derivative(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
        return cdf + z * pdf
    if activation == "relu":
        return (z > 0).to(z.dtype)
    return torch.ones_like(z)


def activate(pre: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """h = act(pre), or act(pre[:, :I]) ⊙ pre[:, I:] when gated; computed in pre's dtype."""
    if not gated:
        return _act(pre, activation)
    gate, up = pre.chunk(2, dim=-1)
    return _act(gate, activation) * up


def activation_grad(
    dh: torch.Tensor, pre: torch.Tensor, activation: str, gated: bool
) -> torch.Tensor:
    """d pre from d h for :func:`activate`, in float32 (or float64 for float64 inputs), shaped
    like pre."""
    acc = accumulation_dtype(pre.dtype)
    dh = dh.to(acc)
    pre = pre.to(acc)
    if not gated:
        return dh * _act_derivative(pre, activation)
    gate, up = pre.chunk(2, dim=-1)
    return torch.cat([dh * up * _act_derivative(gate, activation), dh * _act(gate, activation)], -1)


def activation_backward(
    dh: torch.Tensor, pre: torch.Tensor, activation: str, gated: bool
) -> torch.Tensor:
    """The first stage's backward through its activation: d pre (S, N1) in pre's dtype from
    dh (S, I) and the kept pre (S, N1), computed in float32 (:func:`activation_grad`)."""
    return activation_grad(dh, pre, activation, gated).to(pre.dtype)


def gate_backward(
    dh_unscaled: torch.Tensor, h: torch.Tensor, sorted_gate: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The second stage's backward at each sorted row r, from dh_unscaled[r] = dy[token]·w2[e]ᵀ
    (S, I), h (S, I) and the row's gate (S,) float32: (dh = gate·dh_unscaled in h's dtype,
    Σ_c dh_unscaled·h (S,) float32, the gate's gradient without its bias term)."""
    acc = accumulation_dtype(h.dtype)
    rows = dh_unscaled.to(acc)
    dh = (rows * sorted_gate.to(acc)[:, None]).to(h.dtype).contiguous()
    return dh, (rows * h.to(acc)).sum(1).to(torch.float32)


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
    """Sorted row r of expert e: pre[r] = x[perm[r] // top_k] @ w1[e] + b1[e], h[r] =
    activate(pre[r]). Returns (h (S, I), pre (S, N1), or (0, N1) unless kept); rows at or past
    offs[-1] are zero."""
    acc = accumulation_dtype(x.dtype)
    S, N1 = perm.shape[0], w1.shape[2]
    pre = torch.zeros(S, N1, dtype=acc, device=x.device)
    for e, (start, end) in enumerate(group_bounds(offs)):
        rows = x[perm[start:end] // top_k].to(acc)
        pre[start:end] = rows @ w1[e].to(acc)
        if b1 is not None:
            pre[start:end] += b1[e].to(acc)
    h = activate(pre, activation, gated).to(x.dtype)
    kept = pre.to(x.dtype, copy=True) if keep_preactivation else x.new_zeros(0, N1)
    return h, kept


def moe_mlp_down(
    h: torch.Tensor,
    perm: torch.Tensor,
    offs: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    gate: torch.Tensor,
) -> torch.Tensor:
    """Slot s = perm[r] of sorted row r of expert e: o[s] = gate[s]·(h[r] @ w2[e] + b2[e]);
    y[t] = Σ_j o[t·k + j] over j in order. gate (T, k) -> y (T, H) in h's dtype."""
    acc = accumulation_dtype(h.dtype)
    T, k = gate.shape
    out = torch.zeros(T * k, w2.shape[2], dtype=acc, device=h.device)
    flat_gate = gate.reshape(-1).to(acc)
    for e, (start, end) in enumerate(group_bounds(offs)):
        slots = perm[start:end]
        o = h[start:end].to(acc) @ w2[e].to(acc)
        if b2 is not None:
            o = o + b2[e].to(acc)
        out[slots] = flat_gate[slots, None] * o
    return out.view(T, k, w2.shape[2]).sum(1).to(h.dtype)


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
) -> torch.Tensor:
    """The oracle, token by token: y_t = Σ_j gate_tj·(h_tj @ w2[e_tj] + b2[e_tj]) with
    h_tj = activate(x_t @ w1[e_tj] + b1[e_tj]). expert_idx and gate (T,) or (T, k)."""
    acc = accumulation_dtype(x.dtype)
    idx = expert_idx.reshape(x.shape[0], -1) if x.shape[0] else expert_idx
    g = gate.reshape(idx.shape).to(acc)
    y = torch.zeros(x.shape[0], w2.shape[2], dtype=acc, device=x.device)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            pre = x[t].to(acc) @ w1[e].to(acc)
            if b1 is not None:
                pre = pre + b1[e].to(acc)
            o = activate(pre, activation, gated) @ w2[e].to(acc)
            if b2 is not None:
                o = o + b2[e].to(acc)
            y[t] += g[t, j] * o
    return y.to(x.dtype)
