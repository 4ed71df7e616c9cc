"""Save, load and port only the modules that surgery added to a model.

A modules directory holds ``modules.safetensors`` (tensor ``"{method}.{block}.{name}"`` is
parameter or buffer ``name`` of the ``method`` module at block ``block``) and ``modules.json``::

    {"format": "modekernels.modules", "version": 1,
     "host": {"name_or_path", "model_type", "family", "hidden_size", "intermediate_size",
              "num_layers"},
     "methods": [{"method": "neutral_residue", "layers": [0, 1], "options": {...}}, ...]}

(one entry per method and set of options; the options include each method's state beyond its
tensors, such as MoDE's active experts and stage). The backbone itself goes through the model's
own ``save_pretrained`` / ``from_pretrained``; a patched model's ``save_pretrained`` also writes
these two files beside its checkpoint, and :func:`load_modules` then rebuilds and fills the added
modules in the model ``from_pretrained`` returns.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from modekernels.hf import surgery

__all__ = ["PortReport", "load_modules", "port_modules", "save_modules"]

CONFIG_NAME = "modules.json"
WEIGHTS_NAME = "modules.safetensors"
FORMAT = "modekernels.modules"


@dataclass
class PortReport:
    """Outcome of :func:`load_modules` / :func:`port_modules`: ``moved`` lists the modules
    loaded (``"{method}.{block}"``), ``refused`` maps each module not loaded to the reason."""

    moved: list = field(default_factory=list)
    refused: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"moved {len(self.moved)} modules, refused {len(self.refused)}"]
        lines += [f"  moved   {name}" for name in self.moved]
        lines += [f"  refused {name}: {why}" for name, why in self.refused.items()]
        return "\n".join(lines)


def _host(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    _, block_list = surgery.blocks(model)
    family = surgery.detect_family(model)
    return {
        "name_or_path": getattr(config, "_name_or_path", "") or type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "family": family.name,
        "hidden_size": surgery.hidden_size(model),
        "intermediate_size": family.dense_ffn(block_list[0]).d_ff,
        "num_layers": len(block_list),
    }


def save_modules(model: nn.Module, directory: str) -> dict:
    """Write the added modules of ``model`` to ``directory`` (created if needed): safetensors
    weights and a JSON config of methods, options, blocks and host. Returns the config."""
    from safetensors.torch import save_file

    records = surgery.patch_records(model)
    if not records:
        raise ValueError("the model has no added modules: nothing to save")
    tensors, groups = {}, []
    for name, per_layer in records.items():
        method = surgery.METHODS[name]
        for layer, options in sorted(per_layer.items()):
            for key, value in surgery.module_at(model, method, layer).state_dict().items():
                tensors[f"{name}.{layer}.{key}"] = value.detach().contiguous().cpu()
            group = next((g for g in groups if g["method"] == name and g["options"] == options), None)
            if group is None:
                groups.append({"method": name, "layers": [layer], "options": options})
            else:
                group["layers"].append(layer)
    config = {"format": FORMAT, "version": 1, "host": _host(model), "methods": groups}
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME), metadata={"format": FORMAT})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    return config


def _read(directory: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}: not a modekernels modules directory")
    with open(path) as f:
        config = json.load(f)
    if config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a modekernels modules config (format {config.get('format')!r})")
    return config, load_file(os.path.join(directory, WEIGHTS_NAME))


def _saved(tensors: dict, name: str, layer: int) -> dict:
    prefix = f"{name}.{layer}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _mismatch(module: nn.Module, saved: dict) -> Optional[str]:
    """None when ``saved`` fills ``module`` exactly, else what does not fit."""
    own = module.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    if missing or unexpected:
        return f"different tensors (missing {missing}, unexpected {unexpected})"
    shapes = [f"{k} saved {tuple(v.shape)} vs host {tuple(own[k].shape)}" for k, v in saved.items()
              if v.shape != own[k].shape]
    return "shape mismatch: " + "; ".join(shapes) if shapes else None


def _fill(module: nn.Module, saved: dict) -> None:
    like = next(iter(module.state_dict().values()), None)
    module.load_state_dict({k: v.to(like.device if like is not None else "cpu") for k, v in saved.items()})


def _transfer(model: nn.Module, directory: str, strict: bool, freeze_base: Optional[bool]) -> PortReport:
    """Fit every saved module first (adding those the model lacks); when ``strict`` and some do
    not fit, remove what this call added and raise before any tensor is loaded. Then load the
    ones that fit, set what trains and restore each method's saved state."""
    config, tensors = _read(directory)
    _, block_list = surgery.blocks(model)
    report = PortReport()
    fits, created = [], []
    for group in config["methods"]:
        name = group["method"]
        if name not in surgery.METHODS:
            for layer in group["layers"]:
                report.refused[f"{name}.{layer}"] = f"unknown method {name!r}"
            continue
        method = surgery.METHODS[name]
        for layer in group["layers"]:
            key = f"{name}.{layer}"
            if layer >= len(block_list):
                report.refused[key] = f"the host has only {len(block_list)} blocks"
                continue
            module = surgery.module_at(model, method, layer)
            if module is None:
                try:
                    module = surgery.attach(model, method, layer, group["options"])
                except (ValueError, RuntimeError) as exc:
                    report.refused[key] = f"cannot build the module on this host: {exc}"
                    continue
                created.append((layer, name))
            saved = _saved(tensors, name, layer)
            reason = _mismatch(module, saved)
            if reason is not None:
                report.refused[key] = reason
            else:
                fits.append((group, layer, module, saved))
    fitted = {(layer, group["method"]) for group, layer, _, _ in fits}
    for layer, name in created:
        if strict and report.refused or (layer, name) not in fitted:
            surgery.remove_added(model, layer, name)
    if not surgery.patch_records(model):  # nothing left: drop the instance state as well
        surgery.unpatch(model)
    if strict and report.refused:
        raise ValueError(f"load_modules: some modules do not fit this model (nothing was changed):\n{report}")
    for group, layer, module, saved in fits:
        _fill(module, saved)
        report.moved.append(f"{group['method']}.{layer}")
    _finish(model, fits, freeze_base)
    return report


