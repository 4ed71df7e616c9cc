"""Bottleneck adapters after each chosen FFN's output: h + B(act(A h)).

The plain baseline the neutral residues are compared against. The adapter is
:class:`modekernels.nn.Adapter`; its up-projection starts at zero, so outputs equal the base
model's right after :func:`add_adapters`.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from modekernels._checks import check_positive_int
from modekernels.hf import surgery

__all__ = ["PostFFNAdapter", "add_adapters"]


class PostFFNAdapter(nn.Module):
    """``forward(x, h) -> h + adapter(h)``: an adapter (or adapter mixture) on the FFN output h."""

    def __init__(self, adapter: nn.Module):
        super().__init__()
        self.adapter = adapter

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.adapter(h, residual=h)


def _build(model: nn.Module, layer: int, options: dict) -> nn.Module:
    from modekernels.nn import Adapter

    return PostFFNAdapter(Adapter(surgery.hidden_size(model), options["d_adapter"], options["activation"]))


METHOD = surgery.register_method(surgery.Method("adapter", "ffn", _build))


def add_adapters(
    model: nn.Module,
    d_adapter: int,
    *,
    activation: str = "gelu",
    layers: Optional[Iterable[int]] = None,
    freeze_base: bool = True,
) -> surgery.SurgeryReport:
    """Add a bottleneck :class:`~modekernels.nn.Adapter` (width ``d_adapter``) after the FFN
    output of each chosen block (all when ``layers`` is None) of ``model``, in place. With
    ``freeze_base`` only the adapters train. Undo with :func:`unpatch`."""
    check_positive_int("d_adapter", d_adapter)
    options = {"d_adapter": d_adapter, "activation": activation}
    return surgery.apply(model, METHOD, layers, options, freeze_base)
