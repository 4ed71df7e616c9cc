"""``torch.nn`` modules on the modekernels ops: the neutral residue, bottleneck adapters,
mixture-of-experts layers (router, grouped experts, MoE FFN, expert-parallel experts) and stacked
modules (E identical modules run as one, their linear layers as grouped GEMMs)."""

from modekernels.nn.adapters import Adapter, AdapterMixture
from modekernels.nn.expert_parallel import ExpertParallelExperts
from modekernels.nn.moe import GroupedExperts, MoEMLP, MoEOutput, Top1Router
from modekernels.nn.neutral_residue import NeutralResidue, neutral_residue_loss
from modekernels.nn.stacked import Grouping, StackedModules

__all__ = [
    "Adapter",
    "AdapterMixture",
    "ExpertParallelExperts",
    "GroupedExperts",
    "Grouping",
    "MoEMLP",
    "MoEOutput",
    "NeutralResidue",
    "StackedModules",
    "Top1Router",
    "neutral_residue_loss",
]
