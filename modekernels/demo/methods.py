"""The adaptation methods the demo and ``modekernels adapt`` compare, one function each.

Each function takes a pretrained causal LM (changed in place, so pass a copy) and
:class:`MethodOptions`, and returns an :class:`Adapted`: the model to train, what trains, the
extra loss and forward inputs the method needs, what to do after training (AdaMix merges its
adapters) and how to save what it added. LoRA, the adapters, the neutral residues and AdaMix
are sized to add about ``options.ratio`` × the base model's parameters, so they compare at equal
size. MoDE cannot be sized that way: its expert is ``mode_layers`` whole transformer layers
(copies of the backbone's blocks), which on the demo's models of a few layers adds about half
of the base or more; MoEBERT's experts re-cut the dense FFNs. Compare those two with the others
by the added-parameter column of the results.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch
from torch import nn

from modekernels.demo.corpora import Corpus
from modekernels.demo.train import TrainResult, TrainSettings, batches, train

__all__ = [
    "DEMO_METHODS",
    "METHODS",
    "Adapted",
    "MethodOptions",
    "adapt_and_train",
    "adapt_with",
    "added_parameter_count",
]


@dataclass(frozen=True)
class MethodOptions:
    """``ratio``: added parameters as a fraction of the base model's (module-based methods);
    ``alpha``: weight of the neutral-residue ℓ1 loss on original-domain tokens;
    ``adamix_copies``: adapters per AdaMix mixture; ``mode_layers``: layers of the MoDE expert;
    ``moe_experts``, ``moe_shared``: experts per FFN and the fraction of its neurons all of them
    share (MoEBERT), ``moe_balance``: weight of the routers' balance loss;
    ``lr``: learning rate per method (``default_lr`` for the others)."""

    ratio: float = 0.1
    alpha: float = 2.0
    adamix_copies: int = 4
    mode_layers: int = 2
    moe_experts: int = 4
    moe_shared: float = 0.125
    moe_balance: float = 0.01
    default_lr: float = 2e-3
    lr: dict = field(default_factory=lambda: {"full": 5e-4, "mode": 1e-3, "moefy": 1e-3})

    def lr_for(self, method: str) -> float:
        return self.lr.get(method, self.default_lr)


@dataclass
class Adapted:
    """A model made ready for one method's training.

    ``parameters``: what trains; ``added_parameters``: parameters the method adds at inference
    (0 for full fine-tuning); ``extra_loss(model, original_mask)``: added to the LM loss;
    ``inputs(original_mask)``: extra keyword arguments of the model's forward for a batch whose
    (B, T) mask marks original-domain tokens; ``finish()``: runs after training, before
    evaluation; ``save(directory)``: writes what the method added; ``note``: one line on how it
    was set up."""

    method: str
    model: nn.Module
    parameters: list
    added_parameters: int
    lr: float
    save: Callable[[str], None]
    note: str
    extra_loss: Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]] = None
    inputs: Optional[Callable[[torch.Tensor], dict]] = None
    finish: Optional[Callable[[], None]] = None


def base_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def added_parameter_count(model: nn.Module, apply: Callable[[nn.Module], int]) -> int:
    """Parameters that ``apply(copy)`` adds to a copy of ``model`` (``apply`` returns the count)."""
    return apply(copy.deepcopy(model))


def _width_for(model: nn.Module, target: int, count: Callable[[nn.Module, int], int]) -> int:
    """The width w ≥ 1 whose ``count(copy_of_model, w)`` (affine in w) comes closest to ``target``."""
    one = added_parameter_count(model, lambda m: count(m, 1))
    two = added_parameter_count(model, lambda m: count(m, 2))
    return max(1, round((target - one) / max(two - one, 1)) + 1)


def _save_modules(model: nn.Module) -> Callable[[str], None]:
    from modekernels.hf import save_modules

    return lambda directory: save_modules(model, directory)


def _new_parameters(model: nn.Module) -> list:
    return [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- the methods


def full(model: nn.Module, options: MethodOptions, sample: torch.Tensor) -> Adapted:
    """Full fine-tuning: every parameter trains; nothing is added."""
    model.requires_grad_(True)
    return Adapted(
        "full", model, list(model.parameters()), 0, options.lr_for("full"),
        save=lambda directory: model.save_pretrained(directory),
        note="all parameters train",
    )


def _lora_targets(model: nn.Module) -> tuple[list, bool]:
    """Leaf names of the linear layers inside the transformer blocks (not the embeddings or the
    LM head), and whether they are GPT-2 ``Conv1D`` layers (weights stored transposed)."""
    from transformers.pytorch_utils import Conv1D

    from modekernels.hf.surgery import blocks

    _, block_list = blocks(model)
    names, conv1d = set(), False
    for name, module in block_list.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)):
            names.add(name.rsplit(".", 1)[-1])
            conv1d = conv1d or isinstance(module, Conv1D)
    return sorted(names), conv1d


def _lora_model(model: nn.Module, rank: int):
    from peft import LoraConfig, get_peft_model

    targets, conv1d = _lora_targets(model)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=conv1d)
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config), targets


def lora(model: nn.Module, options: MethodOptions, sample: torch.Tensor) -> Adapted:
    """LoRA (PEFT) on every linear layer of the attention and FFN, rank sized to ``ratio``."""
    target = round(options.ratio * base_parameter_count(model))
    rank = _width_for(model, target, lambda m, r: sum(p.numel() for p in _new_parameters(_lora_model(m, r)[0])))
    peft_model, targets = _lora_model(model, rank)
    trainable = _new_parameters(peft_model)
    return Adapted(
        "lora", peft_model, trainable, sum(p.numel() for p in trainable), options.lr_for("lora"),
        save=lambda directory: peft_model.save_pretrained(directory),
        note=f"PEFT LoRA rank {rank} on {', '.join(targets)}",
    )


def adapter(model: nn.Module, options: MethodOptions, sample: torch.Tensor) -> Adapted:
    """A bottleneck adapter after each FFN (``add_adapters``), width sized to ``ratio``."""
    from modekernels.hf import add_adapters

    target = round(options.ratio * base_parameter_count(model))
    width = _width_for(model, target, lambda m, w: add_adapters(m, w).added_parameters)
    report = add_adapters(model, width)
    return Adapted(
        "adapter", model, _new_parameters(model), report.added_parameters, options.lr_for("adapter"),
        save=_save_modules(model), note=f"bottleneck width {width} after each FFN",
    )


def neutral_residues(model: nn.Module, options: MethodOptions, sample: torch.Tensor) -> Adapted:
    """Neutral residues (``add_neutral_residues`` sized by ``ratio``) with the ℓ1 loss
    α·mean‖adapter out‖₁/d on the original-domain tokens of each batch."""
    from modekernels.hf import add_neutral_residues, neutral_residue_loss

    report = add_neutral_residues(model, ratio=options.ratio)
    alpha = options.alpha
    return Adapted(
        "neutral-residues", model, _new_parameters(model), report.added_parameters,
        options.lr_for("neutral-residues"), save=_save_modules(model),
        extra_loss=lambda m, original_mask: alpha * neutral_residue_loss(m, original_mask),
        note=f"gated residue width {report.options['d_adapter']} beside each FFN, l1 alpha {alpha}",
    )


def adamix(model: nn.Module, options: MethodOptions, sample: torch.Tensor) -> Adapted:
    """AdaMix: ``adamix_copies`` adapters per FFN, one drawn at random per training forward,
    merged by averaging before evaluation (``merge_adamix``); a copy's width is sized so the
    merged adapters add ``ratio`` × the base."""
    from modekernels.hf import add_adamix, merge_adamix

    target = round(options.ratio * base_parameter_count(model))
    copies = options.adamix_copies
    width = _width_for(model, target, lambda m, w: add_adamix(m, 1, w).added_parameters)
    training = add_adamix(model, copies, width)
    adapted = Adapted(
        "adamix", model, _new_parameters(model), training.added_parameters, options.lr_for("adamix"),
        save=_save_modules(model), note=f"{copies} adapters of width {width} per FFN, merged for evaluation",
    )

    def finish() -> None:
        adapted.added_parameters = merge_adamix(model).added_parameters

    adapted.finish = finish
    return adapted


def mode(model: nn.Module, options: MethodOptions, sample: torch.Tensor) -> Adapted:
    """MoDE stage 1: one domain expert of ``mode_layers`` layers beside the middle block
    (``add_domain_experts`` then ``train_domain``); each sequence carries its domain label, so
    original-domain sequences run on the backbone alone and new-domain ones mix in the expert."""
    from modekernels.hf import add_domain_experts, train_domain
    from modekernels.hf.surgery import blocks

    _, block_list = blocks(model)
    middle = len(block_list) // 2
    report = add_domain_experts(model, ["new"], layers_per_expert=options.mode_layers, blocks=[middle])
    train_domain(model, "new")

    def inputs(original_mask: torch.Tensor) -> dict:
        # domain id per sequence: -1 (the backbone alone) for original-domain rows, 0 otherwise
        return {"domain_ids": original_mask[:, 0].long().neg()}

    return Adapted(
        "mode", model, _new_parameters(model), report.added_parameters, options.lr_for("mode"),
        save=_save_modules(model), inputs=inputs,
        note=f"one {options.mode_layers}-layer expert beside block {middle}, routed by domain label",
    )


def moefy(model: nn.Module, options: MethodOptions, sample: torch.Tensor) -> Adapted:
    """MoEBERT: each FFN split into ``moe_experts`` experts sharing its weights (neurons ranked by
    importance on the ``sample`` blocks, the top ``moe_shared`` fraction shared by all), top-1
    learned routing plus ``moe_balance`` × the balance loss. Experts and routers train, the rest
    stays frozen, so the checkpoint plus the saved modules rebuild the model (MoEBERT's
    layer-wise distillation from the dense teacher is left out)."""
    from modekernels.hf import compute_ffn_importance, moe_losses
    from modekernels.hf import moefy as split_ffns
    from modekernels.hf.surgery import blocks, detect_family

    _, block_list = blocks(model)
    d_ff = detect_family(model).dense_ffn(block_list[0]).d_ff
    importance = compute_ffn_importance(model, [{"input_ids": sample}])
    shared = int(options.moe_shared * d_ff)
    report = split_ffns(model, options.moe_experts, shared_neurons=shared, importance=importance)
    weight = options.moe_balance
    return Adapted(
        "moefy", model, _new_parameters(model), report.added_parameters, options.lr_for("moefy"),
        save=_save_modules(model), extra_loss=lambda m, original_mask: weight * moe_losses(m)[0],
        note=f"{options.moe_experts} experts of {report.options['expert_dim']} neurons per FFN "
        f"({shared} shared), top-1 routing",
    )


METHODS: dict[str, Callable[[nn.Module, MethodOptions, torch.Tensor], Adapted]] = {
    "full": full,
    "lora": lora,
    "adapter": adapter,
    "neutral-residues": neutral_residues,
    "adamix": adamix,
    "mode": mode,
    "moefy": moefy,
}


# The methods the demo compares (``modekernels adapt`` accepts every name in METHODS).
DEMO_METHODS = ("full", "lora", "adapter", "neutral-residues", "adamix", "mode")


def adapt_with(method: str, model: nn.Module, options: MethodOptions, sample: torch.Tensor) -> Adapted:
    """Prepare ``model`` (in place) for ``method``, one of :data:`METHODS`; ``sample``: a few
    new-domain blocks (B, T) for methods that look at data first (MoEBERT's importance)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    return METHODS[method](model, options, sample)


def adapt_and_train(
    method: str,
    model: nn.Module,
    options: MethodOptions,
    new: Corpus,
    original: Optional[Corpus],
    settings: TrainSettings,
    mix: float,
    generator: torch.Generator,
    *,
    device: torch.device,
    progress: bool = True,
) -> tuple[Adapted, TrainResult]:
    """Apply ``method`` to ``model``, train what it added on batches of ``new`` (a ``mix``
    fraction of the rows from ``original``) with ``settings`` at the method's learning rate,
    then finish it (AdaMix merges, for example)."""
    adapted = adapt_with(method, model, options, new.train[:8].to(device))
    settings = replace(settings, lr=adapted.lr)
    run = train(
        adapted.model, adapted.parameters, batches(new, original, settings.batch_size, mix, generator),
        settings, device=device, desc=f"adapt: {method}", extra_loss=adapted.extra_loss,
        inputs=adapted.inputs, progress=progress,
    )
    if adapted.finish is not None:
        adapted.finish()
    return adapted, run
