"""The CUDA extension ``modekernels._C``: built where nvcc is, importable without a GPU, and
reporting what it was built for. (GPU correctness: tests/test_grouped_mm.py.)"""

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
