"""The PEP 517 build backend of modekernels: setuptools' ``build_meta``, with two changes.

- The CUDA extension's build requirements (:data:`modekernels_cuda_build.CUDA_BUILD_REQUIRES`)
  are requested only when the extension will be built, so a pure-Python build (no nvcc, or
  ``MODEKERNELS_BUILD_CUDA=0``) neither downloads nor needs them.
- An editable build that skips the extension removes a ``modekernels/_C*.so`` left in the tree
  by an earlier build, which the installed package would otherwise import.

pyproject.toml names it with ``backend-path = ["build_backend"]``.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import build_meta as _setuptools
from setuptools.build_meta import (  # noqa: F401  (hooks used unchanged)
    build_sdist,
    build_wheel,
    get_requires_for_build_sdist,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)

from modekernels_cuda_build import CUDA_BUILD_REQUIRES, cuda_skip_reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_requires() -> list[str]:
    return [] if cuda_skip_reason() else list(CUDA_BUILD_REQUIRES)


def get_requires_for_build_wheel(config_settings=None) -> list[str]:
    return _setuptools.get_requires_for_build_wheel(config_settings) + _cuda_requires()


def get_requires_for_build_editable(config_settings=None) -> list[str]:
    return _setuptools.get_requires_for_build_editable(config_settings) + _cuda_requires()


def _remove_stale_extension(reason: str) -> None:
    """Delete the in-tree ``modekernels/_C*.so`` of an earlier editable build, saying so."""
    for path in glob.glob(os.path.join(ROOT, "modekernels", "_C*.so")):
        os.remove(path)
        print(f"modekernels: {reason}: removed the stale CUDA extension {path}", file=sys.stderr)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None) -> str:
    reason = cuda_skip_reason()
    if reason:
        _remove_stale_extension(reason)
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
