"""Neutral residues: a gated adapter in parallel with each chosen FFN.

out = FFN(x) + g(x)·W_o(σ(W_g x) ⊙ W_i x), with W_o = 0 at init, so a patched model's outputs
equal the base model's bit for bit until it trains. The adapter is
:class:`modekernels.nn.NeutralResidue`; each branch keeps the gate and per-token ℓ1 of its last
forward for :func:`neutral_residue_loss`.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from modekernels._checks import check_positive_int
from modekernels.hf import surgery

__all__ = ["NeutralResidueBranch", "add_neutral_residues", "neutral_residue_loss"]


class NeutralResidueBranch(nn.Module):
    """``forward(x, h) -> h + y`` with y the residue's output on the FFN input x (…, d), the sum
    fused into the residue's op.

    After a forward, ``last_gate`` and ``last_l1`` hold the gate and ‖y‖₁ per token, shaped
    like x without its last dimension.
    """

    def __init__(self, residue: nn.Module):
        super().__init__()
        self.residue = residue
        self.last_gate: Optional[torch.Tensor] = None
        self.last_l1: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        out, self.last_gate, self.last_l1 = self.residue(x, residual=h)
        return out


def _residue(d_model: int, d_adapter: int, options: dict) -> nn.Module:
    from modekernels.nn import NeutralResidue

    return NeutralResidue(
        d_model, d_adapter, num_layers=options["num_layers"], activation=options["activation"],
        glu=options["glu"], gate=options["gate"], sparse=options["sparse"],
    )


def _build(model: nn.Module, layer: int, options: dict) -> nn.Module:
    return NeutralResidueBranch(_residue(surgery.hidden_size(model), options["d_adapter"], options))


METHOD = surgery.register_method(surgery.Method("neutral_residue", "ffn", _build))


def _size_for_ratio(model: nn.Module, ratio: float, num_blocks: int, options: dict) -> int:
    """The adapter width whose residues on ``num_blocks`` blocks add ``ratio`` × the model's
    parameters (a residue's size is affine in its width)."""
    d = surgery.hidden_size(model)
    one, two = (sum(p.numel() for p in _residue(d, a, options).parameters()) for a in (1, 2))
    base = sum(p.numel() for p in model.parameters())
    per_block = ratio * base / num_blocks
    return max(1, round((per_block - one) / (two - one)) + 1)


def add_neutral_residues(
    model: nn.Module,
    *,
    d_adapter: Optional[int] = None,
    ratio: Optional[float] = None,
    layers: Optional[Iterable[int]] = None,
    gate: str = "relu",
    activation: str = "silu",
    glu: bool = True,
    sparse: bool = False,
    freeze_base: bool = True,
) -> surgery.SurgeryReport:
    """Add a :class:`~modekernels.nn.NeutralResidue` in parallel with the FFN of each chosen
    block (all blocks when ``layers`` is None) of ``model``, in place.

    Size the adapters with ``d_adapter`` (their hidden width) or ``ratio`` (their parameters as a
    fraction of the model's; the paper uses about 0.2, the default when neither is given).
    ``gate`` is the per-token gate's nonlinearity (``"none"``: no gate), ``activation`` and
    ``glu`` the adapter's, ``sparse`` lets rows whose gate is zero skip the adapter. With ``freeze_base`` only the residues train.
    Outputs equal the base model's right after this call. Undo with :func:`unpatch`.
    """
    if d_adapter is not None and ratio is not None:
        raise ValueError("give d_adapter or ratio, not both")
    chosen = surgery.resolve_layers(model, layers)
    _, block_list = surgery.blocks(model)
    options = {
        "num_layers": len(block_list), "activation": activation, "glu": bool(glu), "gate": gate,
        "sparse": bool(sparse),
    }
    if d_adapter is None:
        ratio = 0.2 if ratio is None else ratio
        if not ratio > 0:
            raise ValueError(f"ratio must be positive, got {ratio}")
        d_adapter = _size_for_ratio(model, ratio, len(chosen), options)
    check_positive_int("d_adapter", d_adapter)
    options["d_adapter"] = d_adapter
    return surgery.apply(model, METHOD, chosen, options, freeze_base)


def neutral_residue_loss(model: nn.Module, original_mask: torch.Tensor) -> torch.Tensor:
    """The neutral-residue ℓ1 term of the last forward: mean over the residues and over the
    original-domain tokens of ‖adapter output‖₁ / d_model.

    ``original_mask``: bool (B, T) marking original-domain tokens, or (B,) marking whole
    sequences. Add ``alpha * neutral_residue_loss(...)`` to the language-model loss: the demo
    finds α of order 1 to 3 (2 by default) cuts forgetting by two thirds or more against a plain
    adapter at nearly the same new-domain gain, while α = 0.01 leaves it unchanged.
    Zero (with a gradient path) when the batch holds no original-domain token.
    """
    from modekernels.nn import neutral_residue_loss as masked_l1

    d = surgery.hidden_size(model)
    terms = []
    for (l1,) in surgery.last_forward_terms(model, METHOD.name, ("last_l1",), "neutral residues"):
        mask = original_mask.to(device=l1.device, dtype=torch.bool)
        if mask.dim() == 1 and l1.dim() == 2 and mask.shape[0] == l1.shape[0]:
            mask = mask[:, None].expand_as(l1)
        if mask.shape != l1.shape:
            raise ValueError(
                f"original_mask must have shape {tuple(l1.shape)} (tokens) or ({l1.shape[0]},) "
                f"(sequences), got {tuple(original_mask.shape)}"
            )
        terms.append(masked_l1(l1, mask, d))
    return torch.stack(terms).mean()
