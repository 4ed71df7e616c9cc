"""Tiny Hugging Face models of every family the surgery supports, built from configs (nothing is
downloaded), for the ``modekernels.hf`` tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
)

VOCAB = 64
HIDDEN = 32
FFN = 48

FAMILY_OF = {
    "bert": "bert", "roberta": "bert", "gpt2": "gpt2",
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
}
NAMES = tuple(FAMILY_OF)


def build(name: str, *, hidden: int = HIDDEN, ffn: int = FFN, layers: int = 2, seed: int = 0, **config):
    """A 2-block model of kind ``name`` in eval mode, initialised from ``seed``; ``config``: more
    settings of a Llama-style family's config (``sliding_window`` for Mistral, say)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=ffn,
    )
    if name == "bert":
        model = BertForMaskedLM(BertConfig(**common, max_position_embeddings=32))
    elif name == "roberta":
        model = RobertaForMaskedLM(RobertaConfig(**common, max_position_embeddings=40, pad_token_id=1))
    elif name == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_inner=ffn, n_positions=32,
            activation_function="gelu", bos_token_id=0, eos_token_id=0,
        )
        model = GPT2LMHeadModel(config)
    else:
        config_cls, model_cls = {
            "llama": (LlamaConfig, LlamaForCausalLM),
            "mistral": (MistralConfig, MistralForCausalLM),
            "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        }[name]
        model = model_cls(config_cls(**common, num_key_value_heads=2, head_dim=8, **config))
    return model.eval()


def batch(batch_size: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    """Token ids (batch_size, seq); ids start at 2 (RoBERTa's padding id is 1)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch_size, seq), generator=g)


def logits(model, ids, **kwargs):
    """The model's logits for ids, without gradients."""
    with torch.no_grad():
        return model(ids, **kwargs).logits


def perturb_domain_experts(model, *, noise: float = 0.05) -> None:
    """Random MoDE gates and experts moved off the backbone's copies (by ``noise``), in place, so
    that every active expert changes the output."""
    import modekernels.hf as mh

    with torch.no_grad():
        for module in mh.added_modules(model, "domain_experts").values():
            module.gate.weight.normal_(std=0.5)
            for p in module.experts.parameters():
                p.add_(torch.randn_like(p) * noise)
