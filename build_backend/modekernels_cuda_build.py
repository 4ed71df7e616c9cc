"""Whether the optional CUDA extension ``modekernels._C`` is built, and what building it needs.

One place for the decision that the build backend (which build requirements to ask for) and
setup.py (which extensions to build) both make. MODEKERNELS_BUILD_CUDA: unset, build if nvcc is
found (``$CUDA_HOME/bin`` or ``$CUDA_PATH/bin``, else PATH); ``0``, never build; ``1``, build or
fail.
"""

from __future__ import annotations

import os
import shutil

# What only building the extension needs (CMake + ninja + pybind11 and the CUTLASS headers of the
# nvidia-cutlass wheel, whose dependencies have no macOS wheel): requested only for that build.
CUDA_BUILD_REQUIRES = ["pybind11>=2.12", "cmake>=3.26", "ninja", "nvidia-cutlass==4.2.0.0"]


def build_cuda_setting() -> str:
    """MODEKERNELS_BUILD_CUDA as ``""`` (unset), ``"0"`` or ``"1"``; SystemExit for other values."""
    value = os.environ.get("MODEKERNELS_BUILD_CUDA", "").strip()
    if value not in ("", "0", "1"):
        raise SystemExit(f"MODEKERNELS_BUILD_CUDA must be 0, 1 or unset, got {value!r}")
    return value


def find_nvcc() -> str | None:
    """The path of nvcc: ``$CUDA_HOME/bin/nvcc`` (or ``$CUDA_PATH``), else nvcc on PATH, else
    None."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        candidate = os.path.join(cuda_home, "bin", "nvcc")
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("nvcc")


def cuda_skip_reason() -> str | None:
    """Why the extension is not built (``"MODEKERNELS_BUILD_CUDA=0"``, ``"nvcc not found"``), or
    None when it is."""
    setting = build_cuda_setting()
    if setting == "0":
        return "MODEKERNELS_BUILD_CUDA=0"
    if setting == "" and find_nvcc() is None:
        return "nvcc not found"
    return None
