"""The CUDA extension ``modekernels._C``: built where nvcc is, importable without a GPU,
reporting what it was built for, wired into every op, and checking its arguments on the host.
(GPU correctness: the op tests, e.g. tests/test_grouped_mm.py, with their cuda parameters.)"""

import inspect
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
    pytest.skip("no nvcc on PATH: the CUDA extension is not built here", allow_module_level=True)
if os.environ.get("MODEKERNELS_BUILD_CUDA") == "0":
    pytest.skip("MODEKERNELS_BUILD_CUDA=0: the CUDA extension is skipped", allow_module_level=True)

from modekernels import _C, backends  # noqa: E402


def _expected_archs() -> list[int]:
    archs = os.environ.get("MODEKERNELS_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
    return sorted({int(a.strip().rstrip("af")) for a in archs if a.strip()})


def test_built_with_cuda_for_the_configured_archs():
    assert _C.built_with_cuda() is True
    assert _C.built_archs() == _expected_archs()
    has_90a = "90a" in os.environ.get("MODEKERNELS_CUDA_ARCHS", "80;90a")
    assert _C.has_sm90_kernels() is has_90a
    assert backends.cuda_extension_error() is None


def test_supports_arch_from_the_lowest_built_arch_up():
    lowest = _C.built_archs()[0]
    assert not _C.supports_arch(lowest - 5)
    assert not _C.supports_arch(70)
    for sm in (lowest, 90, 100, 120):
        assert _C.supports_arch(sm), sm


def test_bad_dtype_code_raises_value_error():
    common = dict(x=0, offs=0, S=0, K=0, N=0, E=0, x_stride_s=0, x_stride_k=0, stream=0)
    with pytest.raises(ValueError, match="dtype code"):
        _C.grouped_mm_simt(**common, w=0, y=0, w_stride_e=0, w_stride_k=0, w_stride_n=0, dtype=7)
    with pytest.raises(ValueError, match="dtype code"):
        _C.grouped_mm_weight_grad_simt(
            **common, dy=0, dw=0, dy_stride_s=0, dy_stride_n=0, dtype=-1
        )


def test_imports_without_touching_a_gpu():
    """A fresh process with no visible GPU imports _C and answers the build questions."""
    script = textwrap.dedent(
        """
        import modekernels._C as C
        assert C.built_with_cuda()
        print(C.built_archs(), C.supports_arch(90), C.has_sm90_kernels())
        """
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert str(_expected_archs()) in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path without a GPU")
def test_kernel_call_without_a_gpu_raises_runtime_error():
    """A launch with no usable device becomes a Python RuntimeError, not a crash."""
    with pytest.raises(RuntimeError):
        _C.grouped_mm_simt(
            **dict(x=0, w=0, offs=0, y=0, S=4, K=4, N=4, E=1, dtype=0, stream=0),
            **dict(x_stride_s=4, x_stride_k=1, w_stride_e=16, w_stride_k=4, w_stride_n=1),
        )


def _dispatch_tables() -> list[backends.Dispatch]:
    from modekernels.ops import grouped_mm, moe_mlp, neutral_residue, routing

    return [
        value
        for module in (grouped_mm, routing, moe_mlp, neutral_residue)
        for value in vars(module).values()
        if isinstance(value, backends.Dispatch)
    ]


def _required_parameters(function) -> list[str]:
    parameters = inspect.signature(function).parameters.values()
    return [p.name for p in parameters if p.default is inspect.Parameter.empty]


def test_every_op_has_a_cuda_backend_with_the_triton_signature():
    """Each op's cuda entry imports without a GPU and takes the triton entry's arguments."""
    tables = _dispatch_tables()
    assert {t.op for t in tables} >= {
        "grouped_mm", "route_top1", "route_top1_backward", "sort_by_expert", "moe_mlp_up",
        "moe_mlp_down", "neutral_residue", "neutral_residue_backward",
    }
    for table in tables:
        assert "cuda" in table.paths, table.op
        cuda, triton = table._load("cuda"), table._load("triton")
        assert _required_parameters(cuda) == _required_parameters(triton), table.op


def test_routing_expert_limit_matches_the_kernels():
    from modekernels.ops.routing import CUDA_MAX_EXPERTS

    assert _C.routing_max_experts() == CUDA_MAX_EXPERTS
    assert _C.routing_workspace_size(entries=10, E=CUDA_MAX_EXPERTS, rows_per_chunk=4) > 0
    with pytest.raises(ValueError, match="number of experts"):
        _C.routing_workspace_size(entries=10, E=CUDA_MAX_EXPERTS + 1, rows_per_chunk=4)
    assert _C.routing_rows_per_chunk(100) == 256
    assert -(-10**7 // _C.routing_rows_per_chunk(10**7)) <= 1024


def test_new_kernels_reject_bad_arguments_before_launching():
    """Argument errors are ValueErrors raised on the host, with or without a GPU."""
    with pytest.raises(ValueError, match="activation code"):
        _C.moe_mlp_up_epilogue(pre=0, bias=0, bias_stride_e=0, bias_stride_n=0, offs=0, S=4, E=1,
                               I=4, gated=False, activation=9, keep=False, h=0, dtype=0, stream=0)
    with pytest.raises(ValueError, match="gate code"):
        _C.neutral_residue_gate(x=0, T=4, d=4, x_stride_t=4, x_stride_d=1, w_gate=0,
                                w_gate_stride=1, b_gate=0, gate=0, g=0, dtype=0, stream=0)
    with pytest.raises(ValueError, match="dtype code"):
        _C.route_top1_backward(logits=0, T=4, E=2, stride_t=2, stride_e=1, dtype=5, lse=0,
                               expert_idx=0, dropped=0, routed=0, grad_gate=0, grad_aux=0,
                               grad_z=0, grad=0, stream=0)
    with pytest.raises(ValueError, match="workspace too small"):
        _C.sort_by_expert(idx=0, idx_is_int64=True, n=4, E=2, rows_per_chunk=2, perm=0, offs=0,
                          workspace=0, workspace_bytes=0, stream=0)
    with pytest.raises(ValueError, match="S must be T"):
        _C.moe_mlp_down_combine(out=0, perm=0, offs=0, S=5, E=1, N=4, T=2, top_k=2, bias=0,
                                bias_stride_e=0, bias_stride_n=0, gate=0, slot_row=0,
                                slot_expert=0, y=0, dtype=0, stream=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path without a GPU")
def test_routing_call_without_a_gpu_raises_runtime_error():
    with pytest.raises(RuntimeError):
        _C.sort_by_expert(idx=0, idx_is_int64=True, n=4, E=2, rows_per_chunk=2, perm=0, offs=0,
                          workspace=0, workspace_bytes=1 << 20, stream=0)
