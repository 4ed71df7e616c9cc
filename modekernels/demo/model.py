"""The demo's small language model, built from a config in code and pretrained briefly on the
original domain. The pretrained checkpoint is cached (``save_pretrained``) under a key made of the
seed, the model spec, the training settings and a fingerprint of the corpus, so reruns skip it."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import torch

from modekernels.demo.corpora import Corpus
from modekernels.demo.train import TrainSettings, batches, train

__all__ = ["ModelSpec", "build_model", "pretrained_model"]


@dataclass(frozen=True)
class ModelSpec:
    """A GPT-2 or Llama decoder: ``layers`` blocks of width ``hidden`` over ``context`` tokens."""

    family: str = "gpt2"
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    context: int = 128
    vocab_size: int = 258

    def config(self):
        if self.family == "gpt2":
            from transformers import GPT2Config

            return GPT2Config(
                vocab_size=self.vocab_size,
                n_positions=self.context,
                n_embd=self.hidden,
                n_layer=self.layers,
                n_head=self.heads,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                activation_function="gelu",
                bos_token_id=self.vocab_size - 2,
                eos_token_id=self.vocab_size - 2,
            )
        if self.family == "llama":
            from transformers import LlamaConfig

            return LlamaConfig(
                vocab_size=self.vocab_size,
                max_position_embeddings=self.context,
                hidden_size=self.hidden,
                intermediate_size=4 * self.hidden,
                num_hidden_layers=self.layers,
                num_attention_heads=self.heads,
                num_key_value_heads=self.heads,
                tie_word_embeddings=True,
                bos_token_id=self.vocab_size - 2,
                eos_token_id=self.vocab_size - 2,
            )
        raise ValueError(f"ModelSpec.family must be 'gpt2' or 'llama', got {self.family!r}")


def build_model(spec: ModelSpec, seed: int):
    """A freshly initialised causal LM for ``spec`` (initialisation seeded by ``seed``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(spec.config())


def _cache_key(spec: ModelSpec, settings: TrainSettings, corpus: Corpus, seed: int) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([asdict(spec), asdict(settings), seed], sort_keys=True).encode())
    digest.update(corpus.train.numpy().tobytes())
    return digest.hexdigest()[:16]


def pretrained_model(
    spec: ModelSpec,
    corpus: Corpus,
    settings: TrainSettings,
    *,
    seed: int,
    device: torch.device,
    cache_dir: str | None,
    progress: bool = True,
):
    """The model for ``spec`` pretrained on ``corpus`` with ``settings`` (all parameters, AdamW),
    loaded from ``cache_dir`` when an earlier run with the same key saved it there.

    Returns ``(model, cached)``: the model in eval mode on ``device``, and whether it came from
    the cache."""
    from transformers import AutoModelForCausalLM

    path = None
    if cache_dir is not None:
        path = os.path.join(cache_dir, f"pretrained-{_cache_key(spec, settings, corpus, seed)}")
        if os.path.isfile(os.path.join(path, "config.json")):
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
            return model.to(device).eval(), True
    model = build_model(spec, seed).to(device)
    generator = torch.Generator().manual_seed(seed)
    train(
        model,
        list(model.parameters()),
        batches(corpus, None, settings.batch_size, 0.0, generator),
        settings,
        device=device,
        desc="pretrain (original domain)",
        progress=progress,
    )
    if path is not None:
        model.save_pretrained(path)
    return model.eval(), False
