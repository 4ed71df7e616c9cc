"""Bottleneck adapters on the fused op: :class:`Adapter` and AdaMix's :class:`AdapterMixture`."""

from __future__ import annotations

import math

import torch
from torch import nn

from modekernels._checks import check_option, check_positive_int
from modekernels.ops.neutral_residue import neutral_residue
from modekernels.reference.moe_mlp import ACTIVATIONS


def _down_init(d_adapter: int, d_model: int, copies: tuple[int, ...] = ()) -> tuple:
    """nn.Linear's default initialisation of a down-projection (weight, bias)."""
    bound = 1.0 / math.sqrt(d_model)
    weight = torch.empty(*copies, d_adapter, d_model).uniform_(-bound, bound)
    bias = torch.empty(*copies, d_adapter).uniform_(-bound, bound)
    return nn.Parameter(weight), nn.Parameter(bias)


def _check_sizes(d_model: object, d_adapter: object, activation: object) -> None:
    check_positive_int("d_model", d_model)
    check_positive_int("d_adapter", d_adapter)
    check_option("activation", activation, ACTIVATIONS)


def _adapter(x, w_in, b_in, w_out, b_out, activation, residual):
    """x (..., d) -> residual + W_out act(W_in x + b_in) + b_out, on the fused op."""
    lead = x.shape[:-1]
    y, _, _ = neutral_residue(
        x.reshape(-1, x.shape[-1]), w_in, None, w_out, b_in=b_in, b_out=b_out,
        residual=None if residual is None else residual.reshape(-1, residual.shape[-1]),
        activation=activation,
    )
    return y.view(*lead, y.shape[-1])


class Adapter(nn.Module):
    """The plain bottleneck adapter x ↦ W_out act(W_in x + b_in) + b_out (+ residual).

    w_in (d_adapter, d_model) and b_in (d_adapter,) start as ``nn.Linear``'s; w_out
    (d_model, d_adapter) and b_out (d_model,) start at zero, so the output starts at zero.
    d_model and d_adapter must be positive ints, activation one of the op's activations.
    ``forward(x, residual=None)``: x (..., d_model) -> (..., d_model).
    """

    def __init__(self, d_model: int, d_adapter: int, activation: str = "gelu"):
        _check_sizes(d_model, d_adapter, activation)
        super().__init__()
        self.d_model, self.d_adapter, self.activation = d_model, d_adapter, activation
        self.w_in, self.b_in = _down_init(d_adapter, d_model)
        self.w_out = nn.Parameter(torch.zeros(d_model, d_adapter))
        self.b_out = nn.Parameter(torch.zeros(d_model))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return _adapter(x, self.w_in, self.b_in, self.w_out, self.b_out, self.activation, residual)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_adapter={self.d_adapter}, activation={self.activation}"


class AdapterMixture(nn.Module):
    """AdaMix: ``num_adapters`` copies of a bottleneck adapter, mixed by random routing.

    Parameters stack the copies: w_in (M, d_adapter, d_model), b_in (M, d_adapter), w_out
    (M, d_model, d_adapter), b_out (M, d_model); each copy initialised as an :class:`Adapter`.
    In training each forward draws one down-projection copy i and one up-projection copy j,
    uniformly and independently, for the whole batch (on the device, see
    :meth:`sample_copies`), and runs the adapter (w_in[i], b_in[i], w_out[j], b_out[j]); the
    copies not drawn get exactly zero gradient. In eval it runs the averaged weights
    (Ā = Σ_i A_i / M, likewise B̄ and the biases), which :meth:`merge` returns as an
    :class:`Adapter` with the same output.
    """

    def __init__(self, d_model: int, d_adapter: int, num_adapters: int, activation: str = "gelu"):
        _check_sizes(d_model, d_adapter, activation)
        check_positive_int("num_adapters", num_adapters)
        super().__init__()
        self.d_model, self.d_adapter, self.activation = d_model, d_adapter, activation
        self.num_adapters = num_adapters
        self.w_in, self.b_in = _down_init(d_adapter, d_model, (num_adapters,))
        self.w_out = nn.Parameter(torch.zeros(num_adapters, d_model, d_adapter))
        self.b_out = nn.Parameter(torch.zeros(num_adapters, d_model))

    def sample_copies(self) -> torch.Tensor:
        """(2,) int64 on the parameters' device: the down-projection copy and the up-projection
        copy, each uniform over the copies, from that device's default generator (seeded by
        ``torch.manual_seed``). A device tensor, so the training forward needs no host read and
        compiles into one graph (where the draw comes from the compiled graph's generator)."""
        return torch.randint(self.num_adapters, (2,), device=self.w_in.device)

    def averaged(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Ā, b̄_in, B̄, b̄_out): each stacked parameter summed over the copies, divided by M."""
        m = self.num_adapters
        return tuple(p.sum(dim=0) / m for p in (self.w_in, self.b_in, self.w_out, self.b_out))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            down, up = self.sample_copies().split(1)
            weights = tuple(
                p.index_select(0, copy)[0]
                for p, copy in ((self.w_in, down), (self.b_in, down), (self.w_out, up), (self.b_out, up))
            )
        else:
            weights = self.averaged()
        return _adapter(x, *weights, self.activation, residual)

    @torch.no_grad()
    def merge(self) -> Adapter:
        """An :class:`Adapter` holding the averaged weights, on the mixture's device and dtype;
        its output equals the mixture's eval output. Draws no random numbers (it is built on
        the meta device, so its initialisation runs nowhere)."""
        with torch.device("meta"):
            merged = Adapter(self.d_model, self.d_adapter, self.activation)
        merged.to_empty(device=self.w_in.device).to(self.w_in.dtype)
        for param, value in zip(
            (merged.w_in, merged.b_in, merged.w_out, merged.b_out), self.averaged()
        ):
            param.copy_(value)
        return merged

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_adapter={self.d_adapter}, "
            f"num_adapters={self.num_adapters}, activation={self.activation}"
        )
