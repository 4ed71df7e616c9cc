"""Reference top-1 routing and the stable sort of tokens by expert, in readable PyTorch.

These are the CPU path and the test oracle of :mod:`modekernels.ops.routing`; the semantics they
fix (capacity dropping, the order of ``perm``, the losses) are documented there. Nothing here reads
a device value on the host, so the reference also runs on CUDA tensors without synchronising.
"""

from __future__ import annotations

import torch


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stable_sort(key: torch.Tensor) -> torch.Tensor:
    return torch.sort(key, stable=True).indices


def _count(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Entries per expert as int32 (scatter_add rather than bincount: no host synchronisation)."""
    flat = expert_idx.reshape(-1).long()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat)).to(torch.int32)


def sort_by_expert(expert_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of the row-major flattened slots of ``expert_idx`` ((T,) or (T, k)) by expert.

    Returns perm (T·k,) int64 (slot indices; token = slot // k) and offs (E,) int32 cumulative
    ends of the experts' runs in perm.
    """
    flat = expert_idx.reshape(-1).long()
    perm = _stable_sort(flat)
    offs = torch.cumsum(_count(flat, num_experts), 0, dtype=torch.int32)
    return perm, offs


def route_top1(logits: torch.Tensor, capacity: int) -> tuple[torch.Tensor, ...]:
    """Top-1 routing of logits (T, E) with at most ``capacity`` tokens kept per expert.

    Returns (gate, aux_loss, z_loss, lse, expert_idx, perm, offs, tokens_per_expert, dropped,
    routed), floating outputs first: :class:`modekernels.ops.routing.Routing`'s fields plus lse
    (T,) float32, the logsumexp of each row, and routed (E,) int32, the tokens that chose each
    expert before capacity dropping, both kept for the backward.
    """
    num_tokens, num_experts = logits.shape
    acc = _float_dtype(logits.dtype)
    x = logits.to(acc)
    probs = torch.softmax(x, dim=-1)
    lse = torch.logsumexp(x, dim=-1)
    expert_idx = torch.argmax(logits, dim=-1)  # the first maximum wins ties

    routed = _count(expert_idx, num_experts)
    by_expert = _stable_sort(expert_idx)
    starts = torch.cumsum(routed, 0) - routed
    rank = torch.empty_like(expert_idx)
    rank[by_expert] = torch.arange(num_tokens, device=logits.device) - starts[expert_idx[by_expert]]
    dropped = rank >= capacity

    # Kept tokens sorted by expert, then the dropped ones in position order.
    perm = _stable_sort(torch.where(dropped, num_experts, expert_idx))
    tokens_per_expert = _count(expert_idx[~dropped], num_experts)
    offs = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)

    gate = probs.gather(1, expert_idx[:, None])[:, 0]
    gate = torch.where(dropped, 0.0, gate).to(logits.dtype)

    denominator = max(num_tokens, 1)
    fraction = routed.to(acc) / denominator
    mean_prob = probs.sum(0) / denominator
    aux_loss = (num_experts * (fraction * mean_prob).sum()).to(torch.float32)
    z_loss = ((lse * lse).sum() / denominator).to(torch.float32)
    return (gate, aux_loss, z_loss, lse.to(torch.float32), expert_idx, perm, offs,
            tokens_per_expert, dropped, routed)


def route_top1_backward(
    logits: torch.Tensor,
    lse: torch.Tensor,
    expert_idx: torch.Tensor,
    dropped: torch.Tensor,
    routed: torch.Tensor,
    grad_gate: torch.Tensor,
    grad_aux: torch.Tensor,
    grad_z: torch.Tensor,
) -> torch.Tensor:
    """d(loss)/d(logits) from the gradients of gate (T,), aux_loss () and z_loss ().

    With p = softmax(logits), g_t the kept gate (0 for a dropped token), f_e = routed_e / T and
    s_t = Σ_e f_e·p_te::

        dlogits_tj = p_tj·(E/T·grad_aux·(f_j − s_t) + 2/T·grad_z·lse_t − grad_gate_t·g_t)
                     + [j = expert_t]·grad_gate_t·g_t
    """
    num_tokens, num_experts = logits.shape
    acc = _float_dtype(logits.dtype)
    denominator = max(num_tokens, 1)
    probs = torch.exp(logits.to(acc) - lse.to(acc)[:, None])
    chosen = torch.nn.functional.one_hot(expert_idx, num_experts).to(torch.bool)
    gate = torch.where(dropped, 0.0, (probs * chosen).sum(1))
    gate_term = grad_gate.to(acc) * gate
    fraction = routed.to(acc) / denominator
    balance = (fraction[None, :] - (probs * fraction).sum(1, keepdim=True))
    row_term = (2.0 / denominator) * grad_z.to(acc) * lse.to(acc) - gate_term
    grad = probs * (num_experts / denominator * grad_aux.to(acc) * balance + row_term[:, None])
    grad = grad + chosen * gate_term[:, None]
    return grad.to(logits.dtype)
