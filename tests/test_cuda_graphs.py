"""The GPU backends inside CUDA graphs and on side streams (GPU only; skipped elsewhere).

``torch.cuda.graph`` capture (and ``torch.compile(mode="reduce-overhead")``, which captures)
requires every launch to be asynchronous on the current stream: no host synchronisation, no
synchronous copy, no allocation outside the graph's pool. Each op is captured once on fixed
inputs, the inputs are overwritten with fresh values, and a replay must equal an eager call on
those values. The same ops launched on a side stream must read and write on that stream.
"""

from __future__ import annotations

import pytest
import torch
from conftest import backend_params

import modekernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

BACKENDS = backend_params("triton", "cuda")
T, H, I, E, K = 96, 64, 48, 5, 2


def _grouped_mm_case():
    offs = torch.tensor([10, 10, 50, 70, T], dtype=torch.int32, device="cuda")
    inputs = [torch.randn(T, H, device="cuda", dtype=torch.bfloat16),
              torch.randn(E, I, H, device="cuda", dtype=torch.bfloat16).transpose(1, 2)]
    return inputs, lambda x, w, backend: (modekernels.grouped_mm(x, w, offs, backend=backend),)


def _moe_mlp_case():
    idx = torch.randint(0, E, (T, K), device="cuda")
    inputs = [torch.randn(T, H, device="cuda", dtype=torch.bfloat16),
              torch.rand(T, K, device="cuda"),
              torch.randn(E, H, 2 * I, device="cuda", dtype=torch.bfloat16) / H**0.5,
              torch.randn(E, I, H, device="cuda", dtype=torch.bfloat16) / I**0.5]

    def run(x, gate, w1, w2, backend):
        return (modekernels.moe_mlp(x, idx, gate, w1, w2, activation="silu", gated=True,
                                    backend=backend),)

    return inputs, run


def _route_top1_case():
    inputs = [torch.randn(T, E, device="cuda", dtype=torch.bfloat16)]

    def run(logits, backend):
        r = modekernels.route_top1(logits, capacity_factor=1.25, backend=backend)
        return r.expert_idx, r.gate, r.perm, r.offs, r.aux_loss, r.z_loss, r.dropped

    return inputs, run


def _neutral_residue_case(sparse: bool):
    d_a = 32
    inputs = [torch.randn(T, H, device="cuda", dtype=torch.bfloat16),
              torch.randn(d_a, H, device="cuda", dtype=torch.bfloat16) / H**0.5,
              torch.randn(d_a, H, device="cuda", dtype=torch.bfloat16) / H**0.5,
              torch.randn(H, d_a, device="cuda", dtype=torch.bfloat16) / d_a**0.5,
              torch.randn(H, device="cuda", dtype=torch.bfloat16) / H**0.5]

    def run(x, w_in, w_glu, w_out, w_gate, backend):
        b_gate = torch.zeros((), device="cuda", dtype=torch.bfloat16)
        return modekernels.neutral_residue(x, w_in, w_glu, w_out, w_gate, b_gate, residual=x,
                                           sparse=sparse, backend=backend)

    return inputs, run


CASES = {
    "grouped_mm": _grouped_mm_case,
    "moe_mlp": _moe_mlp_case,
    "route_top1": _route_top1_case,
    "neutral_residue": lambda: _neutral_residue_case(False),
    "neutral_residue_sparse": lambda: _neutral_residue_case(True),
}


def _refill(tensors: list[torch.Tensor]) -> None:
    """New values in place (the captured graph reads these addresses)."""
    for t in tensors:
        t.copy_(torch.randn_like(t) if t.dtype != torch.float32 else torch.rand_like(t))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_replayed_graph_equals_eager(backend, case):
    inputs, run = CASES[case]()
    run(*inputs, backend)  # warm up (Triton compiles and autotunes) before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run(*inputs, backend)
    _refill(inputs)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, run(*inputs, backend), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_side_stream_equals_default_stream(backend, case):
    """Inputs written on a side stream and the op launched there: the op must run on that
    stream (torch's current stream), after the writes and before the reads that follow."""
    inputs, run = CASES[case]()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _refill(inputs)
        got = [t.clone() for t in run(*inputs, backend)]
    torch.cuda.current_stream().wait_stream(side)
    for t in inputs:  # allocated on the default stream, used on the side stream
        t.record_stream(side)
    for t in got:  # allocated on the side stream, read on the default one
        t.record_stream(torch.cuda.current_stream())
    for g, w in zip(got, run(*inputs, backend), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduce_overhead_compile_equals_eager(backend):
    """torch.compile's CUDA-graph mode over the expert MLP, forward and backward."""
    inputs, run = _moe_mlp_case()
    leaves = [t.requires_grad_() for t in inputs]

    def step(x, gate, w1, w2):
        (y,) = run(x, gate, w1, w2, backend)
        return torch.autograd.grad(y.float().square().sum(), [x, gate, w1, w2])

    compiled = torch.compile(step, mode="reduce-overhead")
    for _ in range(3):  # record, then replay
        got = [g.clone() for g in compiled(*leaves)]
    for g, w in zip(got, step(*leaves), strict=True):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)
