"""Top-1 routing of T tokens over E experts, bf16 logits: ``modekernels.route_top1`` against the
eager PyTorch sequence.

Providers, first the baseline: ``eager`` (softmax, max, stable sort, histc, cumsum: expert, gate,
perm and offs, no losses and no capacity), then ``modekernels.route_top1`` with the ``reference``
and ``triton`` backends, which also compute tokens_per_expert, both losses and the dropped mask.
Problems: T ∈ {4096, 32768, 131072} × E ∈ {8, 64, 128}. Bytes count the logits read once and the
expert index, gate and perm written once (what every provider produces). Before timing, each
provider's expert index, perm and offs must equal the eager ones and its gate be within bf16
rounding of them. Bar on Hopper: triton ≥ 5× eager at T ≥ 32768.
"""

from __future__ import annotations

import pytest
import torch

import modekernels
from harness import DEVICE, QUICK, provider_params, report, run

TOKENS = [64, 300] if QUICK else [4096, 32768, 131072]
EXPERTS = [8, 5] if QUICK else [8, 64, 128]
DTYPE = torch.bfloat16
# Back-to-back calls per device synchronisation: these kernels take microseconds.
CALLS_PER_SYNC = 1 if QUICK else 20


def eager_route(logits: torch.Tensor):
    """The routing sequence as it is written with PyTorch ops (no host synchronisation)."""
    num_experts = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=-1)
    gate, expert_idx = probs.max(dim=-1)
    perm = torch.sort(expert_idx, stable=True).indices
    counts = torch.histc(expert_idx.float(), bins=num_experts, min=0, max=num_experts - 1)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    return expert_idx, gate.to(logits.dtype), perm, offs


def provider_route(provider: str):
    """The provider as ``f(logits) -> (expert_idx, gate, perm, offs)``."""
    if provider == "eager":
        return eager_route

    def route(logits):
        r = modekernels.route_top1(logits, backend=provider)
        return r.expert_idx, r.gate, r.perm, r.offs

    return route


@pytest.mark.parametrize("provider", provider_params("eager", "reference", "triton", "cuda"))
@pytest.mark.parametrize("num_experts", EXPERTS, ids=lambda e: f"E{e}")
@pytest.mark.parametrize("num_tokens", TOKENS, ids=lambda t: f"T{t}")
def test_route_top1(benchmark, ceilings, num_tokens, num_experts, provider):
    logits = torch.randn(num_tokens, num_experts, device=DEVICE, dtype=DTYPE)
    route = provider_route(provider)
    expert_idx, gate, perm, offs = route(logits)
    expected = eager_route(logits)
    for name, actual, exact in zip(("expert_idx", "perm", "offs"), (expert_idx, perm, offs),
                                   (expected[0], expected[2], expected[3])):
        assert torch.equal(actual, exact), f"{provider}: {name} differs from the eager sequence"
    torch.testing.assert_close(gate, expected[1], rtol=1e-2, atol=1e-2)

    run(benchmark, lambda: route(logits), group=f"route_top1 T={num_tokens} E={num_experts} bf16",
        calls_per_sync=CALLS_PER_SYNC)
    written = num_tokens * (expert_idx.element_size() + gate.element_size() + perm.element_size())
    report(benchmark, provider=provider, baseline="eager", ceilings=ceilings,
           nbytes=logits.nbytes + written)
