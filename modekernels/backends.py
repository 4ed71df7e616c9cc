"""Backend selection: which implementation (``reference``, ``triton``, ``cuda``) runs an op.

Precedence, highest first:

1. the ``backend=`` argument of an op,
2. :func:`use_backend` (a setter that is also a context manager),
3. the environment variable ``MODEKERNELS_BACKEND``,
4. the automatic choice: the fastest backend for the device that can run the call
   (``reference`` on the CPU).

Every op's real kernel applies this precedence when it runs (:meth:`Dispatch.__call__`), so a
direct ``torch.ops.modekernels.*`` call and an exported or compiled graph (which records the
argument, usually None) follow :func:`use_backend` and the environment as they stand at that
moment, as the public functions do. An eager backward runs on the backend requested when its
forward ran (:func:`backward_request`), so a ``backward()`` outside the ``use_backend`` block of
its forward stays on the same backend; a compiled one resolves the request when it runs.

An explicit choice (1-3) that cannot run raises :class:`BackendUnavailable` saying why. The
automatic choice falls back to the next backend and logs each reason once: at WARNING when the
fallback lands on ``reference`` for a CUDA tensor (slow, and it reads values on the host), at
INFO otherwise.

Each op declares its implementations with a :class:`Dispatch` table of import paths, so that
importing :mod:`modekernels` imports neither Triton kernels nor the CUDA extension.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
from typing import Callable, Sequence

import torch

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "Dispatch",
    "availability",
    "get_backend",
    "record_runs",
    "use_backend",
]

logger = logging.getLogger("modekernels")

BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "MODEKERNELS_BACKEND"

# Automatic orders on a CUDA device, fastest first. Fused Triton kernels come first unless an op
# says otherwise (the Hopper CUTLASS grouped GEMM does); refine with measurements on each device.
TRITON_FIRST = ("triton", "cuda", "reference")
CUDA_FIRST = ("cuda", "triton", "reference")

_stack: list[str | None] = [None]
_logged: set[tuple[str, str, str]] = set()
_recorders: list[dict[str, str]] = []


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run the call; the message says why."""


def _check_name(name: str | None, what: str) -> None:
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS} or None, got {name!r}")


class use_backend:
    """Choose the backend for every op call that does not pass ``backend=``.

    Use it as a context manager (``with modekernels.use_backend("triton"): ...``), which restores
    the previous choice on exit, or call it once to set the choice for the rest of the process.
    ``use_backend(None)`` returns to the environment variable and then the automatic choice.

    The choice is process-wide, not per thread: threads that serve requests concurrently should
    pass ``backend=`` instead. An eager backward runs on its forward's backend; code that runs
    ops when the block has closed (a compiled backward, the forward recomputed by activation
    checkpointing during ``backward()``) resolves the choice then, so put ``backward()`` inside
    the block too, or set the choice for the process.
    """

    def __init__(self, name: str | None):
        _check_name(name, "use_backend(name)")
        self._previous = _stack[-1]
        _stack[-1] = name

    def __enter__(self) -> "use_backend":
        return self

    def __exit__(self, *exc) -> None:
        _stack[-1] = self._previous


def requested(argument: str | None = None) -> str | None:
    """The explicitly requested backend (argument, then :func:`use_backend`, then the
    environment), or None for the automatic choice. Safe to call while ``torch.compile`` traces."""
    _check_name(argument, "backend")
    if argument is not None:
        return argument
    if _stack[-1] is not None:
        return _stack[-1]
    env = os.environ.get(ENV_VAR) or None
    _check_name(env, f"the environment variable {ENV_VAR}")
    return env


def backward_request(backend: str | None, output: torch.Tensor) -> str | None:
    """The request an op's autograd context keeps for its backward, from the forward's
    ``backend`` argument and one of its ``output`` tensors: where the forward really ran (a plain
    tensor), :func:`requested` as it stood then, so that a ``backward()`` outside the
    ``use_backend`` block of its forward stays on that backend; while a graph is traced (fake or
    functional tensors), the argument alone, so that a compiled backward resolves the request
    when it runs instead of keeping the one of the tracing."""
    return requested(backend) if type(output) is torch.Tensor else backend


@contextlib.contextmanager
def record_runs():
    """Collect ``{op: backend}`` for every op implementation that runs inside the block (the
    backend last used for each op): which backend really ran, e.g. for a report."""
    runs: dict[str, str] = {}
    _recorders.append(runs)
    try:
        yield runs
    finally:
        _recorders.remove(runs)


def get_backend() -> str | None:
    """The backend chosen by :func:`use_backend` or the environment; None means automatic."""
    return requested(None)


def triton_interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"triton cannot be imported: {exc}"
    return None


