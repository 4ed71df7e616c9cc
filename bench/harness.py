"""What every benchmark under ``bench/`` shares: device, providers, timing, ceilings, reporting.

A benchmark is a pytest-benchmark test parametrized over *providers* (the implementations being
compared: an eager baseline first, then ``torch`` built-ins and the modekernels backends). It
times one provider with :func:`run`, then records what it computed with :func:`report`::

    from harness import DEVICE, QUICK, provider_params, report, run

    @pytest.mark.parametrize("provider", provider_params("loop", "triton", "cuda"))
    def test_thing(benchmark, ceilings, provider):
        fn = make_callable(provider)                      # no host sync inside fn
        run(benchmark, fn, group=f"thing T={T} H={H}")   # one group per problem
        report(benchmark, provider=provider, baseline="loop", flops=2 * T * H * H,
               nbytes=x.nbytes + y.nbytes, ceilings=ceilings)

At the end of the session ``conftest.py`` gives each record its ``speedup`` over the group's
baseline provider (``baseline mean / provider mean``; above 1 is faster), stores it in
``benchmark.extra_info`` before ``--benchmark-json`` is written, and prints one side-by-side table
per group. The JSON's top level also gets ``"modekernels": {"device", "versions", "ceilings"}``.

``QUICK`` (always on the CPU, or with ``MODEKERNELS_BENCH_QUICK=1``) means a smoke run: tiny sizes
chosen by each benchmark, few rounds, Triton through its interpreter; numbers are meaningless
there, only that every path runs.
"""

from __future__ import annotations

import os

import torch

# Before anything imports modekernels.triton_kernels (whose @triton.jit reads it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402

from modekernels import backends, info  # noqa: E402

__all__ = [
    "DEVICE",
    "QUICK",
    "Ceilings",
    "Record",
    "batched_mm_bytes",
    "environment",
    "measure_ceilings",
    "provider_params",
    "records",
    "report",
    "run",
    "skip_unless_batched_mm_fits",
    "synchronize",
]

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QUICK = DEVICE.type == "cpu" or os.environ.get("MODEKERNELS_BENCH_QUICK", "0") == "1"

# Timed rounds and untimed warm-up rounds per benchmark (warm-up covers compilation, autotuning
# and allocator growth). A quick run's numbers mean nothing, so it spends no time on warm-up.
ROUNDS, WARMUP_ROUNDS = (2, 0) if QUICK else (20, 3)


