"""``torch.nn`` modules on the modekernels ops: the neutral residue, bottleneck adapters
and mixture-of-experts layers (router, grouped experts, MoE FFN)."""

from modekernels.nn.adapters import Adapter, AdapterMixture
from modekernels.nn.moe import GroupedExperts, MoEMLP, MoEOutput, Top1Router
from modekernels.nn.neutral_residue import NeutralResidue, neutral_residue_loss

__all__ = [
    "Adapter",
    "AdapterMixture",
    "GroupedExperts",
    "MoEMLP",
    "MoEOutput",
    "NeutralResidue",
    "Top1Router",
    "neutral_residue_loss",
]
