"""Gated residue block (neutral residues) y = r + g(x)·W_out(silu(W_in x) ⊙ W_glu x), bf16.

Providers, first the baseline: ``eager`` (the same block, gate and ℓ1 in eager PyTorch),
``peft_lora`` (PEFT's LoRA of rank d_adapter on a frozen bias-free ``nn.Linear(d, d)``: its
base GEMM included, as a LoRA layer runs it), ``linear_adapter`` (the bottleneck adapter
r + up(gelu(down(x))) as ``nn.Linear`` modules, no gate), and ``modekernels.neutral_residue``
with the ``triton`` backend, dense (``triton``) and gate-sparse (``triton_sparse``).

Problems: d ∈ {2048, 4096}, d_adapter ∈ {64, 256, 1024}, T ∈ {8192, 65536}, the gate bias set
so that 0%, 50% or 90% of the rows have a zero gate (only ``triton_sparse`` profits); forward
and forward+backward (gradients of x and every weight). TFLOP/s counts the block's dense GEMMs,
2·T·d·(2·d_adapter + 1) + 2·T·d_adapter·d, 3x for forward+backward, whatever the provider
computes; bytes count x, r and y (T·d each) and the weights once (3x for forward+backward),
the floor of any implementation, compared with a device copy. The forward's bar (within 1.3x of
one read of x and one write of y) has its own floor, 2·T·d·2 bytes at the copy rate:
``fraction_of_bar_floor`` in the JSON, met at 1/1.3 ≈ 0.77 or more. Forward-only cases build
no autograd graph for any provider (nothing requires grad). Before timing, the modekernels
providers' y is checked against the eager block in fp32 (relative error under 2e-2).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modekernels
from harness import DEVICE, QUICK, provider_params, relative_error, report, run

DTYPE = torch.bfloat16
SIZES = [(48, 8, 40)] if QUICK else [
    (d, d_a, T) for d in (2048, 4096) for d_a in (64, 256, 1024) for T in (8192, 65536)
]
SPARSITY = [0.0, 0.9] if QUICK else [0.0, 0.5, 0.9]


def make_block(T: int, d: int, d_a: int, sparsity: float, backward: bool) -> dict:
    """Inputs of the block, the gate bias putting ``sparsity`` of the rows at g = 0."""
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE) * scale).to(DTYPE).requires_grad_(backward)

    t = {
        "x": rand(T, d),
        "w_in": rand(d_a, d, scale=d**-0.5),
        "w_glu": rand(d_a, d, scale=d**-0.5),
        "w_out": rand(d, d_a, scale=d_a**-0.5),
        "w_gate": rand(d, scale=d**-0.5),
        "residual": torch.randn(T, d, device=DEVICE).to(DTYPE),
    }
    z = (t["x"].float() @ t["w_gate"].float()).detach()
    threshold = torch.quantile(z[: 1 << 14], sparsity) if sparsity > 0 else z.min() - 1
    t["b_gate"] = (-threshold).to(DTYPE).requires_grad_(backward)
    return t


def eager_block(t: dict):
    u = F.linear(t["x"], t["w_in"])
    h = F.silu(u) * F.linear(t["x"], t["w_glu"])
    g = torch.relu(t["x"] @ t["w_gate"] + t["b_gate"])
    y_a = g[:, None] * F.linear(h, t["w_out"])
    return t["residual"] + y_a, g, y_a.float().abs().sum(dim=1)


def provider_forward(provider: str, t: dict, d: int, d_a: int, backward: bool):
    """The provider's forward as ``f() -> tuple of outputs`` and its trainable tensors (used
    with ``backward`` only: without it nothing requires grad, so the forward records no graph)."""
    if provider == "eager":
        return (lambda: eager_block(t)), [v for v in t.values() if v.requires_grad]
    if provider.startswith(("triton", "cuda")):
        backend, _, variant = provider.partition("_")

        def fused():
            return modekernels.neutral_residue(
                t["x"], t["w_in"], t["w_glu"], t["w_out"], t["w_gate"], t["b_gate"],
                residual=t["residual"], activation="silu", gate="relu",
                sparse=variant == "sparse", backend=backend,
            )
        return fused, [v for v in t.values() if v.requires_grad]
    if provider == "linear_adapter":
        down, up = nn.Linear(d, d_a), nn.Linear(d_a, d)
        module = nn.Sequential(down, nn.GELU(), up).to(DEVICE, DTYPE).requires_grad_(backward)
        return (lambda: (t["residual"] + module(t["x"]),)), [t["x"], *module.parameters()]
    try:
        import peft
    except ImportError as exc:
        pytest.skip(f"peft is not installed: {exc}")
    base = nn.Sequential(nn.Linear(d, d, bias=False)).to(DEVICE, DTYPE).requires_grad_(False)
    config = peft.LoraConfig(r=d_a, lora_alpha=d_a, target_modules=["0"], lora_dropout=0.0)
    model = peft.inject_adapter_in_model(config, base).to(DEVICE, DTYPE)
    if not backward:  # LoRA's matrices require grad once injected
        model.requires_grad_(False)
    trainable = [t["x"]] + [p for p in model.parameters() if p.requires_grad]
    return (lambda: (model(t["x"]),)), trainable


def step(forward, trainable, backward: bool):
    if not backward:
        return forward
    return lambda: torch.autograd.grad(forward()[0].float().sum(), trainable)


@pytest.mark.parametrize(
    "provider",
    provider_params("eager", "peft_lora", "linear_adapter") + [
        pytest.param(p.values[0] + suffix, id=p.id + suffix, marks=p.marks)
        for p in provider_params("triton", "cuda")
        for suffix in ("", "_sparse")
    ],
)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("sparsity", SPARSITY, ids=lambda s: f"off{s:.0%}")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "d{}-da{}-T{}".format(*s))
def test_neutral_residue(benchmark, ceilings, size, sparsity, mode, provider):
    d, d_a, T = size
    backward = mode == "fwdbwd"
    t = make_block(T, d, d_a, sparsity, backward)
    forward, trainable = provider_forward(provider, t, d, d_a, backward)
    if provider.startswith(("triton", "cuda")):
        with torch.no_grad():
            y = forward()[0]
            expected = eager_block({k: v.float() for k, v in t.items()})[0]
        error = relative_error(y, expected)
        assert error < 2e-2, f"{provider}: relative error {error:.2e} against fp32"
        del y, expected

    run(benchmark, step(forward, trainable, backward),
        group=f"neutral_residue {mode} d={d} d_a={d_a} T={T} off={sparsity:.0%} bf16")
    weights = (2 * d_a * d + d * d_a + d + 1) * 2
    report(
        benchmark,
        provider=provider,
        baseline="eager",
        ceilings=ceilings,
        flops=(3 if backward else 1) * (2 * T * d * (2 * d_a + 1) + 2 * T * d_a * d),
        nbytes=(3 if backward else 1) * (3 * T * d * 2 + weights),
        bar_nbytes=None if backward else 2 * T * d * 2,  # one read of x, one write of y
    )
