"""Backend selection: argument > use_backend > MODEKERNELS_BACKEND > automatic, and the reasons."""

import logging
import subprocess
import sys

import pytest
import torch

import modekernels
from modekernels import backends

CPU = torch.device("cpu")


def _dispatch(**kwargs) -> backends.Dispatch:
    return backends.Dispatch(
        "toy",
        reference="modekernels.reference.grouped_mm:grouped_mm",
        triton="modekernels.triton_kernels.grouped_mm:grouped_mm",
        cuda="modekernels.cuda.grouped_mm:grouped_mm",
        **kwargs,
    )


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


def test_precedence_argument_then_context_then_environment(no_env, monkeypatch):
    assert backends.requested(None) is None
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    assert backends.requested(None) == "triton"
    with modekernels.use_backend("cuda"):
        assert backends.requested(None) == "cuda"
        assert backends.requested("reference") == "reference"
        with modekernels.use_backend(None):
            assert backends.requested(None) == "triton"
        assert modekernels.get_backend() == "cuda"
    assert backends.requested(None) == "triton"


def test_use_backend_as_a_plain_call_sets_the_choice(no_env):
    modekernels.use_backend("reference")
    try:
        assert modekernels.get_backend() == "reference"
    finally:
        modekernels.use_backend(None)
    assert modekernels.get_backend() is None


@pytest.mark.parametrize("where", ["argument", "context", "environment"])
def test_unknown_names_are_rejected(no_env, monkeypatch, where):
    with pytest.raises(ValueError, match="must be one of"):
        if where == "argument":
            backends.requested("cutlass")
        elif where == "context":
            modekernels.use_backend("cutlass")
        else:
            monkeypatch.setenv(backends.ENV_VAR, "cutlass")
            backends.requested(None)


def test_automatic_choice_on_the_cpu_is_the_reference():
    assert _dispatch().resolve(None, CPU) == "reference"


def test_explicit_choice_that_cannot_run_raises_with_the_reason():
    with pytest.raises(backends.BackendUnavailable, match="cuda.*needs CUDA tensors"):
        _dispatch().resolve("cuda", CPU)
    missing = backends.Dispatch("toy", reference="modekernels.reference.grouped_mm:grouped_mm")
    with pytest.raises(backends.BackendUnavailable, match="has no triton implementation"):
        missing.resolve("triton", CPU)


def test_supports_predicate_declines_a_call():
    dispatch = _dispatch(supports={"reference": lambda n: None if n < 4 else "n too large"})
    assert dispatch.resolve("reference", CPU, (3,)) == "reference"
    with pytest.raises(backends.BackendUnavailable, match="n too large"):
        dispatch.resolve("reference", CPU, (5,))


def test_automatic_choice_follows_the_preference_and_logs_each_fallback_once(monkeypatch, caplog):
    """On a (pretended) CUDA device: the first backend of the order that can run is chosen."""
    gpu = torch.device("cuda", 0)
    reasons = {"cuda": "no kernels for this arch", "triton": None, "reference": None}
    monkeypatch.setattr(backends, "availability", lambda name, device: reasons[name])
    monkeypatch.setattr(backends, "_logged", set())
    cuda_first = _dispatch(prefer=backends.CUDA_FIRST)
    with caplog.at_level(logging.INFO, logger="modekernels"):
        assert cuda_first.resolve(None, gpu) == "triton"
        assert cuda_first.resolve(None, gpu) == "triton"
    assert [r.getMessage() for r in caplog.records] == [
        "modekernels: toy skips the cuda backend: no kernels for this arch"
    ]
    reasons["cuda"] = None
    assert cuda_first.resolve(None, gpu) == "cuda"
    assert _dispatch().resolve(None, gpu) == "triton"  # TRITON_FIRST by default
    by_call = _dispatch(prefer=lambda device, args: ("reference",) if args[0] > 3 else ("cuda",))
    assert by_call.resolve(None, gpu, (5,)) == "reference"
    assert by_call.resolve(None, gpu, (2,)) == "cuda"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in backends.availability("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.availability("triton", CPU) is None


def test_importing_modekernels_loads_no_kernels():
    """Backends are imported on first use: importing the package imports neither its Triton
    kernels nor the CUDA extension (transformers itself may import triton)."""
    code = (
        "import sys, modekernels, modekernels.hf; "
        "print(any(m.startswith(('modekernels.triton_kernels', 'modekernels._C', 'modekernels.cuda')) "
        "for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_record_runs_reports_the_backend_that_ran():
    x, w = torch.randn(5, 4), torch.randn(2, 4, 3)
    offs = torch.tensor([2, 5], dtype=torch.int32)
    with backends.record_runs() as runs:
        modekernels.grouped_mm(x, w, offs, backend="reference")
    assert runs == {"grouped_mm": "reference"}
    modekernels.grouped_mm(x, w, offs)
    assert runs == {"grouped_mm": "reference"}  # nothing is recorded after the block
