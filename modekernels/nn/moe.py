"""Mixture-of-experts modules on the modekernels ops: a top-1 router, a bank of expert MLPs run
by the fused ``moe_mlp``, and the two together as a drop-in FFN that also returns its losses."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from modekernels.ops.moe_mlp import moe_mlp, moe_mlp_sorted
from modekernels.ops.routing import Routing, hash_route, make_hash_table, route_top1
from modekernels.reference.moe_mlp import ACTIVATIONS

ROUTER_MODES = ("learned", "hash", "random")


class Top1Router(nn.Module):
    """Top-1 routing of (T, H) tokens over E experts, returning a :class:`~modekernels.Routing`.

    Modes:
        ``"learned"``: Switch-style, logits = x·Wᵀ (no bias) through :func:`modekernels.route_top1`,
            with its balance and z losses and optional capacity dropping. ``jitter`` > 0
            multiplies x by noise drawn uniformly from [1 - jitter, 1 + jitter] in training.
        ``"hash"``: MoEBERT's fixed random vocabulary → expert table (``vocab_size`` entries,
            from ``seed``), or a hash of the id when ``vocab_size`` is None; needs token ids.
        ``"random"``: a fresh uniform draw of each token's expert on every call (stochastic
            routing); gate 1, no losses.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        *,
        mode: str = "learned",
        jitter: float = 0.0,
        capacity_factor: float | None = None,
        vocab_size: int | None = None,
        seed: int = 0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if mode not in ROUTER_MODES:
            raise ValueError(f"mode must be one of {ROUTER_MODES}, got {mode!r}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.mode, self.num_experts = mode, num_experts
        self.jitter, self.capacity_factor = jitter, capacity_factor
        self.proj = None
        if mode == "learned":
            self.proj = nn.Linear(hidden_size, num_experts, bias=False, device=device, dtype=dtype)
        table = None
        if mode == "hash" and vocab_size is not None:
            table = make_hash_table(vocab_size, num_experts, seed=seed).to(device)
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        """x (T, H); token_ids (T,) for the hash mode."""
        if self.mode == "learned":
            if self.training and self.jitter > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            return route_top1(self.proj(x), capacity_factor=self.capacity_factor)
        if self.mode == "hash":
            if token_ids is None:
                raise ValueError("a hash router needs token_ids")
            return hash_route(token_ids, self.num_experts, self.table, gate_dtype=x.dtype)
        # random: a hash route through a table drawn for this call, one entry per token
        draw = torch.randint(self.num_experts, (x.shape[0],), device=x.device)
        positions = torch.arange(x.shape[0], device=x.device)
        return hash_route(positions, self.num_experts, draw, gate_dtype=x.dtype)

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, num_experts={self.num_experts}, jitter={self.jitter}, "
                f"capacity_factor={self.capacity_factor}")


class GroupedExperts(nn.Module):
    """E expert MLPs of one shape, run together by :func:`modekernels.moe_mlp`.

    Parameters: ``w1`` (E, H, I), or (E, H, 2·I) when ``gated`` (gate half first); ``w2``
    (E, I, H); ``b1``, ``b2`` when ``bias``. Initialised as ``nn.Linear`` (uniform ±1/√fan_in).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        activation: str = "gelu",
        gated: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation, self.gated = activation, gated
        n1 = 2 * intermediate_size if gated else intermediate_size
        factory = dict(device=device, dtype=dtype)
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_size, n1, **factory))
        self.w2 = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size, **factory))
        self.b1 = nn.Parameter(torch.empty(num_experts, n1, **factory)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, hidden_size, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight, bias in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1 / math.sqrt(weight.shape[1])
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)

    def forward(
        self,
        x: torch.Tensor,
        expert_idx: torch.Tensor,
        gate: torch.Tensor,
        sorted_slots: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (T, H); expert_idx and gate (T,) or (T, k). ``sorted_slots``: the (perm, offs) of a
        :class:`~modekernels.Routing`, which saves sorting again (and skips dropped tokens)."""
        options = dict(activation=self.activation, gated=self.gated, b1=self.b1, b2=self.b2)
        if sorted_slots is None:
            return moe_mlp(x, expert_idx, gate, self.w1, self.w2, **options)
        perm, offs = sorted_slots
        top_k = expert_idx.shape[1] if expert_idx.dim() == 2 else 1
        return moe_mlp_sorted(x, perm, offs, gate.reshape(x.shape[0], top_k), self.w1, self.w2,
                              **options)

    def extra_repr(self) -> str:
        return (f"num_experts={self.w1.shape[0]}, hidden_size={self.w1.shape[1]}, intermediate_size={self.w2.shape[1]}, "
                f"activation={self.activation}, gated={self.gated}, "
                f"bias={self.b1 is not None}")


class MoEOutput(NamedTuple):
    """:class:`MoEMLP`'s result: the output, shaped like the input, and the router's losses
    (float32 scalars; zero for hash and random routing)."""

    output: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor


class MoEMLP(nn.Module):
    """A top-1 mixture-of-experts FFN: :class:`Top1Router` then :class:`GroupedExperts`.

    ``forward(x (..., H), token_ids=None)`` returns :class:`MoEOutput`; add
    ``aux_coef·aux_loss + z_coef·z_loss`` to the training loss.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        *,
        activation: str = "gelu",
        gated: bool = False,
        bias: bool = True,
        router: str = "learned",
        jitter: float = 0.0,
        capacity_factor: float | None = None,
        vocab_size: int | None = None,
        seed: int = 0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.router = Top1Router(hidden_size, num_experts, mode=router, jitter=jitter,
                                 capacity_factor=capacity_factor, vocab_size=vocab_size, seed=seed,
                                 device=device, dtype=dtype)
        self.experts = GroupedExperts(num_experts, hidden_size, intermediate_size,
                                      activation=activation, gated=gated, bias=bias,
                                      device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> MoEOutput:
        flat = x.reshape(-1, x.shape[-1])
        ids = None if token_ids is None else token_ids.reshape(-1)
        routing = self.router(flat, ids)
        y = self.experts(flat, routing.expert_idx, routing.gate, (routing.perm, routing.offs))
        return MoEOutput(y.view_as(x), routing.aux_loss, routing.z_loss)