def synchronize() -> None:
    """Wait for the device to finish queued work (no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@functools.cache
def environment() -> dict:
    """``{"device": name, "versions": {...}}`` as ``modekernels info`` reports them (python,
    modekernels, torch, CUDA, triton, transformers)."""
    found = info.collect()
    key = f"cuda:{torch.cuda.current_device()}" if DEVICE.type == "cuda" else "cpu"
    return {"device": found["devices"][key]["name"], "versions": found["versions"]}


def provider_params(*names: str) -> list:
    """pytest params, one per provider name, in the given order (the first is the baseline).

    A name that is a modekernels backend (``reference``, ``triton``, ``cuda``), or a backend
    with a variant after a dash (``cuda-sm80``), is skipped, with the reason, when
    :func:`modekernels.backends.availability` says the backend cannot run on DEVICE. Any other
    name (an eager loop, a ``torch`` built-in) always runs; a built-in that turns out not to
    support the call should ``pytest.skip`` with its error inside the test.
    """
    params = []
    for name in names:
        backend = name.split("-")[0]
        reason = backends.availability(backend, DEVICE) if backend in backends.BACKENDS else None
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def run(benchmark, fn: Callable[[], object], *, group: str, calls_per_sync: int = 1) -> None:
    """Time ``fn()`` with ``benchmark`` under ``group`` (the problem; providers share it).

    ``WARMUP_ROUNDS`` untimed rounds, then ``ROUNDS`` timed rounds. Each round makes
    ``calls_per_sync`` back-to-back calls followed by one device synchronisation inside the timed
    region, and pytest-benchmark records the time per call. Keep 1 (a sync after every call) for
    kernels of a millisecond or more; raise it for kernels of tens of microseconds, where the cost
    of a host sync would dominate. ``fn`` itself must not synchronise. Python's garbage collector
    is off while timing.
    """
    benchmark.group = group
    calls = 0

    def timed() -> None:
        nonlocal calls
        fn()
        calls += 1
        if calls % calls_per_sync == 0:
            synchronize()

    gc.collect()
    gc.disable()  # a collection pause inside a timed round would be charged to the provider
    try:
        synchronize()
        benchmark.pedantic(
            timed, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=calls_per_sync
        )
    finally:
        gc.enable()


def batched_mm_bytes(tokens: int, hidden: int, inter: int, top_k: int, dtype: torch.dtype) -> int:
    """The expert weights transformers' ``batched_mm`` experts gather per layer call: one
    (2·inter, hidden) and one (hidden, inter) matrix per token-slot, tokens·top_k of them."""
    return tokens * top_k * 3 * hidden * inter * dtype.itemsize


def skip_unless_batched_mm_fits(tokens: int, hidden: int, inter: int, top_k: int,
                                dtype: torch.dtype) -> None:
    """``pytest.skip`` on a GPU where :func:`batched_mm_bytes` exceeds half the free memory (it
    would run out of memory, or evict everything else)."""
    if DEVICE.type != "cuda":
        return
    needed = batched_mm_bytes(tokens, hidden, inter, top_k, dtype)
    if needed > torch.cuda.mem_get_info(DEVICE)[0] // 2:
        pytest.skip(f"batched_mm would gather {needed / 2**30:.0f} GiB of expert weights")


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """Hardware limits measured in this run, to express each benchmark as a fraction of them."""

    matmul_tflops: float  # dense torch.mm
    matmul: str  # what was measured, e.g. "torch.mm bfloat16 8192x8192x8192"
    copy_gbps: float  # device-to-device copy, bytes read + bytes written per second
    copy: str


def _mean_seconds(fn: Callable[[], object], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.mean(times)


def measure_ceilings() -> Ceilings:
    """Dense matmul TFLOP/s (bf16 8192³ on a GPU; fp32 256³ on the CPU) and copy GB/s (1 GiB
    on a GPU, far past L2; 16 MiB on the CPU), each the mean of timed runs after warm-up."""
    if DEVICE.type == "cuda":  # 20 warm-up runs also let an idle GPU reach its clocks
        size, dtype, copy_bytes, runs, warmup = 8192, torch.bfloat16, 1 << 30, 20, 20
    else:
        size, dtype, copy_bytes, runs, warmup = 256, torch.float32, 16 << 20, 3, 1
    a = torch.randn(size, size, device=DEVICE, dtype=dtype)
    b = torch.randn(size, size, device=DEVICE, dtype=dtype)
    out = torch.empty(size, size, device=DEVICE, dtype=dtype)
    mm_s = _mean_seconds(lambda: torch.mm(a, b, out=out), runs, warmup)
    del a, b, out

    src = torch.empty(copy_bytes, device=DEVICE, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    copy_s = _mean_seconds(lambda: dst.copy_(src), runs, warmup)
    del src, dst
    dtype_name = str(dtype).removeprefix("torch.")
    return Ceilings(
        matmul_tflops=2 * size**3 / mm_s / 1e12,
        matmul=f"torch.mm {dtype_name} {size}x{size}x{size}",
        copy_gbps=2 * copy_bytes / copy_s / 1e9,
        copy=f"Tensor.copy_ {copy_bytes >> 20} MiB, read + write",
    )


@dataclasses.dataclass
class Record:
    """One finished benchmark: its group, provider, mean seconds per call, and the
    ``benchmark.extra_info`` dict that goes into the JSON (``speedup`` is filled in at the end)."""

    group: str
    provider: str
    baseline: str
    mean_s: float | None
    extra_info: dict


# Filled by report(), in run order; read by conftest.py at the end of the session.
records: list[Record] = []


def report(
    benchmark,
    *,
    provider: str,
    baseline: str,
    ceilings: Ceilings,
    flops: float | None = None,
    nbytes: float | None = None,
    bar_nbytes: float | None = None,
) -> None:
    """Record in ``benchmark.extra_info`` the provider, its TFLOP/s (from ``flops`` per call) as a
    fraction of the matmul ceiling, its GB/s (from ``nbytes`` moved per call, read + written) as
    a fraction of the copy ceiling, the device and the versions. ``baseline`` names the provider
    the group is compared with (its speedup is 1). Call after :func:`run`. The fractions compare
    with the bf16 matmul ceiling on a GPU, whatever the benchmark's dtype.

    ``bar_nbytes``: the bytes a benchmark's bar is stated against, where they differ from
    ``nbytes``; recorded as ``fraction_of_bar_floor``, the time of moving them at the copy
    ceiling over the mean (a bar "within 1.3x of that floor" is met at 1/1.3 ≈ 0.77 or more)."""
    stats = benchmark.stats  # None when timing is disabled (--benchmark-disable)
    mean_s = stats.stats.mean if stats is not None else None
    extra = benchmark.extra_info
    extra.update(provider=provider, baseline=baseline, **environment())
    extra.update(ceiling_matmul_tflops=ceilings.matmul_tflops, ceiling_copy_gbps=ceilings.copy_gbps)
    if flops is not None and mean_s:
        extra["tflops"] = flops / mean_s / 1e12
        extra["fraction_of_matmul"] = extra["tflops"] / ceilings.matmul_tflops
    if nbytes is not None and mean_s:
        extra["gbps"] = nbytes / mean_s / 1e9
        extra["fraction_of_copy"] = extra["gbps"] / ceilings.copy_gbps
    if bar_nbytes is not None and mean_s:
        extra["fraction_of_bar_floor"] = bar_nbytes / (ceilings.copy_gbps * 1e9) / mean_s
    records.append(Record(benchmark.group, provider, baseline, mean_s, extra))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual - expected‖ / ‖expected‖ in float32: the check a provider passes before it is timed."""
    diff = torch.linalg.vector_norm(actual.float() - expected.float())
    return (diff / torch.linalg.vector_norm(expected.float()).clamp_min(1e-30)).item()
