"""Build of the optional CUDA extension ``modekernels._C`` (CMake + ninja + nvcc).

Everything else about the package lives in pyproject.toml. The extension is built when nvcc is
found (``$CUDA_HOME/bin/nvcc`` or ``nvcc`` on PATH); without nvcc the package installs as pure
Python and the ``cuda`` backend reports itself unavailable. That decision lives in
``build_backend/modekernels_cuda_build.py``, which the build backend (``modekernels_build``) also
uses to request the extension's build requirements (CUTLASS, CMake, ...) only when it is built.

Environment variables:
    MODEKERNELS_BUILD_CUDA   unset: build if nvcc is found; ``0``: never build; ``1``: build or
                             fail.
    MODEKERNELS_CUDA_ARCHS   CUDA architectures, ``;`` or ``,`` separated (default ``80;90a``).
                             The Hopper CUTLASS kernels need ``90a``; every listed arch gets the
                             generic kernels, and the lowest also as PTX for newer GPUs.
    CUDA_HOME                where the CUDA toolkit is (else nvcc is looked up on PATH).
    MAX_JOBS                 parallel compile jobs (default: the number of cores).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "build_backend"))  # also when run without the backend

from modekernels_cuda_build import cuda_skip_reason, find_nvcc  # noqa: E402

DEFAULT_ARCHS = "80;90a"


def _cuda_archs() -> str:
    archs = os.environ.get("MODEKERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
    return ";".join(a.strip() for a in archs.replace(",", ";").split(";") if a.strip())


def _cutlass_source_dir() -> str:
    """The ``source`` folder of the nvidia-cutlass wheel (holding ``include`` and ``tools``)."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the CUTLASS headers come from the nvidia-cutlass wheel (pip install "
            "nvidia-cutlass==4.2.0.0); it is not installed in this environment"
        )
    source = os.path.join(os.path.dirname(spec.origin), "source")
    if not os.path.isdir(os.path.join(source, "include", "cutlass")):
        raise RuntimeError(f"nvidia-cutlass has no headers under {source}")
    return source


def _build_tool(package: str, attribute: str, program: str) -> str:
    """The program shipped by a build requirement (cmake, ninja), else the one on PATH."""
    try:
        module = importlib.import_module(package)
        candidate = os.path.join(getattr(module, attribute), program)
        if os.access(candidate, os.X_OK):
            return candidate
    except ImportError:
        pass
    found = shutil.which(program)
    if found is None:
        raise RuntimeError(f"{program} not found: pip install {package}")
    return found


class CMakeExtension(Extension):
    """An extension whose sources CMakeLists.txt lists."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt into the extension's output folder."""

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found: set CUDA_HOME or put nvcc on PATH")
        output_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.join(ROOT, "build", f"cmake-{sys.implementation.cache_tag}")
        os.makedirs(build_dir, exist_ok=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        cmake = _build_tool("cmake", "CMAKE_BIN_DIR", "cmake")
        configure = [
            cmake,
            "-S", ROOT,
            "-B", build_dir,
            "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={_build_tool('ninja', 'BIN_DIR', 'ninja')}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DMODEKERNELS_CUDA_ARCHS={_cuda_archs()}",
            f"-DMODEKERNELS_CUTLASS_DIR={_cutlass_source_dir()}",
            f"-DMODEKERNELS_OUTPUT_DIR={output_dir}",
            f"-DMODEKERNELS_EXTENSION_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
        ]
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", build_dir, "-j", jobs], check=True)


def _ext_modules() -> list[Extension]:
    reason = cuda_skip_reason()
    if reason:
        print(f"modekernels: {reason}, installing without the CUDA extension", file=sys.stderr)
        return []
    return [CMakeExtension("modekernels._C")]


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": CMakeBuild})
