"""Stacked modules: E structurally identical modules run as one over a batch whose sequences
are grouped by module, each linear layer as one :func:`modekernels.grouped_mm`.

:class:`StackedModules` builds a *template*: a structural copy of the first module in which every
parameterised leaf is replaced by a stacked leaf, and runs the template once for the whole batch.
Parameter-free code (attention, activations, dropout, reshapes) runs unchanged: it must mix
values only within a sequence (dim 0 of every tensor is the sequence), which holds for
transformer layers. The leaves:

==============================================  ================================================
source leaf                                      stacked version
==============================================  ================================================
``nn.Linear`` (weight (out, in))                 one ``grouped_mm`` over the rows of all groups,
                                                 the (G, out, in) stack passed as
                                                 ``.transpose(1, 2)`` (no copy), bias per sequence
transformers' ``Conv1D`` (weight (in, out))      one ``grouped_mm`` on the (G, in, out) stack
``nn.LayerNorm``                                 the norm, then the weight and bias of each
                                                 sequence's module
Llama-style RMSNorm (Llama, Mistral, Qwen2,      the same, with Llama's formula
Qwen3, incl. Qwen3's q_norm / k_norm)
==============================================  ================================================

Any other module holding parameters raises TypeError naming its type.

The sources stay the owners of their parameters (the template holds no parameter of its own):
each call stacks the parameters of the groups' modules (one copy; a view when one group runs), so
gradients reach each source's own tensors, optimisers and ``requires_grad`` flags work per source,
and state dicts are unchanged. The template shares each source's buffer dicts, so device and
dtype moves of the sources reach it; it has its own hooks (none) and ``training`` flag
(:class:`StackedModules`' ``train``/``eval``). It never checkpoints itself: when the first
source has transformers' activation checkpointing on (``gradient_checkpointing`` and its
``_gradient_checkpointing_func``, as ``gradient_checkpointing_enable`` sets them) and the
template is training, :meth:`StackedModules.forward` checkpoints the whole call, grouping
included, with that function.

Which sequence runs through which module reaches the leaves as a :class:`Grouping`, set by
:meth:`StackedModules.forward` for the duration of one call.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from modekernels.ops.autocast import autocast_operands
from modekernels.ops.grouped_mm import grouped_mm

__all__ = ["Grouping", "StackedModules"]

# transformers' RMSNorms that compute weight * (x · rsqrt(mean(x²) + eps)) in float32, as Llama's.
LLAMA_STYLE_RMSNORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


class Grouping(NamedTuple):
    """Which module each sequence of a batch of P sequences runs through.

    ``members``: tuple of G source indices, group g runs source ``members[g]``; ``group``: (P,)
    int64 group of each sequence, in [0, G); ``offs``: (G,) int32 cumulative ends of the groups
    in sequences. Sequences must come sorted by group; those at or past ``offs[-1]`` belong to no
    group and come out unspecified (finite for finite input: their linear layers give zeros
    plus a bias, and no GEMM runs on them).
    """

    members: tuple
    group: torch.Tensor
    offs: torch.Tensor


class _Slot:
    """The grouping of the call in progress, shared by one template's leaves."""

    value: Optional[Grouping] = None


class _StackedLeaf(nn.Module):
    """Base of the stacked leaves: reads the sources' parameters at each call."""

    def __init__(self, sources: list, slot: _Slot):
        super().__init__()
        self.sources = sources  # a plain list: the sources stay out of this module tree
        self.slot = slot

    def extra_repr(self) -> str:
        return f"{len(self.sources)} x {self.sources[0]!r}"

    def _grouping(self, x: torch.Tensor) -> Grouping:
        grouping = self.slot.value
        if grouping is None:
            raise RuntimeError(f"{type(self).__name__} runs only inside StackedModules.forward")
        if x.dim() < 2 or x.shape[0] != grouping.group.shape[0]:
            raise ValueError(
                f"{type(self).__name__}: input of shape {tuple(x.shape)} does not start with the "
                f"{grouping.group.shape[0]} sequences of the grouping"
            )
        return grouping

    def _stacked(self, name: str, grouping: Grouping) -> torch.Tensor:
        """(G, *shape): parameter ``name`` of each group's source."""
        tensors = [getattr(self.sources[m], name) for m in grouping.members]
        return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)

    def _per_sequence(self, name: str, grouping: Grouping, ndim: int) -> torch.Tensor:
        """(P, 1, …, 1, *shape): parameter ``name`` of each sequence's source, broadcastable
        against an ``ndim``-dimensional activation."""
        stacked = self._stacked(name, grouping)
        rows = stacked.index_select(0, grouping.group)
        shape = stacked.shape[1:]
        return rows.view(rows.shape[0], *([1] * (ndim - 1 - len(shape))), *shape)


class StackedLinear(_StackedLeaf):
    """``nn.Linear`` (``in_out=False``, weight (out, in)) or transformers' ``Conv1D``
    (``in_out=True``, weight (in, out)) of E sources: x (P, …, in) -> (P, …, out), all rows in
    one ``grouped_mm``."""

    def __init__(self, sources: list, slot: _Slot, in_out: bool):
        super().__init__(sources, slot)
        self.in_out = in_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouping = self._grouping(x)
        w = self._stacked("weight", grouping)
        # under autocast, rows and weights in the autocast dtype, as nn.Linear's matmul
        rows, w = autocast_operands((x.reshape(-1, x.shape[-1]), w))
        rows_per_sequence = rows.shape[0] // max(x.shape[0], 1)
        y = grouped_mm(rows, w if self.in_out else w.transpose(1, 2), grouping.offs * rows_per_sequence)
        y = y.view(*x.shape[:-1], y.shape[-1])
        if getattr(self.sources[0], "bias", None) is not None:
            y = y + self._per_sequence("bias", grouping, y.dim()).to(y.dtype)
        return y