@functools.cache
def cuda_extension_error() -> str | None:
    """None when ``modekernels._C`` imports and holds CUDA kernels, else why not."""
    try:
        from modekernels import _C
    except ImportError as exc:
        return (
            "the CUDA extension modekernels._C is not built "
            f"({exc}); reinstall with nvcc on PATH or MODEKERNELS_BUILD_CUDA=1"
        )
    if not _C.built_with_cuda():
        return "modekernels._C was built without CUDA kernels"
    return None


def availability(backend: str, device: torch.device | str) -> str | None:
    """None when ``backend`` can run on ``device``, else the reason it cannot."""
    _check_name(backend, "backend")
    device = torch.device(device)
    if backend == "reference":
        return None
    if backend == "triton":
        error = _triton_import_error()
        if error:
            return error
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            return None
        return (
            f"the triton backend runs on CUDA tensors, or on CPU tensors through the Triton "
            f"interpreter (TRITON_INTERPRET=1 set before importing modekernels); got a "
            f"{device.type} tensor"
        )
    # cuda
    if device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got a {device.type} tensor"
    error = cuda_extension_error()
    if error:
        return error
    from modekernels import _C

    major, minor = torch.cuda.get_device_capability(device)
    if not _C.supports_arch(major * 10 + minor):
        return (
            f"modekernels._C has no kernels for compute capability {major}.{minor} "
            f"(built for {_C.built_archs()}); rebuild with MODEKERNELS_CUDA_ARCHS"
        )
    return None


class Dispatch:
    """The implementations of one op, by backend, as ``"module:function"`` import paths.

    ``supports`` optionally maps a backend to a predicate over the call's arguments that returns
    None when the backend can run them, else the reason (for example an unsupported dtype).
    ``prefer`` gives the automatic order on a CUDA device, fastest first: a tuple of backends or
    a function of the device and the call's arguments returning one (default
    :data:`TRITON_FIRST`).
    """

    def __init__(
        self,
        op: str,
        *,
        supports: dict[str, Callable[..., str | None]] | None = None,
        prefer: tuple[str, ...] | Callable[[torch.device, Sequence], tuple[str, ...]] = TRITON_FIRST,
        **paths: str,
    ):
        unknown = set(paths) - set(BACKENDS)
        if unknown or "reference" not in paths:
            raise ValueError(f"{op}: backends must include 'reference' and be among {BACKENDS}")
        self.op = op
        self.paths = paths
        self.supports = supports or {}
        self.prefer = prefer

    @functools.cache
    def _load(self, backend: str) -> Callable:
        module, _, name = self.paths[backend].partition(":")
        return getattr(importlib.import_module(module), name)

    def _reason(self, backend: str, device: torch.device, args: Sequence) -> str | None:
        if backend not in self.paths:
            return f"{self.op} has no {backend} implementation"
        reason = availability(backend, device)
        if reason is None and backend in self.supports:
            reason = self.supports[backend](*args)
        return reason

    def resolve(self, backend: str | None, device: torch.device, args: Sequence = ()) -> str:
        """The backend that runs this call. ``backend`` is the requested one or None (auto)."""
        if backend is not None:
            reason = self._reason(backend, device, args)
            if reason is not None:
                raise BackendUnavailable(
                    f"{self.op}: backend {backend!r} was requested but cannot run: {reason}"
                )
            return backend
        if device.type != "cuda":
            return "reference"
        order = self.prefer(device, args) if callable(self.prefer) else self.prefer
        skipped = []
        for candidate in order:
            reason = self._reason(candidate, device, args)
            if reason is None:
                break
            skipped.append((candidate, reason))
        else:
            candidate = "reference"  # a custom order without it: the reference always runs
        for name, reason in skipped:
            self._log_once(name, reason, to_reference=candidate == "reference")
        return candidate

    def _log_once(self, backend: str, reason: str, *, to_reference: bool) -> None:
        """Log why the automatic choice skipped ``backend``, once per reason: a warning when the
        call then runs on the reference (slow on a GPU, and it reads values on the host)."""
        key = (self.op, backend, reason)
        if key in _logged:
            return
        _logged.add(key)
        message = f"modekernels: {self.op} skips the {backend} backend: {reason}"
        if to_reference:
            logger.warning("%s; it runs on the slow reference backend", message)
        else:
            logger.info("%s", message)

    def __call__(self, backend: str | None, device: torch.device, *args):
        """Run the implementation that :meth:`resolve` picks for ``args`` on ``device``;
        ``backend`` is the op's argument, to which the precedence of :func:`requested`
        (``use_backend``, then the environment) is applied here, when the op runs."""
        chosen = self.resolve(requested(backend), device, args)
        for runs in _recorders:
            runs[self.op] = chosen
        return self._load(chosen)(*args)
