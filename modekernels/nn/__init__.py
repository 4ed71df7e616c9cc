"""``torch.nn`` modules on the modekernels ops: the neutral residue, bottleneck adapters,
mixture-of-experts layers (router, grouped experts, MoE FFN) and stacked modules (E identical
modules run as one, their linear layers as grouped GEMMs)."""

from modekernels.nn.adapters import Adapter, AdapterMixture
from modekernels.nn.moe import GroupedExperts, MoEMLP, MoEOutput, Top1Router
from modekernels.nn.neutral_residue import NeutralResidue, neutral_residue_loss
from modekernels.nn.stacked import Grouping, StackedModules

__all__ = [
    "Adapter",
    "AdapterMixture",
    "GroupedExperts",
    "Grouping",
    "MoEMLP",
    "MoEOutput",
    "NeutralResidue",
    "StackedModules",
    "Top1Router",
    "neutral_residue_loss",
]
