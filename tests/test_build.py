"""The build backend (build_backend/modekernels_build.py): the CUDA extension's build
requirements (nvidia-cutlass, whose dependencies have no macOS wheel, CMake, ...) are requested
only when the extension will be built, and an editable build that skips the extension removes one
left in the tree by an earlier build. The PEP 517 hooks run in a subprocess on a copy of the
source tree (they write egg-info and build folders), with nvcc found or not as each test sets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import tomllib
from pathlib import Path

import pytest

setuptools = pytest.importorskip("setuptools", reason="the build backend wraps setuptools")
if int(setuptools.__version__.split(".")[0]) < 69:  # an environment not made from the test extra
    pytest.skip(f"the build backend needs setuptools>=69 (pyproject.toml), found "
                f"{setuptools.__version__}", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "build_backend"))

from modekernels_cuda_build import CUDA_BUILD_REQUIRES  # noqa: E402

# What the backend, setup.py and the sdist need of the tree: no tests or earlier build outputs.
BUILD_INPUTS = [
    "pyproject.toml", "setup.py", "README.md", "MANIFEST.in", "CMakeLists.txt", "build_backend",
    "csrc", "modekernels", "triton_kernels",
]


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory) -> Path:
    tree = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, tree / name, ignore=ignore)
        else:
            shutil.copy(ROOT / name, tree / name)
    return tree


@pytest.fixture(scope="module")
def fake_cuda_home(tmp_path_factory) -> Path:
    """A folder whose bin/ holds an executable named nvcc (never run: the tests build nothing)."""
    home = tmp_path_factory.mktemp("cuda")
    nvcc = home / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\nexit 1\n")
    nvcc.chmod(0o755)
    return home


def _hook_env(tmp_path: Path, setting: str | None, nvcc: str | None, cuda_home: Path) -> dict:
    """The environment with MODEKERNELS_BUILD_CUDA = setting (None: unset) and nvcc found on PATH
    (``"path"``), through CUDA_HOME (``"cuda_home"``) or nowhere (None)."""
    unset = ("MODEKERNELS_BUILD_CUDA", "CUDA_HOME", "CUDA_PATH")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    empty_bin = tmp_path / "empty_bin"
    empty_bin.mkdir(exist_ok=True)
    env["PATH"] = str(cuda_home / "bin" if nvcc == "path" else empty_bin)
    if nvcc == "cuda_home":
        env["CUDA_HOME"] = str(cuda_home)
    if setting is not None:
        env["MODEKERNELS_BUILD_CUDA"] = setting
    return env


def _run_hooks(tree: Path, env: dict, calls: str) -> subprocess.CompletedProcess:
    """Run ``calls`` (Python using ``backend``, the imported build backend) in ``tree``; they
    print their results as JSON on the last line of stdout."""
    script = """
        import json, sys
        sys.path.insert(0, "build_backend")
        import modekernels_build as backend
    """
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script) + textwrap.dedent(calls)],
        cwd=tree, env=env, capture_output=True, text=True, timeout=300,
    )


def test_pyproject_uses_the_in_tree_backend_and_no_cuda_requirement():
    build_system = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]
    assert build_system["build-backend"] == "modekernels_build"
    assert build_system["backend-path"] == ["build_backend"]
    requires = " ".join(build_system["requires"])
    for cuda_only in ("nvidia-cutlass", "pybind11", "cmake", "ninja"):
        assert cuda_only not in requires
    assert "nvidia-cutlass==4.2.0.0" in CUDA_BUILD_REQUIRES


@pytest.mark.parametrize(
    "setting, nvcc, builds",
    [
        ("0", "path", False),
        ("0", None, False),
        (None, None, False),
        (None, "path", True),
        (None, "cuda_home", True),
        ("1", None, True),  # build or fail: the build then fails without nvcc
    ],
    ids=["0_with_nvcc", "0_without_nvcc", "unset_without_nvcc", "unset_nvcc_on_path",
         "unset_nvcc_in_cuda_home", "1_without_nvcc"],
)
def test_cuda_build_requirements_only_when_the_extension_is_built(
    source_tree, fake_cuda_home, tmp_path, setting, nvcc, builds
):
    env = _hook_env(tmp_path, setting, nvcc, fake_cuda_home)
    result = _run_hooks(
        source_tree,
        env,
        """
        print(json.dumps([backend.get_requires_for_build_wheel(),
                          backend.get_requires_for_build_editable()]))
        """,
    )
    assert result.returncode == 0, result.stderr
    for requires in json.loads(result.stdout.splitlines()[-1]):
        cuda_requires = [r for r in requires if r in CUDA_BUILD_REQUIRES]
        assert cuda_requires == (CUDA_BUILD_REQUIRES if builds else []), requires


def test_bad_setting_stops_the_build(source_tree, fake_cuda_home, tmp_path):
    env = _hook_env(tmp_path, "yes", "path", fake_cuda_home)
    result = _run_hooks(source_tree, env, "backend.get_requires_for_build_wheel()")
    assert result.returncode != 0
    assert "MODEKERNELS_BUILD_CUDA must be 0, 1 or unset, got 'yes'" in result.stderr


@pytest.mark.parametrize("setting", ["0", None], ids=["0", "unset_without_nvcc"])
def test_editable_build_without_the_extension_removes_a_stale_one(
    source_tree, fake_cuda_home, tmp_path, setting
):
    """An extension built by an earlier editable install would otherwise stay in the tree and be
    imported by the package installed without it."""
    stale = source_tree / "modekernels" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    stale.write_bytes(b"an earlier build")
    env = _hook_env(tmp_path, setting, None, fake_cuda_home)
    build = f"print(json.dumps(backend.build_editable({str(tmp_path)!r})))"
    result = _run_hooks(source_tree, env, build)
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert f"removed the stale CUDA extension {stale}" in result.stderr
    assert "installing without the CUDA extension" in result.stderr
    assert (tmp_path / json.loads(result.stdout.splitlines()[-1])).is_file()


def test_requirement_hooks_leave_a_built_extension_alone(source_tree, fake_cuda_home, tmp_path):
    """Only the editable build removes the in-tree extension, not the hooks that pip calls
    before it (nor a regular wheel build, which never ships the in-tree file)."""
    built = source_tree / "modekernels" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    built.write_bytes(b"a build")
    env = _hook_env(tmp_path, "0", None, fake_cuda_home)
    result = _run_hooks(source_tree, env, "backend.get_requires_for_build_editable()")
    assert result.returncode == 0, result.stderr
    assert built.exists()
    built.unlink()


def test_sdist_holds_the_build_backend_and_the_cuda_sources(source_tree, fake_cuda_home, tmp_path):
    """An sdist builds: it carries pyproject.toml's backend-path folder, and csrc/ with
    CMakeLists.txt for the extension."""
    env = _hook_env(tmp_path, "0", None, fake_cuda_home)
    build = f"print(json.dumps(backend.build_sdist({str(tmp_path)!r})))"
    result = _run_hooks(source_tree, env, build)
    assert result.returncode == 0, result.stderr
    with tarfile.open(tmp_path / json.loads(result.stdout.splitlines()[-1])) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"build_backend/modekernels_build.py", "build_backend/modekernels_cuda_build.py",
            "CMakeLists.txt", "csrc/bindings.cpp", "setup.py"} <= names