def _finish(model: nn.Module, fits: list, freeze_base: Optional[bool]) -> None:
    """Set what trains, per method, for the modules loaded, then let each method restore its
    saved state on them (:attr:`surgery.Method.restore`)."""
    loaded: dict = {}
    for group, layer, _, _ in fits:
        loaded.setdefault(group["method"], []).append((layer, group["options"]))
    for name, entries in loaded.items():
        layers = [layer for layer, _ in entries]
        surgery.finish_surgery(model, name, layers, surgery.patch_records(model)[name][layers[0]], freeze_base)
        restore = surgery.METHODS[name].restore
        if restore is not None:
            for layer, options in entries:
                restore(model, layer, options)


def load_modules(model: nn.Module, directory: str, *, freeze_base: bool = True) -> PortReport:
    """Load modules saved by :func:`save_modules` into ``model`` (the host they were trained on,
    or one of the same architecture, for instance after ``from_pretrained``), adding them first
    where the model lacks them. Strict: raises ValueError listing every module that does not
    fit. ``freeze_base`` as in the surgeries."""
    return _transfer(model, directory, strict=True, freeze_base=freeze_base)


def port_modules(directory: str, other_model: nn.Module, *, freeze_base: bool = True) -> PortReport:
    """Move saved modules onto another host, patched or not: add each saved module the host
    lacks (built from the saved options on the host's dimensions), keep the host's own where it
    has one, load every module whose tensors fit, and remove the ones added here that do not.
    Returns a :class:`PortReport` naming each module moved or refused, and why."""
    return _transfer(other_model, directory, strict=False, freeze_base=freeze_base)