class StackedLayerNorm(_StackedLeaf):
    """``nn.LayerNorm`` of E sources: the norm, then each sequence's weight and bias."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouping = self._grouping(x)
        first = self.sources[0]
        y = F.layer_norm(x, first.normalized_shape, None, None, first.eps)
        if first.weight is not None:
            y = y * self._per_sequence("weight", grouping, x.dim())
        if first.bias is not None:
            y = y + self._per_sequence("bias", grouping, x.dim())
        return y


class StackedRMSNorm(_StackedLeaf):
    """Llama-style RMSNorm of E sources: weight · (x · rsqrt(mean(x²) + eps)), normalised in
    float32 and cast back to x's dtype before the weight, as ``LlamaRMSNorm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grouping = self._grouping(x)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.sources[0].variance_epsilon)
        return self._per_sequence("weight", grouping, x.dim()) * h.to(x.dtype)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def _leaf(sources: list, slot: _Slot) -> Optional[_StackedLeaf]:
    """The stacked version of ``sources`` when they are a supported parameterised leaf."""
    first = sources[0]
    if isinstance(first, nn.Linear):
        return StackedLinear(sources, slot, in_out=False)
    if _is_conv1d(first):
        return StackedLinear(sources, slot, in_out=True)
    if isinstance(first, nn.LayerNorm):
        return StackedLayerNorm(sources, slot)
    if type(first).__name__ in LLAMA_STYLE_RMSNORMS:
        return StackedRMSNorm(sources, slot)
    return None


def _check_same_structure(sources: list, path: str) -> None:
    first = sources[0]
    for i, other in enumerate(sources[1:], 1):
        if type(other) is not type(first) or list(other._modules) != list(first._modules):
            raise ValueError(
                f"cannot stack module {i} at {path or '<root>'}: {type(other).__name__} with children "
                f"{list(other._modules)} vs {type(first).__name__} with {list(first._modules)}"
            )
        mine = {n: p.shape for n, p in first.named_parameters(recurse=False)}
        theirs = {n: p.shape for n, p in other.named_parameters(recurse=False)}
        if mine != theirs:
            raise ValueError(f"cannot stack module {i} at {path or '<root>'}: parameters {theirs} vs {mine}")


def _template(sources: list, slot: _Slot, path: str) -> nn.Module:
    """A structural copy of ``sources[0]`` with stacked leaves (see the module docstring)."""
    _check_same_structure(sources, path)
    leaf = _leaf(sources, slot)
    if leaf is not None:
        return leaf
    first = sources[0]
    own = [n for n, _ in first.named_parameters(recurse=False)]
    if own:
        kind = f"{type(first).__module__}.{type(first).__qualname__}"
        raise TypeError(
            f"cannot stack {kind} at {path or '<root>'}: it holds parameters {own} and has no stacked "
            "version (supported: nn.Linear, transformers' Conv1D, nn.LayerNorm, RMSNorm of "
            f"{', '.join(sorted(LLAMA_STYLE_RMSNORMS))})"
        )
    copy = type(first).__new__(type(first))
    nn.Module.__init__(copy)  # fresh bookkeeping: no hooks, no children yet
    bookkeeping = set(copy.__dict__)
    copy.__dict__.update({k: v for k, v in first.__dict__.items() if k not in bookkeeping})
    copy._buffers = first._buffers  # shared dicts: moves of the source's buffers reach the copy
    copy._non_persistent_buffers_set = first._non_persistent_buffers_set
    copy.training = first.training
    if "gradient_checkpointing" in copy.__dict__:  # StackedModules.forward checkpoints instead
        copy.gradient_checkpointing = False
    for name, child in first._modules.items():
        copy._modules[name] = None if child is None else _template(
            [s._modules[name] for s in sources], slot, f"{path}.{name}" if path else name
        )
    return copy


class StackedModules(nn.Module):
    """E structurally identical modules run as one.

    ``forward(grouping, *args, **kwargs)`` runs the template (a copy of ``modules[0]`` with
    stacked leaves) once on ``args``/``kwargs``, whose batch of P sequences is sorted by group as
    :class:`Grouping` says: each sequence goes through module ``grouping.members[g]`` of its
    group g only, every linear layer of all groups in one ``grouped_mm``. Tensors that reach a
    stacked leaf must have the sequences on dim 0. Holds no parameters: ``modules`` keep theirs
    (their owner must keep them registered) and are read at each call. In training, with
    activation checkpointing on in ``modules[0]`` (see the module docstring), the call is
    checkpointed: its activations are recomputed, with the same grouping, during backward().
    """

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__()
        modules = list(modules)
        if not modules:
            raise ValueError("StackedModules needs at least one module")
        self.num_modules = len(modules)
        self.slot = _Slot()
        self.template = _template(modules, self.slot, "")
        self.first = [modules[0]]  # a list: not registered

    def extra_repr(self) -> str:
        return f"num_modules={self.num_modules}"

    def forward(self, grouping: Grouping, *args, **kwargs):
        first = self.first[0]
        if self.template.training and getattr(first, "gradient_checkpointing", False):
            run = functools.partial(self._run, grouping, **kwargs)
            return first._gradient_checkpointing_func(run, *args)
        return self._run(grouping, *args, **kwargs)

    def _run(self, grouping: Grouping, *args, **kwargs):
        previous, self.slot.value = self.slot.value, grouping
        try:
            return self.template(*args, **kwargs)
        finally:
            self.slot.value = previous
