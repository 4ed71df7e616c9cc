"""MoE models of real width with two layers, built from configs: transformers' experts
implementations against ``experts_implementation="modekernels"``.

Models: Mixtral-like (E=8, k=2, H=4096, I=14336), Qwen3-MoE-like (E=128, k=8, H=2048, I=768)
and a top-1 variant (Mixtral widths, E=8, k=1); vocabulary 32000 for all (the LM head is the
same for every provider). Providers: transformers' ``eager`` (a loop over the hit experts),
``batched_mm`` (skipped where gathering one weight matrix per token-slot would not fit in
memory), ``grouped_mm`` (the baseline of the speedups) and ``modekernels`` (skipped with the
reason when ``modekernels.hf`` is not importable). Steps: a full training step (forward, backward,
AdamW) on 4 x 1024 tokens, and an inference forward on 1 x 512 tokens. Reported: tokens/s,
peak memory, model TFLOP/s (k experts' GEMMs per token plus every nn.Linear). Before timing, each
provider's logits must be within 5e-2 relative (Frobenius) of the eager ones, in bf16.
"""

from __future__ import annotations

import pytest
import torch

from harness import QUICK, provider_params, relative_error, run, skip_unless_batched_mm_fits
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

VOCAB = 128 if QUICK else 32000
# name: (family, hidden, expert intermediate, experts, top-k)
MODELS = {
    "mixtral": ("mixtral", 4096, 14336, 8, 2),
    "qwen3moe": ("qwen3_moe", 2048, 768, 128, 8),
    "top1": ("mixtral", 4096, 14336, 8, 1),
}
TRAIN_BATCH, INFER_BATCH = ((2, 8), (1, 8)) if QUICK else ((4, 1024), (1, 512))


def dims(name: str) -> tuple[str, int, int, int, int]:
    """(family, hidden, expert intermediate, experts, top-k) as run: quick runs shrink the
    widths to 64 and 96 and the experts to at most 16."""
    family, hidden, inter, experts, top_k = MODELS[name]
    return (family, 64, 96, min(experts, 16), top_k) if QUICK else (family, hidden, inter, experts, top_k)


def build(name: str) -> torch.nn.Module:
    """The model ``name`` with two layers, bf16 on DEVICE."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    family, hidden, inter, experts, top_k = dims(name)
    heads = 4 if QUICK else hidden // 128
    common = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                  num_key_value_heads=max(1, heads // 4), head_dim=hidden // heads,
                  num_experts_per_tok=top_k, max_position_embeddings=2048)
    if family == "mixtral":
        return build_model(MixtralForCausalLM, MixtralConfig(**common, intermediate_size=inter,
                                                             num_local_experts=experts))
    return build_model(Qwen3MoeForCausalLM, Qwen3MoeConfig(
        **common, moe_intermediate_size=inter, intermediate_size=4 * inter, num_experts=experts,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True))


def model_flops(model: torch.nn.Module, name: str, tokens: int, training: bool) -> float:
    """Every nn.Linear plus, per token, top-k experts of 3·H·I weights each."""
    _, hidden, inter, _, top_k = dims(name)
    experts = model.config.num_hidden_layers * top_k * 3 * hidden * inter
    return matmul_flops(model, tokens, training) + (3 if training else 1) * 2 * tokens * experts


def set_provider(model: torch.nn.Module, provider: str) -> None:
    if provider == "modekernels":
        reason = missing("modekernels.hf", "register")
        if reason:
            pytest.skip(reason)
    model.set_experts_implementation(provider)


@pytest.mark.parametrize("provider", provider_params("eager", "batched_mm", "grouped_mm", "modekernels"))
@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("name", list(MODELS))
def test_moe_model(benchmark, ceilings, name, mode, provider):
    training = mode == "train"
    batch = TRAIN_BATCH if training else INFER_BATCH
    _, hidden, inter, experts, top_k = dims(name)
    if provider == "batched_mm":  # the step's batch, the largest this case runs
        skip_unless_batched_mm_fits(batch[0] * batch[1], hidden, inter, top_k, DTYPE)
    model = build(name)
    check_ids = token_batch(VOCAB, *INFER_BATCH, seed=1)
    expected = inference_step(model, check_ids)()
    set_provider(model, provider)
    try:
        actual = inference_step(model, check_ids)()
    except Exception as exc:  # a transformers implementation that cannot run here
        if provider == "modekernels":
            raise
        pytest.skip(f"experts_implementation={provider!r} cannot run here: {type(exc).__name__}: {exc}")
    error = relative_error(actual, expected)
    assert error < 5e-2, f"{provider}: logits relative error {error:.2e} against eager"
    del expected, actual

    ids = token_batch(VOCAB, *batch)
    step = training_step(model, ids) if training else inference_step(model, ids)
    peak = peak_memory_bytes(step)
    run(benchmark, step, group=f"moe model {name} {mode} E={experts} k={top_k} H={hidden} "
        f"I={inter} tokens={ids.numel()} bf16")
    report_model(benchmark, provider=provider, baseline="grouped_mm", ceilings=ceilings,
                 tokens=ids.numel(), flops=model_flops(model, name, ids.numel(), training),
                 peak_bytes=peak)
