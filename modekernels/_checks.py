"""Argument checks shared by the ops: each failure names the argument and what was expected.

Metadata checks (rank, dtype, device, shape) are cheap and run everywhere, the fake kernels
included. Value checks (offsets, indices) read tensor values, so they run only where the host can
see them without a device synchronisation: CPU tensors, outside ``torch.compile`` tracing. Checks
of a number argument likewise run only where it is concrete (:func:`number_visible`).
"""

from __future__ import annotations

import numbers
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    *,
    rank: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of the given rank, dtype and device; return it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype {_names(dtypes)}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the other inputs, got {t.device}")
    return t


def check_dim(name: str, actual: int, expected: int, what: str) -> None:
    """Raise if a dimension differs from the one implied by another argument."""
    if actual != expected:
        raise ValueError(f"{name} must be {expected} ({what}), got {actual}")


def number_visible(value: object) -> bool:
    """Whether checks may read the number ``value``: not while ``torch.compile`` traces, which
    may stand a SymInt, a SymFloat or a 0-d tensor in for an int or float that varies between
    calls, and not symbolic. The op's real kernel sees the concrete number and checks it."""
    symbolic = isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool))
    return not symbolic and not torch.compiler.is_compiling()


def values_visible(t: torch.Tensor) -> bool:
    """Whether value checks may read ``t``: on the CPU and not while tracing."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_offsets(name: str, offs: torch.Tensor, total: int, total_name: str) -> None:
    """Cumulative end offsets: non-decreasing, none negative, the last at most ``total``."""
    if not values_visible(offs) or offs.numel() == 0:
        return
    if bool((offs < 0).any()):
        raise ValueError(f"{name} must be non-negative, got {offs.tolist()}")
    if bool((offs[1:] < offs[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing (cumulative ends), got {offs.tolist()}")
    last = int(offs[-1])
    if last > total:
        raise ValueError(f"{name}[-1] must be at most {total_name} = {total}, got {last}")


def check_index_range(name: str, t: torch.Tensor, high: int, what: str) -> None:
    """Index values in [0, high), checked only where the host can see them (``values_visible``)."""
    if not values_visible(t) or t.numel() == 0:
        return
    low, top = int(t.min()), int(t.max())
    if low < 0 or top >= high:
        raise ValueError(f"{name} must lie in [0, {high}) ({what}), got values in [{low}, {top}]")


def check_positive_int(name: str, value: object) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an integer (not a bool) ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_option(name: str, value: object, allowed: tuple) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is one of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_flag(name: str, value: object) -> None:
    """Raise TypeError naming ``name`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
