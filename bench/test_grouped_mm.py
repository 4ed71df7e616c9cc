"""Grouped GEMM ``y[rows of e] = x[rows of e] @ w[e]``: forward and forward+backward, bf16, and
float32 at one shape.

Providers, first the baseline: ``loop`` (eager ``x[s:e] @ w[i]`` per group, concatenated, with
the group bounds known on the host), ``torch`` (``torch._grouped_mm``, skipped with its error
where it cannot run), and ``modekernels.grouped_mm`` with the ``triton`` and ``cuda`` backends,
and ``cuda-sm80``: the cuda backend with its CUTLASS 2.x (mma.sync) kernels forced, which on
Hopper shows what the CUTLASS 3 kernels gain (elsewhere it is what ``cuda`` runs anyway).

Problems (E, S, K, N): Mixtral-like 8 x (4096 -> 14336), 128 small experts (2048 -> 1536) and
64 experts (4096 -> 1024); each with a uniform split and a skewed one (group 0 holds half the
rows). TFLOP/s counts 2·S·K·N for the forward and 3x that for forward+backward (dX and dW);
bytes count each operand read and each result written once (3x for forward+backward). Before timing, each provider's
results are checked against an fp32 loop (relative Frobenius error under 1e-2).

float32 (64 experts, uniform): with PyTorch's default float32 matmul precision (no TF32) the
kernels' dot runs on FMAs, not tensor cores, so the loop (cuBLAS SGEMM per group) is the bar
there; the fraction of the bf16 matmul ceiling is low by nature.
"""

from __future__ import annotations

import pytest
import torch

import modekernels
from harness import DEVICE, QUICK, provider_params, relative_error, report, run

SHAPES = (
    [(8, 64, 32, 48), (5, 60, 48, 40), (8, 48, 40, 32)]
    if QUICK
    else [(8, 16384, 4096, 14336), (128, 65536, 2048, 1536), (64, 16384, 4096, 1024)]
)
FLOAT32_SHAPE = SHAPES[-1]
PROVIDERS = provider_params("loop", "torch", "triton", "cuda", "cuda-sm80")


def split_bounds(rows: int, groups: int, split: str) -> list[tuple[int, int]]:
    """(start, end) rows of each group: ``uniform`` (sizes differ by at most one) or ``skewed``
    (group 0 holds half the rows, the others share the rest uniformly)."""
    if split == "uniform":
        sizes = [rows // groups + (e < rows % groups) for e in range(groups)]
    else:
        head, rest = rows // 2, rows - rows // 2
        sizes = [head] + [rest // (groups - 1) + (e < rest % (groups - 1)) for e in range(groups - 1)]
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return list(zip([0] + ends[:-1], ends))


def loop_grouped_mm(x, w, bounds):
    return torch.cat([x[start:end] @ w[e] for e, (start, end) in enumerate(bounds)])


def provider_forward(provider: str, bounds, offs):
    """The provider's forward as ``f(x, w) -> y``."""
    if provider == "loop":
        return lambda x, w: loop_grouped_mm(x, w, bounds)
    if provider == "torch":
        return lambda x, w: torch._grouped_mm(x, w, offs)
    return lambda x, w: modekernels.grouped_mm(x, w, offs, backend=provider.split("-")[0])


def step(forward, mode: str, x, w, dy):
    """One timed call: the forward, or the forward and the gradients of x and w."""
    if mode == "fwd":
        return lambda: (forward(x, w),)
    return lambda: torch.autograd.grad(forward(x, w), (x, w), dy)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("split", ["uniform", "skewed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "E{}-S{}-K{}-N{}".format(*s))
def test_grouped_mm(benchmark, ceilings, monkeypatch, shape, split, mode, provider):
    bench_grouped_mm(benchmark, ceilings, monkeypatch, shape, split, mode, provider, torch.bfloat16)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_grouped_mm_float32(benchmark, ceilings, monkeypatch, mode, provider):
    bench_grouped_mm(benchmark, ceilings, monkeypatch, FLOAT32_SHAPE, "uniform", mode, provider, torch.float32)


def bench_grouped_mm(benchmark, ceilings, monkeypatch, shape, split, mode, provider, dtype):
    """Check the provider's results against an fp32 loop, then time it."""
    if provider == "cuda-sm80":
        from modekernels.cuda import grouped_mm as cuda_grouped_mm

        monkeypatch.setattr(cuda_grouped_mm, "_FORCE_SM80", True)
    E, S, K, N = shape
    bounds = split_bounds(S, E, split)
    offs = torch.tensor([end for _, end in bounds], dtype=torch.int32, device=DEVICE)
    backward = mode == "fwdbwd"
    x = torch.randn(S, K, device=DEVICE, dtype=dtype).requires_grad_(backward)
    w = (torch.randn(E, K, N, device=DEVICE, dtype=dtype) * K**-0.5).requires_grad_(backward)
    dy = torch.randn(S, N, device=DEVICE, dtype=dtype) if backward else None

    call = step(provider_forward(provider, bounds, offs), mode, x, w, dy)
    try:
        results = call()
    except Exception as exc:  # a torch built-in that does not support this call
        if provider != "torch":
            raise
        pytest.skip(f"torch._grouped_mm cannot run here: {type(exc).__name__}: {exc}")
    x32, w32 = (t.detach().float().requires_grad_(backward) for t in (x, w))
    expected = step(provider_forward("loop", bounds, offs), mode, x32, w32,
                    dy.float() if backward else None)()
    for name, actual, exact in zip(("y",) if not backward else ("dx", "dw"), results, expected):
        error = relative_error(actual, exact)
        assert error < 1e-2, f"{provider} {name}: relative error {error:.2e} against fp32"
    del results, expected, x32, w32

    dtype_name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    run(benchmark, call, group=f"grouped_mm {mode} E={E} S={S} K={K} N={N} {split} {dtype_name}")
    operands = x.nbytes + w.nbytes + S * N * x.element_size()
    report(
        benchmark,
        provider=provider,
        baseline="loop",
        ceilings=ceilings,
        flops=(3 if backward else 1) * 2 * S * K * N,
        nbytes=(3 if backward else 1) * operands,
    )
