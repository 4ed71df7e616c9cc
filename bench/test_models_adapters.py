"""A Llama-style dense model of real width (H=4096, I=11008, 32 heads, two layers, vocabulary
32000, built from a config) with one kind of adapter per provider, all of equal added parameters:

- ``lora`` (the baseline): PEFT LoRA on every projection of each block (q, k, v, o, gate, up,
  down), its rank chosen to match;
- ``linear-adapter``: a bottleneck adapter of two ``nn.Linear`` modules (GELU between, up
  projection zero) after each block's MLP, patched onto the instances;
- ``neutral-residue``: ``modekernels.hf.add_neutral_residues`` with adapter width 1024 (GLU,
  ReLU gate), whose added parameters set the others' sizes.

The base is frozen in every case. Steps: a training step (forward, backward, AdamW over the
adapters) on 4 x 1024 tokens and an inference forward on 1 x 512 tokens (LoRA unmerged).
Reported: tokens/s, peak memory, model TFLOP/s (base and adapter nn.Linear GEMMs; the residue's
counted from its parameters). Every adapter starts as the identity, so before timing each
provider's logits must equal the base model's (within bf16 rounding).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness import DEVICE, QUICK, provider_params, run
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

VOCAB, HIDDEN, FFN, HEADS = (128, 64, 160, 4) if QUICK else (32000, 4096, 11008, 32)
RESIDUE_WIDTH = 16 if QUICK else 1024
TRAIN_BATCH, INFER_BATCH = ((2, 8), (1, 8)) if QUICK else ((4, 1024), (1, 512))
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN,
                         num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                         max_position_embeddings=2048)
    return build_model(LlamaForCausalLM, config)


class LinearAdapterMLP(nn.Module):
    """A block's MLP followed by a bottleneck adapter of ``nn.Linear`` modules:
    ``mlp(x) + up(gelu(down(mlp(x))))``, ``up`` zero at init."""

    def __init__(self, mlp: nn.Module, d_model: int, d_adapter: int):
        super().__init__()
        self.mlp = mlp
        self.down = nn.Linear(d_model, d_adapter)
        self.up = nn.Linear(d_adapter, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(x)
        return h + self.up(nn.functional.gelu(self.down(h)))


def residue_parameters_per_block() -> int:
    """Parameters one neutral residue of width RESIDUE_WIDTH adds (w_in, w_glu: d x a; w_out:
    a x d; the gate: d + 1), what the other adapters are sized to."""
    return 3 * HIDDEN * RESIDUE_WIDTH + HIDDEN + 1


def add_provider(model: nn.Module, provider: str) -> tuple[nn.Module, int, int]:
    """(model with the provider's adapters, base frozen; parameters added per block; parameters
    per unit of the adapter's size, the granularity of the match)."""
    target = residue_parameters_per_block()
    if provider == "neutral-residue":
        reason = missing("modekernels.hf", "add_neutral_residues")
        if reason:
            pytest.skip(reason)
        from modekernels.hf import add_neutral_residues

        report = add_neutral_residues(model, d_adapter=RESIDUE_WIDTH, freeze_base=True)
        model.to(device=DEVICE, dtype=DTYPE)
        return model, report.added_parameters // model.config.num_hidden_layers, 3 * HIDDEN
    if provider == "lora":
        from peft import LoraConfig, get_peft_model

        per_rank = sum(m.in_features + m.out_features for name, m in model.model.layers[0].named_modules()
                       if isinstance(m, nn.Linear) and name.split(".")[-1] in LORA_TARGETS)
        rank = max(1, round(target / per_rank))
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
        return get_peft_model(model, config).to(device=DEVICE, dtype=DTYPE), rank * per_rank, per_rank
    width = max(1, round((target - HIDDEN) / (2 * HIDDEN + 1)))
    model.requires_grad_(False)
    for layer in model.model.layers:
        layer.mlp = LinearAdapterMLP(layer.mlp, HIDDEN, width).to(device=DEVICE, dtype=DTYPE)
    return model, 2 * HIDDEN * width + width + HIDDEN, 2 * HIDDEN + 1


def model_flops(model: nn.Module, tokens: int, training: bool) -> float:
    """Frozen base GEMMs count the forward and the input gradient (x2), the adapters' forward,
    input and weight gradients (x3); every added weight is used once per token."""
    base = matmul_flops(model, tokens, training=False,
                        skip=lambda name: "lora_" in name or name.endswith((".mlp.down", ".mlp.up")))
    adapter = 2 * tokens * sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (2 * base + 3 * adapter) if training else (base + adapter)


@pytest.mark.parametrize("provider", provider_params("lora", "linear-adapter", "neutral-residue"))
@pytest.mark.parametrize("mode", ["train", "infer"])
def test_adapter_model(benchmark, ceilings, mode, provider):
    base = build_base()
    check_ids = token_batch(VOCAB, *INFER_BATCH, seed=1)
    expected = inference_step(base, check_ids)()
    model, added, granularity = add_provider(base, provider)
    target = residue_parameters_per_block()
    assert abs(added - target) <= granularity, f"{provider}: {added} added per block, want ~{target}"
    actual = inference_step(model, check_ids)()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=2e-2)
    del expected, actual

    training = mode == "train"
    ids = token_batch(VOCAB, *(TRAIN_BATCH if training else INFER_BATCH))
    step = training_step(model, ids) if training else inference_step(model, ids)
    peak = peak_memory_bytes(step)
    run(benchmark, step, group=f"adapters model llama {mode} H={HIDDEN} I={FFN} "
        f"added/block={target} tokens={ids.numel()} bf16")
    report_model(benchmark, provider=provider, baseline="lora", ceilings=ceilings, tokens=ids.numel(),
                 flops=model_flops(model, ids.numel(), training), peak_bytes=peak)
