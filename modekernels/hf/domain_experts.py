"""MoDE (modular domain experts): domain experts beside chosen blocks of a frozen backbone.

Beside block b, each domain j has an expert f_j made of ``layers_per_expert`` transformer layers
of the host's own kind (initialised as copies of blocks b, b+1, … of the backbone), and a gate
mixes the block's output with the experts': y = a_bb·f_bb(x) + Σ_j a_j·f_j(x),
a = softmax(W x + c) over the backbone and the *active* experts (the others get weight exactly
zero). Right after :func:`add_domain_experts` no expert is active, so outputs equal the base
model's. :func:`train_domain` activates one expert and makes only it trainable (stage 1);
:func:`compose` activates all experts and trains experts and gates (stage 2).

A batch may mix domains: pass ``domain_ids`` (B,) to the model's forward; sequence i then mixes the backbone with expert ``domain_ids[i]`` only
(-1: the backbone alone). The expert layers run without the KV cache: generate with
``use_cache=False``.
"""

from __future__ import annotations

import inspect
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from modekernels.hf import surgery

__all__ = ["DomainExperts", "add_domain_experts", "compose", "train_domain"]


class DomainExperts(nn.Module):
    """The domain experts and the gate beside one block.

    ``forward(x, y, *block_args, **block_kwargs)``: x (B, T, d) the block input, y the block's
    output; returns the gated mixture. ``active`` (a Python list of domain names) says which
    experts take part; ``domain_ids`` (B,) int64 or None routes sequences to one domain each.
    """

    def __init__(self, domains: Sequence[str], experts: Sequence[Sequence[nn.Module]], d_model: int):
        super().__init__()
        self.domains = list(domains)
        self.experts = nn.ModuleDict({name: nn.ModuleList(layers) for name, layers in zip(domains, experts)})
        self.gate = nn.Linear(d_model, 1 + len(self.domains))
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.active: list = []
        self.domain_ids: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return f"domains={self.domains}, active={self.active}"

    def _run_expert(self, name: str, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        h = x
        for layer in self.experts[name]:
            bound = inspect.signature(layer.forward).bind_partial(h, *args, **kwargs)
            for key, value in (("past_key_values", None), ("use_cache", False)):
                if key in bound.arguments:
                    bound.arguments[key] = value
            h = layer(*bound.args, **bound.kwargs)
            h = h[0] if isinstance(h, tuple) else h
        return h

    def forward(self, x: torch.Tensor, y, *args, **kwargs):
        if not self.active:
            return y
        y_bb = y[0] if isinstance(y, tuple) else y
        logits = self.gate(x)
        allowed = torch.zeros(1 + len(self.domains), dtype=torch.bool, device=x.device)
        allowed[0] = True
        for name in self.active:
            allowed[1 + self.domains.index(name)] = True
        allowed = allowed.expand(logits.shape)
        if self.domain_ids is not None:
            ids = self.domain_ids.to(x.device).view(-1, *([1] * (logits.dim() - 1)))
            column = torch.arange(logits.shape[-1], device=x.device) - 1
            allowed = allowed & ((column == ids) | (column == -1))
        a = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).to(y_bb.dtype)
        out = a[..., :1] * y_bb
        for name in self.active:
            j = 1 + self.domains.index(name)
            out = out + a[..., j : j + 1] * self._run_expert(name, x, args, kwargs)
        return (out, *y[1:]) if isinstance(y, tuple) else out


def _build(model: nn.Module, layer: int, options: dict) -> nn.Module:
    _, block_list = surgery.blocks(model)
    n = len(block_list)
    experts = []
    for _ in options["domains"]:
        layers = []
        for k in range(options["layers_per_expert"]):
            source = surgery.unwrap(block_list[min(layer + k, n - 1)])
            copy = type(source)(model.config, layer_idx=layer)
            wanted = copy.state_dict()
            copy.load_state_dict({key: v for key, v in source.state_dict().items() if key in wanted})
            layers.append(copy)
        experts.append(layers)
    surgery.ensure_forward_pre_hook(model, _route_hook)
    return DomainExperts(options["domains"], experts, surgery.hidden_size(model))


METHOD = surgery.register_method(surgery.Method("domain_experts", "block", _build))


def _experts(model: nn.Module) -> list:
    found = list(surgery.added_modules(model, METHOD.name).values())
    if not found:
        raise ValueError("the model has no domain experts: call add_domain_experts first")
    return found


def add_domain_experts(
    model: nn.Module,
    domains: Sequence[str],
    *,
    layers_per_expert: int = 2,
    blocks: Optional[Iterable[int]] = None,
    freeze_base: bool = True,
) -> surgery.SurgeryReport:
    """Add one expert per name in ``domains`` beside each chosen block (all when ``blocks`` is
    None) of ``model``, in place: ``layers_per_expert`` layers of the host's block class,
    initialised from the backbone's blocks, and a zero-initialised softmax gate. No expert is
    active yet, so outputs equal the base model's. The model's forward accepts ``domain_ids``.
    Undo with :func:`unpatch`."""
    domains = list(domains)
    if not domains or len(set(domains)) != len(domains) or not all(isinstance(d, str) for d in domains):
        raise ValueError(f"domains must be distinct names, got {domains!r}")
    if not isinstance(layers_per_expert, int) or layers_per_expert < 1:
        raise ValueError(f"layers_per_expert must be a positive int, got {layers_per_expert!r}")
    options = {"domains": domains, "layers_per_expert": layers_per_expert}
    return surgery.apply(model, METHOD, blocks, options, freeze_base)


def _route_hook(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: take ``domain_ids`` out of the model's keyword arguments and hand it
    to every block's experts (None when absent: all active experts for every token)."""
    ids = kwargs.pop("domain_ids", None)
    if ids is not None and not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(ids)
    for experts in surgery.added_modules(model, METHOD.name).values():
        experts.domain_ids = ids
    return args, kwargs


def _set_trainable(model: nn.Module, active: list, train_gates: bool) -> int:
    model.requires_grad_(False)
    for experts in _experts(model):
        experts.active = list(active)
        for name in active:
            experts.experts[name].requires_grad_(True)
        experts.gate.requires_grad_(train_gates)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_domain(model: nn.Module, name: str) -> int:
    """Stage 1: activate only the expert of domain ``name`` in every patched block and make only
    its layers trainable (backbone, gates and other experts frozen). Returns the number of
    trainable parameters."""
    domains = _experts(model)[0].domains
    if name not in domains:
        raise ValueError(f"unknown domain {name!r}; the experts are for {domains}")
    return _set_trainable(model, [name], train_gates=False)


def compose(model: nn.Module) -> int:
    """Stage 2: activate every expert and make all experts and gates trainable (backbone
    frozen). Returns the number of trainable parameters."""
    return _set_trainable(model, list(_experts(model)[0].domains), train_gates=True)
