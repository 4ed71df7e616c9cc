"""Shared test setup: the device under test and the backends that can run on it.

Without a GPU the Triton kernels run in the interpreter, which must be switched on before
Triton's ``jit`` decorators run, so before anything imports ``modekernels.triton_kernels``.
"""

import contextlib
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


@contextlib.contextmanager
def poisoned_allocations():
    """Fill every tensor that torch.empty / empty_like / new_empty returns with garbage (NaN for
    floats, -7 for integers, True for bools), so an output element a backend does not write
    shows up."""
    real = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.bool:
            return t.fill_(True)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    patch = pytest.MonkeyPatch()
    patch.setattr(torch, "empty", lambda *a, **k: poison(real[0](*a, **k)))
    patch.setattr(torch, "empty_like", lambda *a, **k: poison(real[1](*a, **k)))
    patch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison(real[2](self, *a, **k)))
    try:
        yield
    finally:
        patch.undo()


@pytest.fixture
def poisoned():
    """The test runs inside :func:`poisoned_allocations`."""
    with poisoned_allocations():
        yield


@pytest.fixture
def reference_backend():
    """The test runs with every op on the reference backend."""
    with backends.use_backend("reference"):
        yield
