"""MoDE's domain experts with the KV cache: decoding step by step equals full forwards (domain
ids, sliding windows, beam reordering, cropping), ``generate`` with the cache equals ``generate``
without, and the cases the cache cannot serve raise ValueError."""

from __future__ import annotations

import pytest
import torch
from hf_models import batch, build, perturb_domain_experts
from transformers import DynamicCache, StaticCache

import modekernels.hf as mh
from modekernels.hf import expert_cache

pytestmark = pytest.mark.usefixtures("reference_backend")


def _model(name: str, *, blocks=None):
    """A tiny decoder with two two-layer experts beside ``blocks``, both active, of random gates
    and experts (so that each expert changes the output)."""
    if name == "mistral-window":  # a sliding window shorter than the sequences below
        model = build("mistral", sliding_window=3)
    else:
        model = build(name)
    mh.add_domain_experts(model, ["news", "code"], layers_per_expert=2, blocks=blocks)
    mh.compose(model)
    perturb_domain_experts(model, noise=0.1)
    return model


def _decode(model, ids, prefix: int, cache, **kwargs) -> torch.Tensor:
    """Logits of ids (B, T): the first ``prefix`` tokens in one forward, then one token a step,
    all through ``cache``."""
    steps = [model(ids[:, :prefix], past_key_values=cache, use_cache=True, **kwargs).logits]
    for t in range(prefix, ids.shape[1]):
        steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True, **kwargs).logits)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("domain_ids", [None, [1, -1, 0], [0, 0, 0]], ids=str)
@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen3", "mistral-window"])
def test_decoding_step_by_step_equals_full_forwards(name, domain_ids):
    model = _model(name, blocks=[1] if name == "gpt2" else None)
    ids = batch(batch_size=3, seq=9)
    kwargs = {} if domain_ids is None else {"domain_ids": torch.tensor(domain_ids)}
    with torch.no_grad():
        full = model(ids, use_cache=False, **kwargs).logits
        cache = DynamicCache(config=model.config)
        stepped = _decode(model, ids, 4, cache, **kwargs)
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-5)
    attached = getattr(cache, expert_cache._ATTRIBUTE)
    assert len(attached) == len(mh.added_modules(model))
    for caches in attached.values():
        assert [layer.get_seq_length() for layer in caches.layers] == [9, 9]
        rows = 3 * 2 if domain_ids is None else sum(d >= 0 for d in domain_ids)
        assert caches.layers[0].layers[0].keys.shape[0] == rows


def test_generate_with_the_cache_equals_generate_without_with_ids_and_beams():
    model = _model("llama")
    ids = batch(batch_size=2, seq=5)
    kwargs = dict(attention_mask=torch.ones_like(ids), domain_ids=torch.tensor([1, 0]), max_new_tokens=6,
                  do_sample=False, num_beams=3, num_return_sequences=2, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(ids, **kwargs)
        recomputed = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (4, 11)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("ids_on_host", [True, False])
@pytest.mark.parametrize("domain_ids", [None, [1, 1, 0, 0], [-1, -1, 0, 0]], ids=str)
def test_reorder_cache_reaches_the_experts(domain_ids, ids_on_host, monkeypatch):
    """Beam search's reorder: row b continues the sequence of row beam_idx[b] (beams of one prompt
    share their domain); the next step equals a full forward on the reordered sequences. Ids on
    the GPU (emulated) keep every sequence in the expert batch, those of no expert last."""
    model = _model("llama")
    ids = batch(batch_size=4, seq=7)
    beam_idx = torch.tensor([1, 0, 3, 3])
    kwargs = {} if domain_ids is None else {"domain_ids": torch.tensor(domain_ids)}
    if not ids_on_host:
        monkeypatch.setattr(mh.domain_experts, "values_visible", lambda t: False)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids[:, :6], past_key_values=cache, use_cache=True, **kwargs)
        cache.reorder_cache(beam_idx)
        reordered = torch.cat([ids[beam_idx, :6], ids[:, 6:]], dim=1)
        step = model(reordered[:, 6:], past_key_values=cache, use_cache=True, **kwargs).logits
        full = model(reordered, use_cache=False, **kwargs).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-4, atol=1e-5)


def test_crop_reaches_the_experts():
    """Assisted decoding's crop: drop the last two tokens, decode others in their place."""
    model = _model("qwen3")
    ids = batch(batch_size=2, seq=8)
    other = torch.cat([ids[:, :6], batch(batch_size=2, seq=2, seed=5)], dim=1)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids, past_key_values=cache, use_cache=True)
        cache.crop(-2)
        step = model(other[:, 6:], past_key_values=cache, use_cache=True).logits
        full = model(other, use_cache=False).logits
    torch.testing.assert_close(step, full[:, 6:], rtol=1e-4, atol=1e-5)


def test_what_the_cache_cannot_serve_raises():
    model = build("llama")
    ids = batch(batch_size=2, seq=6)
    with torch.no_grad():
        # experts activated after the cache was filled: they never saw its tokens
        mh.add_domain_experts(model, ["news", "code"], layers_per_expert=1)
        cache = DynamicCache(config=model.config)
        model(ids[:, :4], past_key_values=cache, use_cache=True)
        mh.compose(model)
        with pytest.raises(ValueError, match="already holds 4 tokens at block 0 that the domain experts did not see"):
            model(ids[:, 4:5], past_key_values=cache, use_cache=True)
        # the expert batch changes while the cache lives
        cache = DynamicCache(config=model.config)
        model(ids[:, :4], past_key_values=cache, use_cache=True, domain_ids=torch.tensor([0, 1]))
        for changed in (torch.tensor([1, 0]), torch.tensor([0, -1]), None):
            with pytest.raises(ValueError, match="active experts or domain_ids changed"):
                model(ids[:, 4:5], past_key_values=cache, use_cache=True, domain_ids=changed)
        # a static cache
        static = StaticCache(config=model.config, max_cache_len=8)
        with pytest.raises(ValueError, match="has a Static.*Layer at block 0.*dynamic cache"):
            model(ids[:, :4], past_key_values=static, use_cache=True)


def test_compiled_decoding_equals_eager():
    """Under torch.compile the experts' caches are made, filled and read as in eager mode."""
    model = _model("llama")
    ids = batch(batch_size=3, seq=7)
    domain_ids = torch.tensor([1, -1, 0])
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        eager = _decode(model, ids, 4, DynamicCache(config=model.config), domain_ids=domain_ids)
        cache = DynamicCache(config=model.config)
        stepped = _decode(compiled, ids, 4, cache, domain_ids=domain_ids)
    torch.testing.assert_close(stepped, eager, rtol=1e-5, atol=1e-6)
    for caches in getattr(cache, expert_cache._ATTRIBUTE).values():
        assert [layer.get_seq_length() for layer in caches.layers] == [7, 7]
