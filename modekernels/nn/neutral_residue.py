"""The neutral residue module (a gated adapter beside the FFN) and its ℓ1 loss."""

from __future__ import annotations

import math

import torch
from torch import nn

from modekernels._checks import check_flag, check_option, check_positive_int
from modekernels.ops.neutral_residue import neutral_residue
from modekernels.reference.moe_mlp import ACTIVATIONS
from modekernels.reference.neutral_residue import GATES


class NeutralResidue(nn.Module):
    """y = g(x)·W_out(act(W_in x + b_in) ⊙ (W_glu x + b_glu)) + the residual, on the fused op.

    Parameters: w_in, w_glu (d_adapter, d_model) (w_glu only with ``glu``), b_in, b_glu
    (d_adapter,), w_out (d_model, d_adapter), b_out (d_model,), and with a gate w_gate
    (d_model,), b_gate (1,) (passed to the op as its () scalar; FSDP2's ``fully_shard`` cannot
    shard 0-d parameters). The paper's initialisation: W_out = 0 and b_out = 0, so the output is
    exactly zero at initialisation; w_in, w_glu and w_gate ~ N(0, 1/(d_model·num_layers));
    the other biases zero. d_model, d_adapter and num_layers must be positive ints, activation
    one of the op's activations, gate one of its gates, glu and sparse bools (checked here).

    ``forward(x, residual=None)`` with x (..., d_model) returns the op's (y (..., d_model),
    g (...) float32, l1 (...) float32 = ‖y - residual‖₁ per token). With ``sparse`` set, rows
    whose gate is exactly zero skip the adapter's GEMMs (same output).
    """

    def __init__(
        self,
        d_model: int,
        d_adapter: int,
        *,
        num_layers: int = 1,
        activation: str = "silu",
        glu: bool = True,
        gate: str = "relu",
        sparse: bool = False,
    ):
        for name, value in (("d_model", d_model), ("d_adapter", d_adapter),
                            ("num_layers", num_layers)):
            check_positive_int(name, value)
        check_option("activation", activation, ACTIVATIONS)
        check_option("gate", gate, GATES)
        check_flag("glu", glu)
        check_flag("sparse", sparse)
        super().__init__()
        self.d_model, self.d_adapter = d_model, d_adapter
        self.activation, self.gate, self.sparse = activation, gate, sparse
        std = math.sqrt(1.0 / (d_model * num_layers))
        self.w_in = nn.Parameter(torch.randn(d_adapter, d_model) * std)
        self.b_in = nn.Parameter(torch.zeros(d_adapter))
        self.w_glu = nn.Parameter(torch.randn(d_adapter, d_model) * std) if glu else None
        self.b_glu = nn.Parameter(torch.zeros(d_adapter)) if glu else None
        self.w_out = nn.Parameter(torch.zeros(d_model, d_adapter))
        self.b_out = nn.Parameter(torch.zeros(d_model))
        gated = gate != "none"
        self.w_gate = nn.Parameter(torch.randn(d_model) * std) if gated else None
        self.b_gate = nn.Parameter(torch.zeros(1)) if gated else None

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lead = x.shape[:-1]
        y, g, l1 = neutral_residue(
            x.reshape(-1, x.shape[-1]),
            self.w_in,
            self.w_glu,
            self.w_out,
            self.w_gate,
            None if self.b_gate is None else self.b_gate.view(()),
            b_in=self.b_in,
            b_glu=self.b_glu,
            b_out=self.b_out,
            residual=None if residual is None else residual.reshape(-1, residual.shape[-1]),
            activation=self.activation,
            gate=self.gate,
            sparse=self.sparse,
        )
        return y.view(*lead, y.shape[-1]), g.view(lead), l1.view(lead)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_adapter={self.d_adapter}, activation={self.activation}, "
            f"glu={self.w_glu is not None}, gate={self.gate}, sparse={self.sparse}"
        )


def neutral_residue_loss(l1: torch.Tensor, mask: torch.Tensor, d_model: int) -> torch.Tensor:
    """mean over the tokens where ``mask`` is true of l1 / d_model: the neutral-residue loss.

    l1: the op's per-token ‖y‖₁ (any shape); mask: bool of l1's shape, true for
    original-domain tokens; d_model a positive int. Zero, with a gradient path, when no token
    is marked. No host sync.
    """
    check_positive_int("d_model", d_model)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
    if mask.shape != l1.shape:
        raise ValueError(
            f"mask must have l1's shape {tuple(l1.shape)} (one flag per token), "
            f"got {tuple(mask.shape)}"
        )
    if mask.device != l1.device:
        raise ValueError(f"mask must be on {l1.device} like l1, got {mask.device}")
    weights = mask.to(l1.dtype)
    return (l1 * weights).sum() / (d_model * weights.sum().clamp_min(1))
