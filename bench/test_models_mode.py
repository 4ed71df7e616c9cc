"""MoDE: one batch mixing sequences of three domains through the domain experts.

``test_domain_expert_mlps``: the experts' gated MLPs (Llama-style, H=4096, I=11008, SiLU GLU) on
a batch of 6 sequences x 1024 tokens whose domains are [0, 1, 2, 2, 0, 2] (every token goes to
its sequence's expert). Providers, first the baseline: ``loop`` (per expert, its tokens gathered
by an index known on the host, two matmuls, scattered back) and ``modekernels``
(:func:`modekernels.moe_mlp` with the domain as the expert index and gate 1: one grouped pass).
Forward, and forward + backward (gradients of x and the weights). Before timing, each provider
must match an fp32 loop within 1e-2 (relative Frobenius).

``test_domain_experts_model``: a Llama-style model (H=2048, I=5632, two layers) with
``modekernels.hf.add_domain_experts`` (three domains, one layer per expert beside each block,
all composed) on the same mixed batch with ``domain_ids``, against the bare backbone: what the
experts cost end to end (inference forward and a stage-2 training step). Model FLOPs count each
token through its own domain's expert only.

``test_domain_experts_decode``: the same model generating (greedy) from a prompt, the mixed batch
with ``domain_ids``: ``backbone`` and ``domain-experts`` with the KV cache (the experts keep
theirs beside the model's), ``domain-experts-recompute`` without it (every step reruns the
prefix, as MoDE had to before its experts kept a cache). Throughput counts the generated tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import modekernels
from harness import DEVICE, QUICK, provider_params, relative_error, report, run
from model_harness import (
    DTYPE,
    build_model,
    inference_step,
    matmul_flops,
    missing,
    peak_memory_bytes,
    report_model,
    token_batch,
    training_step,
)

SEQ_DOMAINS = [0, 1, 2, 2, 0, 2]
DOMAINS = 3
HIDDEN, FFN, SEQ = (64, 160, 8) if QUICK else (4096, 11008, 1024)


def token_domains() -> torch.Tensor:
    """(T,) int64: each token's domain, sequence by sequence."""
    return torch.tensor(SEQ_DOMAINS, device=DEVICE).repeat_interleave(SEQ)


def loop_mlps(x, w1, w2, rows_of):
    """Per expert e: y[rows] = (silu(x[rows] @ w1[e][:, :I]) * (x[rows] @ w1[e][:, I:])) @ w2[e]."""
    y = torch.zeros(x.shape[0], w2.shape[2], device=x.device, dtype=x.dtype)
    inter = w2.shape[1]
    for e, rows in enumerate(rows_of):
        h = x[rows] @ w1[e]
        y = y.index_copy(0, rows, (F.silu(h[:, :inter]) * h[:, inter:]) @ w2[e])
    return y


def provider_mlps(provider: str, domains: torch.Tensor):
    """The provider as ``f(x, w1, w2) -> y``; the loop's row indices are built here, untimed."""
    if provider == "loop":
        rows_of = [torch.nonzero(domains == e).flatten() for e in range(DOMAINS)]
        return lambda x, w1, w2: loop_mlps(x, w1, w2, rows_of)
    gate = torch.ones(domains.shape[0], device=DEVICE)
    return lambda x, w1, w2: modekernels.moe_mlp(x, domains, gate, w1, w2, activation="silu", gated=True)


def step(forward, mode: str, x, w1, w2, dy):
    if mode == "fwd":
        return lambda: (forward(x, w1, w2),)
    return lambda: torch.autograd.grad(forward(x, w1, w2), (x, w1, w2), dy)


@pytest.mark.parametrize("provider", provider_params("loop", "modekernels"))
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_domain_expert_mlps(benchmark, ceilings, mode, provider):
    domains = token_domains()
    tokens = domains.shape[0]
    backward = mode == "fwdbwd"
    torch.manual_seed(0)
    x = torch.randn(tokens, HIDDEN, device=DEVICE, dtype=DTYPE).requires_grad_(backward)
    w1 = (torch.randn(DOMAINS, HIDDEN, 2 * FFN, device=DEVICE, dtype=DTYPE) * HIDDEN**-0.5).requires_grad_(backward)
    w2 = (torch.randn(DOMAINS, FFN, HIDDEN, device=DEVICE, dtype=DTYPE) * FFN**-0.5).requires_grad_(backward)
    dy = torch.randn(tokens, HIDDEN, device=DEVICE, dtype=DTYPE) if backward else None

    call = step(provider_mlps(provider, domains), mode, x, w1, w2, dy)
    results = call()
    exact = [t.detach().float().requires_grad_(backward) for t in (x, w1, w2)]
    expected = step(provider_mlps("loop", domains), mode, *exact, dy.float() if backward else None)()
    for name, actual, want in zip(("y",) if not backward else ("dx", "dw1", "dw2"), results, expected):
        error = relative_error(actual, want)
        assert error < 1e-2, f"{provider} {name}: relative error {error:.2e} against fp32"
    del results, expected, exact

    run(benchmark, call, group=f"mode expert mlps {mode} domains={DOMAINS} H={HIDDEN} I={FFN} "
        f"tokens={tokens} bf16")
    weights = 3 * HIDDEN * FFN
    report(benchmark, provider=provider, baseline="loop", ceilings=ceilings,
           flops=(3 if backward else 1) * 2 * tokens * weights,
           nbytes=(3 if backward else 1) * (w1.nbytes + w2.nbytes + 2 * x.nbytes))


