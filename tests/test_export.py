"""Serving paths: ``torch.export`` of the modules and of Hugging Face models on the modekernels
ops, with a dynamic token (or sequence) dimension, run at another size than the one exported,
and an AOTInductor package built from an exported program. Each must equal eager."""

from __future__ import annotations

import pytest
import torch
from conftest import backend_params
from hf_models import build
from test_hf_experts import tiny_model
from torch.export import Dim

import modekernels
import modekernels.hf as mh
from modekernels.nn import Adapter, AdapterMixture, MoEMLP, NeutralResidue

H = 32


class FirstOutput(torch.nn.Module):
    """The module's output, or the first element of the tuple it returns (y of (y, g, l1),
    the output of MoEOutput)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        return out[0] if isinstance(out, tuple) else out


class Logits(torch.nn.Module):
    """A causal LM's logits, without the KV cache (an exported graph takes tensors only)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, use_cache=False).logits


def randomised(module: torch.nn.Module) -> torch.nn.Module:
    """The module in eval mode with every trainable parameter drawn from N(0, 0.1²), so that
    zero-initialised output weights do not hide a wrong graph."""
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    return module.eval()


MODULES = {
    "moe_mlp": lambda: MoEMLP(H, 48, 4),
    "moe_mlp_gated": lambda: MoEMLP(H, 24, 5, activation="silu", gated=True, bias=False),
    "neutral_residue": lambda: NeutralResidue(H, 8),
    "neutral_residue_sparse": lambda: NeutralResidue(H, 8, glu=False, activation="relu", sparse=True),
    "adapter": lambda: Adapter(H, 8),
    "adamix": lambda: AdapterMixture(H, 8, 3),
}


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("backend", backend_params("reference", "triton"))
def test_exported_module_matches_eager_at_another_size(backend, name):
    torch.manual_seed(0)
    module = FirstOutput(randomised(MODULES[name]()))
    tokens = Dim("tokens", min=2, max=64)
    with modekernels.use_backend(backend):
        program = torch.export.export(module, (torch.randn(6, H),), dynamic_shapes=({0: tokens},))
        for T in (2, 13):
            x = torch.randn(T, H)
            torch.testing.assert_close(program.module()(x), module(x), rtol=1e-5, atol=1e-6)


def _mixtral(experts_implementation: str):
    model = tiny_model("mixtral").cpu().eval()
    model.set_experts_implementation(experts_implementation)
    return model


def _patched(model, surgery, **kwargs):
    surgery(model, **kwargs)
    return randomised(model)


# name: (the model on modekernels, its host as transformers runs it)
HF_MODELS = {
    "mixtral_modekernels_experts": (lambda: _mixtral("modekernels"), lambda: _mixtral("grouped_mm")),
    "llama_neutral_residues": (
        lambda: _patched(build("llama"), mh.add_neutral_residues, d_adapter=8), lambda: build("llama"),
    ),
    "gpt2_adamix": (
        lambda: _patched(build("gpt2"), mh.add_adamix, num_adapters=2, d_adapter=8), lambda: build("gpt2"),
    ),
}


def _export_logits(model: torch.nn.Module, dynamic: bool):
    """The exported logits of model for (2, seq) token ids, seq dynamic or fixed at 6."""
    shapes = ({1: Dim("seq", min=2, max=30)},) if dynamic else None
    return torch.export.export(model, (torch.randint(2, 64, (2, 6)),), dynamic_shapes=shapes)


def _host_exports_dynamically(name: str) -> bool:
    """Whether the host model, as transformers runs it, exports with a dynamic sequence length.
    The GPU image's transformers 5.17 with torch 2.11 leaves a guard that pins the length in
    Llama and Mixtral (min(8·seq, 16·seq) == 8·seq); newer releases export them."""
    try:
        _export_logits(Logits(HF_MODELS[name][1]()), dynamic=True)
    except torch._dynamo.exc.UserError:
        return False
    return True


@pytest.mark.parametrize("name", HF_MODELS)
def test_exported_hf_model_matches_eager_at_another_length(name, reference_backend):
    """Exported with a dynamic sequence length wherever the unpatched host exports so, and run
    at another length (else at the exported length, with new ids): the kernels and the surgery
    never make a model less exportable than transformers leaves it."""
    torch.manual_seed(0)
    dynamic = _host_exports_dynamically(name)
    model = Logits(HF_MODELS[name][0]())
    program = _export_logits(model, dynamic)
    ids = torch.randint(2, 64, (2, 11 if dynamic else 6))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids), model(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["moe_mlp_gated", "neutral_residue"])
def test_aot_inductor_package_matches_eager(name, tmp_path, reference_backend):
    """An AOTInductor package (compiled C++ around the ops, which it calls through their
    registrations) loaded back and run at another size than the one exported."""
    torch.manual_seed(0)
    module = FirstOutput(randomised(MODULES[name]()))
    tokens = Dim("tokens", min=2, max=64)
    program = torch.export.export(module, (torch.randn(6, H),), dynamic_shapes=({0: tokens},))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "m.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    x = torch.randn(9, H)
    torch.testing.assert_close(loaded(x), module(x), rtol=1e-5, atol=1e-6)
