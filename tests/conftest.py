"""Shared test setup: the device under test and the backends that can run on it.

Without a GPU the Triton kernels run in the interpreter, which must be switched on before
Triton's ``jit`` decorators run, so before anything imports ``modekernels.triton_kernels``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from modekernels import backends  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def backend_params(*names: str) -> list:
    """pytest params for the named backends on DEVICE, each skipped with the reason it cannot
    run here (the reference always runs)."""
    params = []
    for name in names or backends.BACKENDS:
        reason = backends.availability(name, DEVICE)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