MODEL_HIDDEN, MODEL_FFN, MODEL_HEADS, VOCAB = (64, 160, 4, 128) if QUICK else (2048, 5632, 16, 32000)


def build_domain_model(provider: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = build_model(LlamaForCausalLM, LlamaConfig(
        vocab_size=VOCAB, hidden_size=MODEL_HIDDEN, intermediate_size=MODEL_FFN, num_hidden_layers=2,
        num_attention_heads=MODEL_HEADS, num_key_value_heads=MODEL_HEADS, max_position_embeddings=2048))
    if provider == "domain-experts":
        reason = missing("modekernels.hf", "add_domain_experts", "compose")
        if reason:
            pytest.skip(reason)
        from modekernels.hf import add_domain_experts, compose

        add_domain_experts(model, ["a", "b", "c"], layers_per_expert=1)
        compose(model)
    else:
        model.requires_grad_(False)
        for layer in model.model.layers:  # the backbone alone trains its MLPs, to have a step
            layer.mlp.requires_grad_(True)
    return model.to(device=DEVICE, dtype=DTYPE)


def model_flops(model, tokens: int, training: bool) -> float:
    """The backbone's nn.Linear GEMMs for every token, the experts' for each token once (its
    sequence's domain)."""
    backbone = matmul_flops(model, tokens, training, skip=lambda name: ".experts." in name)
    return backbone + (matmul_flops(model, tokens, training) - backbone) / DOMAINS


@pytest.mark.parametrize("provider", provider_params("backbone", "domain-experts"))
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_domain_experts_model(benchmark, ceilings, mode, provider):
    model = build_domain_model(provider)
    ids = token_batch(VOCAB, len(SEQ_DOMAINS), SEQ)
    kwargs = {"domain_ids": torch.tensor(SEQ_DOMAINS, device=DEVICE)} if provider != "backbone" else {}
    training = mode == "train"
    step_fn = training_step(model, ids, **kwargs) if training else inference_step(model, ids, **kwargs)
    if not training:
        assert torch.isfinite(step_fn()).all()
    peak = peak_memory_bytes(step_fn)
    run(benchmark, step_fn, group=f"mode model llama {mode} domains={DOMAINS} H={MODEL_HIDDEN} "
        f"I={MODEL_FFN} tokens={ids.numel()} bf16")
    report_model(benchmark, provider=provider, baseline="backbone", ceilings=ceilings,
                 tokens=ids.numel(), flops=model_flops(model, ids.numel(), training),
                 peak_bytes=peak)


PROMPT, NEW_TOKENS = (8, 4) if QUICK else (512, 64)


@pytest.mark.parametrize("provider", provider_params("backbone", "domain-experts", "domain-experts-recompute"))
def test_domain_experts_decode(benchmark, ceilings, provider):
    model = build_domain_model(provider.removesuffix("-recompute")).eval()
    ids = token_batch(VOCAB, len(SEQ_DOMAINS), PROMPT)
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                  use_cache=not provider.endswith("-recompute"))
    if provider != "backbone":
        kwargs["domain_ids"] = torch.tensor(SEQ_DOMAINS, device=DEVICE)

    def step():
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)

    assert step().shape == (len(SEQ_DOMAINS), PROMPT + NEW_TOKENS)
    peak = peak_memory_bytes(step)
    run(benchmark, step, group=f"mode model llama decode domains={DOMAINS} H={MODEL_HIDDEN} "
        f"I={MODEL_FFN} prompt={PROMPT} new={NEW_TOKENS} batch={len(SEQ_DOMAINS)} bf16")
    generated = len(SEQ_DOMAINS) * NEW_TOKENS
    report_model(benchmark, provider=provider, baseline="backbone", ceilings=ceilings, tokens=generated,
                 flops=model_flops(model, generated, False), peak_bytes=peak)
