"""The fused expert MLP ``moe_mlp`` (gated SiLU, top-k routing): forward and forward+backward, bf16.

Providers on the same weights (a transformers ``MixtralExperts`` module, (E, out, in) layout):
transformers' own experts implementations ``eager`` (a loop over the experts hit), ``batched_mm``
(skipped where gathering one weight matrix per token-slot would not fit in memory) and
``grouped_mm`` (the baseline of the speedups), then ``modekernels.moe_mlp`` with the ``triton``
backend on the module's weights as transposed views.

Problems (E, T, H, I, k) from the issue: Mixtral 8x(4096 -> 14336) top-2, 128 small experts
(2048 -> 768) top-8, 8x(4096 -> 8192) and 64x(4096 -> 1024) top-1. TFLOP/s counts 6·T·k·H·I for
the forward (gate, up and down projections) and 3x that for forward+backward (gradients of x,
the weights and the routing weights). Routing: each token's k distinct experts drawn uniformly,
softmax weights. Before timing, each provider's output is checked against the float32-accumulated
reference backend (relative Frobenius error under 1e-2).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

import modekernels
from harness import DEVICE, QUICK, provider_params, relative_error, report, run, skip_unless_batched_mm_fits

SHAPES = (
    [(4, 64, 32, 48, 2), (6, 50, 32, 16, 3), (4, 40, 32, 32, 1), (5, 40, 32, 24, 1)]
    if QUICK
    else [(8, 16384, 4096, 14336, 2), (128, 32768, 2048, 768, 8), (8, 16384, 4096, 8192, 1),
          (64, 16384, 4096, 1024, 1)]
)
DTYPE = torch.bfloat16
TRANSFORMERS = ("eager", "batched_mm", "grouped_mm")


def make_problem(E: int, T: int, H: int, I: int, k: int, backward: bool):
    config = SimpleNamespace(num_local_experts=E, hidden_size=H, intermediate_size=I,
                             hidden_act="silu", _experts_implementation="grouped_mm")
    experts = MixtralExperts(config).to(device=DEVICE, dtype=DTYPE)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=H**-0.5)
        experts.down_proj.normal_(std=I**-0.5)
    experts.requires_grad_(backward)
    x = torch.randn(T, H, device=DEVICE, dtype=DTYPE).requires_grad_(backward)
    scores = torch.rand(T, E, device=DEVICE)
    top, idx = scores.topk(k, dim=-1)
    weights = torch.softmax(top, dim=-1).to(DTYPE).requires_grad_(backward)
    return experts, x, idx, weights


def provider_forward(provider: str, experts):
    """The provider's forward as ``f(x, idx, weights) -> y``."""
    if provider in TRANSFORMERS:
        def forward(x, idx, weights):
            experts.config._experts_implementation = provider
            return experts(x, idx, weights)
        return forward
    w1, w2 = experts.gate_up_proj.transpose(1, 2), experts.down_proj.transpose(1, 2)
    return lambda x, idx, weights: modekernels.moe_mlp(
        x, idx, weights, w1, w2, activation="silu", gated=True, backend=provider)


def step(forward, backward: bool, experts, x, idx, weights, dy):
    if not backward:
        return lambda: forward(x, idx, weights)
    leaves = (x, weights, experts.gate_up_proj, experts.down_proj)
    return lambda: torch.autograd.grad(forward(x, idx, weights), leaves, dy)


@pytest.mark.parametrize("provider", provider_params(*TRANSFORMERS, "triton", "cuda"))
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "E{}-T{}-H{}-I{}-k{}".format(*s))
def test_moe_mlp(benchmark, ceilings, shape, mode, provider):
    E, T, H, I, k = shape
    if provider == "batched_mm":
        skip_unless_batched_mm_fits(T, H, I, k, DTYPE)
    backward = mode == "fwdbwd"
    experts, x, idx, weights = make_problem(*shape, backward)
    forward = provider_forward(provider, experts)
    with torch.no_grad():
        try:
            y = forward(x, idx, weights)
        except Exception as exc:  # a transformers implementation that cannot run here
            if provider not in TRANSFORMERS:
                raise
            pytest.skip(f"transformers' {provider} cannot run here: {type(exc).__name__}: {exc}")
        expected = provider_forward("reference", experts)(x, idx, weights)
    error = relative_error(y, expected)
    assert error < 1e-2, f"{provider}: relative error {error:.2e} against the reference"
    del y, expected

    dy = torch.randn(T, H, device=DEVICE, dtype=DTYPE) if backward else None
    call = step(forward, backward, experts, x, idx, weights, dy)
    run(benchmark, call, group=f"moe_mlp {mode} E={E} T={T} H={H} I={I} k={k} bf16")
    report(
        benchmark,
        provider=provider,
        baseline="grouped_mm",
        ceilings=ceilings,
        flops=(3 if backward else 1) * 6 * T * k * H * I,
    )
