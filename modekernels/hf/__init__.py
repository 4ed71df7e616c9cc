"""modekernels on Hugging Face models: model surgery on instances (MoEBERT ``moefy``, neutral
residues, adapters, AdaMix, MoDE domain experts), ``unpatch``, saving, loading and porting only
the added modules, and :func:`register` (run on import), which adds ``"modekernels"`` to
transformers' ``ExpertsInterface``."""

from modekernels.hf.adamix import add_adamix, merge_adamix
from modekernels.hf.adapters import add_adapters
from modekernels.hf.domain_experts import add_domain_experts, compose, train_domain
from modekernels.hf.experts import register
from modekernels.hf.importance import (
    compute_ffn_importance,
    layerwise_distillation_loss,
    per_example_loss,
)
from modekernels.hf.modules_io import PortReport, load_modules, port_modules, save_modules
from modekernels.hf.moefy import moe_losses, moefy
from modekernels.hf.neutral_residues import add_neutral_residues, neutral_residue_loss
from modekernels.hf.surgery import SurgeryReport, added_modules, detect_family, unpatch

__all__ = [
    "PortReport",
    "SurgeryReport",
    "add_adamix",
    "add_adapters",
    "add_domain_experts",
    "add_neutral_residues",
    "added_modules",
    "compose",
    "compute_ffn_importance",
    "detect_family",
    "layerwise_distillation_loss",
    "load_modules",
    "merge_adamix",
    "moe_losses",
    "moefy",
    "neutral_residue_loss",
    "per_example_loss",
    "port_modules",
    "register",
    "save_modules",
    "train_domain",
    "unpatch",
]

register()  # experts_implementation="modekernels" for transformers' MoE models
