"""Backend selection: argument > use_backend > MODEKERNELS_BACKEND > automatic, and the reasons."""

import logging
import subprocess
import sys
import types

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


def test_automatic_fallback_to_the_reference_on_a_gpu_warns(monkeypatch, caplog):
    """Landing on the reference for a CUDA tensor is slow (and reads values on the host): a
    warning, once per reason; a fallback to another kernel backend stays at INFO."""
    gpu = torch.device("cuda", 0)
    reasons = {"cuda": "not built", "triton": "no triton", "reference": None}
    monkeypatch.setattr(backends, "availability", lambda name, device: reasons[name])
    monkeypatch.setattr(backends, "_logged", set())
    with caplog.at_level(logging.INFO, logger="modekernels"):
        assert _dispatch().resolve(None, gpu) == "reference"
        assert _dispatch().resolve(None, gpu) == "reference"
        assert _dispatch().resolve(None, CPU) == "reference"  # the CPU's choice: nothing logged
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "modekernels: toy skips the triton backend: no triton; it runs on the "
                          "slow reference backend"),
        (logging.WARNING, "modekernels: toy skips the cuda backend: not built; it runs on the "
                          "slow reference backend"),
    ]


def _grouped_mm_inputs(requires_grad: bool = False):
    x = torch.randn(5, 4, requires_grad=requires_grad)
    w = torch.randn(2, 4, 3, requires_grad=requires_grad)
    return x, w, torch.tensor([2, 5], dtype=torch.int32)


def _op_calls():
    """Direct torch.ops calls of each forward op (CPU tensors), by name."""
    x, w, offs = _grouped_mm_inputs()
    expert_idx = torch.tensor([1, 0, 1, 1, 0])
    perm = torch.tensor([1, 4, 0, 2, 3])
    return {
        "grouped_mm": lambda: torch.ops.modekernels.grouped_mm(x, w, offs),
        "moe_mlp_up": lambda: torch.ops.modekernels.moe_mlp_up(
            x, perm, offs, w, None, "silu", False, 1, False),
        "moe_mlp_down": lambda: torch.ops.modekernels.moe_mlp_down(
            x, perm, offs, w, None, torch.rand(5, 1)),
        "route_top1": lambda: torch.ops.modekernels.route_top1(torch.randn(5, 2)),
        "sort_by_expert": lambda: torch.ops.modekernels.sort_by_expert(expert_idx, 2),
        "neutral_residue": lambda: torch.ops.modekernels.neutral_residue(
            x, torch.randn(3, 4), None, torch.randn(4, 3), None, None, None, None, None, None,
            "silu", "none", False, False),
    }


TRITON_HERE = backends.availability("triton", CPU)


@pytest.mark.skipif(TRITON_HERE is not None, reason=str(TRITON_HERE))
@pytest.mark.parametrize("op", sorted(_op_calls()))
def test_direct_op_calls_follow_use_backend(no_env, op):
    """torch.ops.modekernels.* (what exported graphs call, with backend=None) applies the same
    precedence as the public functions: use_backend, then the environment."""
    with modekernels.use_backend("triton"), backends.record_runs() as runs:
        _op_calls()[op]()
    assert runs == {op: "triton"}


@pytest.mark.skipif(TRITON_HERE is not None, reason=str(TRITON_HERE))
def test_backward_ops_follow_the_forwards_choice(no_env):
    """A direct op call's backward runs where its forward was asked to, inside the use_backend
    block or after it."""
    x, w, offs = _grouped_mm_inputs(requires_grad=True)
    with modekernels.use_backend("triton"), backends.record_runs() as runs:
        torch.ops.modekernels.grouped_mm(x, w, offs).sum().backward()
    assert runs == {"grouped_mm": "triton", "grouped_mm_weight_grad": "triton"}
    with modekernels.use_backend("triton"):
        y = torch.ops.modekernels.grouped_mm(x, w, offs)
    with backends.record_runs() as runs:
        y.sum().backward()
    assert runs == {"grouped_mm": "triton", "grouped_mm_weight_grad": "triton"}


@pytest.mark.parametrize("op", sorted(_op_calls()))
def test_direct_op_calls_raise_for_an_unavailable_backend_in_the_environment(monkeypatch, op):
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(backends.BackendUnavailable, match="'cuda' was requested"):
        _op_calls()[op]()
    monkeypatch.setenv(backends.ENV_VAR, "cutlass")
    with pytest.raises(ValueError, match="MODEKERNELS_BACKEND must be one of"):
        _op_calls()[op]()


@pytest.mark.skipif(TRITON_HERE is not None, reason=str(TRITON_HERE))
def test_an_exported_program_follows_use_backend_when_it_runs(no_env):
    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(2, 4, 3))

        def forward(self, x, offs):
            return modekernels.grouped_mm(x, self.w, offs)

    x, _, offs = _grouped_mm_inputs()
    program = torch.export.export(Experts(), (x, offs)).module()
    with backends.record_runs() as runs:
        expected = program(x, offs)
    assert runs == {"grouped_mm": "reference"}
    with modekernels.use_backend("triton"), backends.record_runs() as runs:
        torch.testing.assert_close(program(x, offs), expected)
    assert runs == {"grouped_mm": "triton"}


@pytest.mark.parametrize("capability, sm90_built, dtype, expected", [
    ((9, 0), True, torch.bfloat16, backends.CUDA_FIRST),
    ((9, 0), False, torch.bfloat16, backends.TRITON_FIRST),
    ((9, 0), None, torch.bfloat16, backends.TRITON_FIRST),  # None: the extension is not built
    ((9, 0), True, torch.float32, backends.TRITON_FIRST),
    ((8, 0), True, torch.bfloat16, backends.TRITON_FIRST),
], ids=["hopper", "hopper-without-sm90-kernels", "no-extension", "float32", "ampere"])
def test_grouped_mm_puts_cuda_first_only_with_the_hopper_kernels(
    monkeypatch, capability, sm90_built, dtype, expected
):
    from modekernels.ops import grouped_mm

    extension = types.SimpleNamespace(has_sm90_kernels=lambda: bool(sm90_built))
    monkeypatch.setitem(sys.modules, "modekernels._C", extension)
    monkeypatch.setattr(modekernels, "_C", extension, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    monkeypatch.setattr(backends, "cuda_extension_error",
                        lambda: "not built" if sm90_built is None else None)
    x, w = torch.randn(4, 16, dtype=dtype), torch.randn(2, 16, 8, dtype=dtype)
    assert grouped_mm._fastest_first(torch.device("cuda", 0), (x, w)) == expected


@pytest.mark.skipif(TRITON_HERE is not None, reason=str(TRITON_HERE))
def test_a_compiled_backward_resolves_the_choice_when_it_runs(no_env):
    """A graph traced under one use_backend and run under another runs both passes on the
    second: the choice at tracing time is not kept in the backward."""
    x, w, offs = _grouped_mm_inputs(requires_grad=True)
    compiled = torch.compile(lambda x, w: modekernels.grouped_mm(x, w, offs).sum(),
                             fullgraph=True, backend="aot_eager")
    with modekernels.use_backend("reference"), backends.record_runs() as runs:
        compiled(x, w).backward()
    assert runs == {"grouped_mm": "reference", "grouped_mm_weight_grad": "reference"}
    with modekernels.use_backend("triton"), backends.record_runs() as runs:
        compiled(x, w).backward()
    assert runs == {"grouped_mm": "triton", "grouped_mm_weight_grad": "triton"}
