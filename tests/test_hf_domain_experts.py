"""MoDE domain experts on tiny Hugging Face models: identity at init, routing by domain id,
stage 1 (train one domain) and stage 2 (compose)."""

from __future__ import annotations

import pytest
import torch
from hf_models import batch, build

import modekernels
import modekernels.hf as mh


@pytest.fixture(autouse=True)
def _reference_backend():
    with modekernels.use_backend("reference"):
        yield


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "qwen3"])
def test_domain_ids_route_each_sequence_to_its_expert(name):
    model = build(name)
    ids = batch(batch_size=3)
    base = logits(model, ids)
    report = mh.add_domain_experts(model, ["news", "code"], layers_per_expert=2, blocks=[0])
    assert report.layers == [0] and len(report.modules) == 1
    mh.compose(model)
    with torch.no_grad():
        for module in mh.added_modules(model).values():
            module.gate.weight.normal_(std=0.5)
            for p in module.experts.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    mixed = logits(model, ids, domain_ids=torch.tensor([1, -1, 0]))
    torch.testing.assert_close(mixed[1], base[1], rtol=0, atol=0)  # -1: the backbone alone
    for row, domain in ((0, 1), (2, 0)):
        alone = logits(model, ids[row : row + 1], domain_ids=torch.tensor([domain]))
        torch.testing.assert_close(mixed[row], alone[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mixed[row], base[row], atol=1e-4)
    # without ids every token mixes all active experts; the next forward forgets the ids
    everyone = logits(model, ids)
    assert not torch.allclose(everyone[0], mixed[0], atol=1e-5)


def test_train_domain_trains_only_that_expert_and_compose_adds_gates():
    model = build("llama")
    mh.add_domain_experts(model, ["news", "code"], layers_per_expert=2)
    assert mh.train_domain(model, "code") == sum(
        p.numel() for n, p in model.named_parameters() if ".experts.code." in n
    )
    assert trainable(model) and all(".experts.code." in n for n in trainable(model))
    with pytest.raises(ValueError, match="unknown domain 'law'"):
        mh.train_domain(model, "law")

    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = batch(batch_size=4, seq=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, snapshot[n])}
    assert changed and all(".experts.code." in n for n in changed)

    mh.compose(model)
    names = trainable(model)
    assert any(".experts.news." in n for n in names) and any(".gate." in n for n in names)
    assert all(".added.domain_experts." in n for n in names)


def test_add_domain_experts_rejects_bad_arguments():
    with pytest.raises(ValueError, match="distinct names"):
        mh.add_domain_experts(build("gpt2"), ["a", "a"])
    with pytest.raises(ValueError, match="layers_per_expert"):
        mh.add_domain_experts(build("gpt2"), ["a"], layers_per_expert=0)
    with pytest.raises(ValueError, match="add_domain_experts first"):
        mh.compose(build("gpt2"))
