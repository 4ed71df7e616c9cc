"""MoDE (modular domain experts): domain experts beside chosen blocks of a frozen backbone.

Beside block b, each domain j has an expert f_j made of ``layers_per_expert`` transformer layers
of the host's own kind (initialised as copies of blocks b, b+1, … of the backbone), and a gate
mixes the block's output with the experts': y = a_bb·f_bb(x) + Σ_j a_j·f_j(x),
a = softmax(W x + c) over the backbone and the *active* experts (the others get weight exactly
zero). Right after :func:`add_domain_experts` no expert is active, so outputs equal the base
model's. :func:`train_domain` activates one expert and makes only it trainable (stage 1);
:func:`compose` activates all experts and trains experts and gates (stage 2).

A batch may mix domains: pass ``domain_ids`` (B,) to the model's forward; sequence i then mixes
the backbone with expert ``domain_ids[i]`` only (-1: the backbone alone). Keep the ids on the CPU
(then sequences bound for no expert cost nothing; see :class:`DomainExperts`). The model's forward
takes ``domain_ids`` as a keyword argument of its signature (an instance attribute; the class is
untouched), so ``Trainer`` keeps a ``domain_ids`` dataset column with its default
``remove_unused_columns=True`` and ``generate(..., domain_ids=...)`` passes it to every step. The
experts of one block run together, each of their linear layers as one grouped GEMM over all
domains.

The expert layers use the KV cache as the backbone does: handed the model's cache
(``past_key_values``, as ``generate`` does by default), they keep their keys and values beside it
(:mod:`modekernels.hf.expert_cache`), so each decoding step runs them on its new tokens only.
Keep the active experts and ``domain_ids`` for the whole generation. Under activation
checkpointing (``gradient_checkpointing_enable``, before or after the surgery) each depth of the
expert layers is checkpointed as the backbone's blocks are.

The stage (which experts are active, and whether :func:`train_domain` or :func:`compose` set it)
is part of the options that :func:`~modekernels.hf.save_modules` writes; ``load_modules`` and
``port_modules`` restore it, with what trains.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from modekernels._checks import check_positive_int, values_visible
from modekernels.hf import surgery
from modekernels.hf.expert_cache import expert_layer_caches
from modekernels.nn.stacked import Grouping, StackedModules
from modekernels.ops.routing import sort_by_expert

__all__ = ["DomainExperts", "add_domain_experts", "compose", "train_domain"]


class DomainExperts(nn.Module):
    """The domain experts and the gate beside one block.

    ``forward(x, y, *block_args, **block_kwargs)``: x (B, T, d) the block input, y the block's
    output, the block's arguments (a KV cache among them reaches the experts as
    :mod:`~modekernels.hf.expert_cache` says); returns the gated mixture. ``active`` (a Python
    list of domain names) says which experts take part; ``domain_ids`` (B,) int64 or None
    routes sequences to one domain each.

    The experts run together: layer k of every domain's expert is stacked into one
    :class:`~modekernels.nn.StackedModules` (``stacked[k]``, outside the module tree: the
    per-domain layers under ``experts`` keep owning the parameters, so state dicts and
    :func:`train_domain`'s per-domain ``requires_grad`` are unchanged; each forward stacks the
    active experts' weights, one copy, a view when one expert is active). The sequences each
    expert runs on are gathered into one *expert batch* sorted by domain (a stable counting sort
    on the device, :func:`~modekernels.sort_by_expert`) and every linear layer of the experts
    runs as one grouped GEMM over it; the outputs are scattered back, weighted by the gate.
    With ``domain_ids``, each sequence of an active domain appears once and the others (-1,
    inactive or unknown domains) not at all when the ids are on the CPU (their count is then
    known to the host without a device sync); ids on the GPU keep the batch size and sort those
    sequences last, where the grouped GEMMs skip them (attention and norms still run on them).
    Without ``domain_ids`` the batch appears once per active expert. Inactive experts are
    neither stacked nor run.
    """

    def __init__(
        self, domains: Sequence[str], experts: Sequence[Sequence[nn.Module]], d_model: int, block: int
    ):
        super().__init__()
        self.domains = list(domains)
        self.block = block  # the index of the block beside which the experts sit
        self.experts = nn.ModuleDict({name: nn.ModuleList(layers) for name, layers in zip(domains, experts)})
        self.gate = nn.Linear(d_model, 1 + len(self.domains))
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.active: list = []
        self.domain_ids: Optional[torch.Tensor] = None
        layers = zip(*(self.experts[name] for name in self.domains))
        self.stacked = [StackedModules(same_depth) for same_depth in layers]  # a list: not registered

    def extra_repr(self) -> str:
        return f"domains={self.domains}, active={self.active}"

    def _expert_batch(self, members: tuple, batch: int, device: torch.device) -> Optional[tuple]:
        """(src, grouping): src (P,) the batch sequence behind each expert-batch sequence, sorted
        by group (group g runs domain ``members[g]``); None when no sequence goes to an expert."""
        num = len(members)
        if self.domain_ids is None:
            src = torch.arange(batch, device=device).repeat(num)
            group = torch.arange(num, device=device).repeat_interleave(batch)
            offs = torch.arange(1, num + 1, device=device, dtype=torch.int32) * batch
            return src, Grouping(members, group, offs)
        ids = self.domain_ids
        # group of each sequence: the position of its domain in members; num for no expert
        lookup = torch.full((len(self.domains) + 1,), num, dtype=torch.int64, device=ids.device)
        for g, m in enumerate(members):  # scalar fills: no host-to-device copy
            lookup[1 + m] = g
        known = (ids >= -1) & (ids < len(self.domains))
        key = lookup[torch.where(known, ids.long() + 1, 0)]
        src, ends = sort_by_expert(key, num + 1)
        if values_visible(ends):  # ids on the host: drop the sequences that go to no expert
            routed = int(ends[num - 1])
            if routed == 0:
                return None
            src = src[:routed]
        src, key, offs = (t.to(device, non_blocking=True) for t in (src, key, ends[:num]))
        group = key.index_select(0, src).clamp_(max=num - 1)
        return src, Grouping(members, group, offs)

    def forward(self, x: torch.Tensor, y, *args, **kwargs):
        if not self.active:
            return y
        if self.domain_ids is not None and self.domain_ids.shape != x.shape[:1]:
            raise ValueError(
                f"domain_ids must have shape ({x.shape[0]},), one id per sequence; "
                f"got {tuple(self.domain_ids.shape)}"
            )
        y_bb = y[0] if isinstance(y, tuple) else y
        a = self._gate_weights(x).to(y_bb.dtype)
        out = a[..., :1] * y_bb
        members = tuple(sorted(self.domains.index(name) for name in self.active))
        expert_batch = self._expert_batch(members, x.shape[0], x.device)
        if expert_batch is not None:
            src, grouping = expert_batch
            block_args = _gather_batch((args, kwargs), src, x.shape[0])
            h = self._run_experts(grouping, src, x.shape[0], x.index_select(0, src), block_args)
            out = self._add_experts(out, a, h, src, grouping)
        return (out, *y[1:]) if isinstance(y, tuple) else out

    def _gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """a (B, T, 1 + domains): softmax of the gate over the backbone (column 0) and the
        experts each token may use (active, and its sequence's domain when ids are given)."""
        logits = self.gate(x)
        allowed = torch.zeros(1 + len(self.domains), dtype=torch.bool, device=x.device)
        allowed[0] = True
        for name in self.active:
            allowed[1 + self.domains.index(name)] = True
        allowed = allowed.expand(logits.shape)
        if self.domain_ids is not None:
            ids = self.domain_ids.to(x.device, non_blocking=True).view(-1, *([1] * (logits.dim() - 1)))
            column = torch.arange(logits.shape[-1], device=x.device) - 1
            allowed = allowed & ((column == ids) | (column == -1))
        return torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)

    def _add_experts(self, out, a, h, src, grouping: Grouping) -> torch.Tensor:
        """out plus each expert-batch sequence's output h, weighted by its gate column and added
        to its batch sequence src."""
        columns = torch.empty(len(grouping.members), dtype=torch.int64, device=a.device)
        for g, m in enumerate(grouping.members):  # scalar fills: no host-to-device copy
            columns[g] = 1 + m
        column = columns.index_select(0, grouping.group).view(-1, *([1] * (a.dim() - 1)))
        weight = a.index_select(0, src)
        contribution = weight.gather(-1, column.expand(*weight.shape[:-1], 1)) * h
        if self.domain_ids is None:  # the batch once per group, in group order
            return out + contribution.view(len(grouping.members), *out.shape).sum(0)
        return out.index_add(0, src, contribution)  # each sequence at most once

    def _run_experts(
        self, grouping: Grouping, src: torch.Tensor, batch: int, h: torch.Tensor, block_args: tuple
    ) -> torch.Tensor:
        """The expert layers on the expert batch h (P, T, d) of sequences ``src`` of the batch of
        ``batch``; the block's KV cache, when it gets one, swapped for the experts' own."""
        args, kwargs = block_args
        if any(stacked.training != self.training for stacked in self.stacked):
            for stacked in self.stacked:
                stacked.train(self.training)
        caches = None
        for depth, stacked in enumerate(self.stacked):
            bound = inspect.signature(stacked.template.forward).bind_partial(h, *args, **kwargs)
            cache = bound.arguments.get("past_key_values")
            if cache is not None:
                if caches is None:
                    caches = expert_layer_caches(cache, self, self.block, len(self.stacked), h.shape[1],
                                                 grouping.members, src, grouping.group, batch)
                bound.arguments["past_key_values"] = caches[depth]
            elif "use_cache" in bound.arguments:
                bound.arguments["use_cache"] = False
            h = stacked(grouping, *bound.args, **bound.kwargs)
            h = h[0] if isinstance(h, tuple) else h
        return h


def _gather_batch(value, src: torch.Tensor, batch: int):
    """``value`` with every batch-major tensor (rank ≥ 2, dim 0 of size ``batch``: attention
    masks, position ids and embeddings) gathered to the expert batch's sequences ``src``, looking
    into tuples, lists and dicts; other values (rank-1 tensors such as ``cache_position``,
    broadcasting tensors with dim 0 of size 1, caches) unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch:
        return value.index_select(0, src)
    if type(value) in (tuple, list):
        return type(value)(_gather_batch(v, src, batch) for v in value)
    if type(value) is dict:
        return {k: _gather_batch(v, src, batch) for k, v in value.items()}
    return value


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
            for flag in ("gradient_checkpointing", "_gradient_checkpointing_func"):  # enabled already
                if flag in source.__dict__:
                    setattr(copy, flag, source.__dict__[flag])
            layers.append(copy)
        experts.append(layers)
    surgery.set_instance_method(model, "forward", _forward_taking_domain_ids(type(model)))
    return DomainExperts(options["domains"], experts, surgery.hidden_size(model), layer)


def _restore(model: nn.Module, layer: int, options: dict) -> None:
    """After loading: the saved stage on the experts at block ``layer`` (options saved before the
    stage was recorded activate nothing)."""
    _apply_stage(model, layer, options.get("active", []), options.get("stage"))


METHOD = surgery.register_method(surgery.Method("domain_experts", "block", _build, _restore))


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
    blocks: Optional[Iterable[int] | int] = None,
    freeze_base: bool = True,
) -> surgery.SurgeryReport:
    """Add one expert per name in ``domains`` (a list of distinct names) beside each chosen block
    (``blocks``: indices, one index, or None for all) of ``model``, in place: ``layers_per_expert``
    layers of the host's block class, initialised from the backbone's dense blocks (where
    :func:`~modekernels.hf.moefy` runs experts, from the dense FFN they replace), and a
    zero-initialised softmax gate. No expert is
    active yet, so outputs equal the base model's. The model's forward accepts ``domain_ids``.
    Undo with :func:`unpatch`."""
    if isinstance(domains, str):
        raise ValueError(f"domains must be a list of names, not one string ({domains!r})")
    domains = list(domains)
    if not domains or len(set(domains)) != len(domains) or not all(isinstance(d, str) for d in domains):
        raise ValueError(f"domains must be distinct names, got {domains!r}")
    check_positive_int("layers_per_expert", layers_per_expert)
    options = {"domains": domains, "layers_per_expert": layers_per_expert, "active": [], "stage": None}
    return surgery.apply(model, METHOD, blocks, options, freeze_base, argument="blocks")


@functools.cache
def _forward_taking_domain_ids(cls: type) -> Callable:
    """``cls.forward`` with a keyword-only ``domain_ids`` added to its signature (bound to an
    instance as its own ``forward``): routes the ids (:func:`_route`), then runs the class's
    forward on the other arguments."""

    def forward(self, *args, domain_ids=None, **kwargs):
        _route(self, domain_ids)
        return cls.forward(self, *args, **kwargs)

    signature = inspect.signature(cls.forward)
    params = list(signature.parameters.values())
    at = len(params) - (params[-1].kind is inspect.Parameter.VAR_KEYWORD)
    ids = inspect.Parameter("domain_ids", inspect.Parameter.KEYWORD_ONLY, default=None)
    forward.__signature__ = signature.replace(parameters=params[:at] + [ids] + params[at:])
    return forward


def _route(model: nn.Module, domain_ids) -> None:
    """Hand ``domain_ids`` (B,) to every block's experts (None: all active experts for every
    token)."""
    if domain_ids is not None and not isinstance(domain_ids, torch.Tensor):
        domain_ids = torch.as_tensor(domain_ids)
    for module in surgery.added_modules(model, METHOD.name).values():
        module.domain_ids = domain_ids


def _apply_stage(model: nn.Module, layer: int, active: list, stage: Optional[str]) -> None:
    """Activate the experts named in ``active`` at block ``layer`` (names its experts lack are
    ignored) and record the stage in the options that ``save_modules`` writes. ``stage``
    ``"train_domain"``: only the active experts train; ``"compose"``: the active experts and
    the gate; None: leave what trains as it is."""
    experts = surgery.module_at(model, METHOD, layer)
    experts.active = [name for name in experts.domains if name in active]
    if stage is not None:
        experts.requires_grad_(False)
        for name in experts.active:
            experts.experts[name].requires_grad_(True)
        experts.gate.requires_grad_(stage == "compose")
    surgery.patch_records(model)[METHOD.name][layer].update(active=list(experts.active), stage=stage)


def _set_stage(model: nn.Module, active: list, stage: str) -> int:
    """Freeze the model, then :func:`_apply_stage` on every block with experts; returns the
    number of trainable parameters."""
    model.requires_grad_(False)
    for layer in surgery.patch_records(model)[METHOD.name]:
        _apply_stage(model, layer, active, stage)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_domain(model: nn.Module, name: str) -> int:
    """Stage 1: activate only the expert of domain ``name`` in every patched block and make only
    its layers trainable (backbone, gates and other experts frozen). Returns the number of
    trainable parameters."""
    domains = _experts(model)[0].domains
    if name not in domains:
        raise ValueError(f"unknown domain {name!r}; the experts are for {domains}")
    return _set_stage(model, [name], "train_domain")


def compose(model: nn.Module) -> int:
    """Stage 2: activate every expert and make all experts and gates trainable (backbone
    frozen). Returns the number of trainable parameters."""
    return _set_stage(model, list(_experts(model)[0].domains), "compose")
