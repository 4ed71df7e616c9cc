"""AdaMix: a mixture of adapter copies after each chosen FFN's output.

In training each forward uses one copy drawn at random; :func:`merge_adamix` averages the
copies' weights into one adapter per block for inference. The mixture is
:class:`modekernels.nn.AdapterMixture`.
"""

from __future__ import annotations

from typing import Iterable, Optional

from torch import nn

from modekernels._checks import check_positive_int
from modekernels.hf import surgery
from modekernels.hf.adapters import PostFFNAdapter

__all__ = ["add_adamix", "merge_adamix"]


def _build(model: nn.Module, layer: int, options: dict) -> nn.Module:
    from modekernels.nn import Adapter, AdapterMixture

    d = surgery.hidden_size(model)
    if options.get("merged"):
        return PostFFNAdapter(Adapter(d, options["d_adapter"], options["activation"]))
    return PostFFNAdapter(
        AdapterMixture(d, options["d_adapter"], options["num_adapters"], activation=options["activation"])
    )


METHOD = surgery.register_method(surgery.Method("adamix", "ffn", _build))


def add_adamix(
    model: nn.Module,
    num_adapters: int = 4,
    d_adapter: int = 16,
    *,
    activation: str = "gelu",
    layers: Optional[Iterable[int]] = None,
    freeze_base: bool = True,
) -> surgery.SurgeryReport:
    """Add an :class:`~modekernels.nn.AdapterMixture` of ``num_adapters`` adapters of width
    ``d_adapter`` after the FFN output of each chosen block (all when ``layers`` is None) of
    ``model``, in place. With ``freeze_base`` only the adapters train. Undo with
    :func:`unpatch`; collapse for inference with :func:`merge_adamix`."""
    check_positive_int("num_adapters", num_adapters)
    check_positive_int("d_adapter", d_adapter)
    options = {"num_adapters": num_adapters, "d_adapter": d_adapter, "activation": activation, "merged": False}
    return surgery.apply(model, METHOD, layers, options, freeze_base)


def merge_adamix(model: nn.Module) -> surgery.SurgeryReport:
    """Replace each block's adapter mixture by its merged adapter (weights averaged over the
    copies), in place; the merged model's output equals the mixture's eval output. The merged
    adapters keep the mixtures' trainable flags."""
    per_layer = surgery.patch_records(model).get(METHOD.name)
    if not per_layer:
        raise ValueError("the model has no AdaMix adapters: call add_adamix first")
    if any(options["merged"] for options in per_layer.values()):
        raise ValueError("the AdaMix adapters are already merged")
    for layer in per_layer:
        branch = surgery.module_at(model, METHOD, layer)
        trainable = any(p.requires_grad for p in branch.adapter.parameters())
        branch.adapter = branch.adapter.merge().requires_grad_(trainable)
        per_layer[layer]["merged"] = True
    layers = sorted(per_layer)
    return surgery.finish_surgery(model, METHOD.name, layers, per_layer[layers[0]], freeze_base=None)
