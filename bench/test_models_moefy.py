"""MoEBERT's claim: a BERT-base-sized model (H=768, I=3072, 12 layers, 12 heads, vocabulary
30522, built from a config) after ``modekernels.hf.moefy`` (4 experts of 768 neurons, top-1
learned routing) answers faster than the dense model it came from.

Providers, first the baseline: ``dense`` and ``moefy`` (skipped with the reason while
``modekernels.hf.moefy`` is not there). Inference latency of a masked-LM forward at batch 1 and
32, sequence 128. Model TFLOP/s counts the nn.Linear GEMMs and one expert per token. Before
timing, the output must be finite and of the dense model's shape.
"""

from __future__ import annotations

import pytest
import torch

from harness import DEVICE, QUICK, provider_params, run
from model_harness import DTYPE, build_model, inference_step, matmul_flops, missing, peak_memory_bytes, report_model, token_batch

VOCAB, HIDDEN, FFN, LAYERS, HEADS = (128, 32, 64, 2, 4) if QUICK else (30522, 768, 3072, 12, 12)
SEQ = 8 if QUICK else 128
EXPERTS = 4


def build(provider: str) -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    model = build_model(BertForMaskedLM, BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=512)).eval()
    if provider == "moefy":
        reason = missing("modekernels.hf", "moefy")
        if reason:
            pytest.skip(reason)
        from modekernels.hf import moefy

        moefy(model, EXPERTS)
    return model.to(device=DEVICE, dtype=DTYPE)


def model_flops(model: torch.nn.Module, provider: str, tokens: int) -> float:
    """nn.Linear GEMMs, plus one expert (2 x H x I/E weights) per token and layer for moefy."""
    experts = LAYERS * 2 * HIDDEN * (FFN // EXPERTS) if provider == "moefy" else 0
    return matmul_flops(model, tokens, training=False) + 2 * tokens * experts


@pytest.mark.parametrize("provider", provider_params("dense", "moefy"))
@pytest.mark.parametrize("batch", [1, 32])
def test_moefy_latency(benchmark, ceilings, batch, provider):
    model = build(provider)
    ids = token_batch(VOCAB, batch, SEQ)
    step = inference_step(model, ids)
    logits = step()
    assert logits.shape == (batch, SEQ, VOCAB) and torch.isfinite(logits).all()
    peak = peak_memory_bytes(step)
    run(benchmark, step, group=f"moefy bert infer H={HIDDEN} I={FFN} L={LAYERS} E={EXPERTS} "
        f"batch={batch} seq={SEQ} bf16")
    report_model(benchmark, provider=provider, baseline="dense", ceilings=ceilings,
                 tokens=ids.numel(), flops=model_flops(model, provider, ids.numel()), peak_bytes=peak)
