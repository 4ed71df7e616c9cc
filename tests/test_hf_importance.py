"""MoEBERT's FFN neuron importance and layer-wise distillation loss on tiny models."""

from __future__ import annotations

import pytest
import torch
from hf_models import batch, build

import modekernels.hf as mh


pytestmark = pytest.mark.usefixtures("reference_backend")


def _brute_force(model, ids, block):
    """I_j from the definition, one example at a time, on the unwrapped weights."""
    family = mh.detect_family(model)
    _, blocks = mh.surgery.blocks(model)
    ffn = family.dense_ffn(blocks[block])
    total = torch.zeros(ffn.d_ff)
    for row in ids:
        loss = mh.per_example_loss(model, {"input_ids": row[None]})[0]
        params = [p for p, _ in ffn.neuron_params]
        grads = torch.autograd.grad(loss, params)
        per = torch.zeros(ffn.d_ff)
        for (p, dim), g in zip(ffn.neuron_params, grads):
            per += (p * g).sum(dim=1 - dim).detach()
        total += per.abs()
    return total


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_importance_matches_the_definition(name):
    model = build(name)
    ids = batch(batch_size=3, seq=6)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    scores = mh.compute_ffn_importance(model, [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}])
    assert len(scores) == 2 and scores[0].shape == (48,) and scores[0].dtype == torch.float32
    for block in range(2):
        torch.testing.assert_close(scores[block], _brute_force(model, ids, block), rtol=1e-4, atol=1e-7)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_importance_with_a_custom_loss_and_labels():
    model = build("roberta")
    ids = batch(batch_size=2, seq=6)
    labels = ids.clone()
    labels[:, ::2] = -100
    default = mh.compute_ffn_importance(model, [{"input_ids": ids, "labels": labels}])
    custom = mh.compute_ffn_importance(
        model, [{"input_ids": ids, "labels": labels}], loss_fn=lambda m, b: 2 * mh.per_example_loss(m, b)
    )
    for a, b in zip(default, custom):
        torch.testing.assert_close(b, 2 * a)
        assert (a > 0).all()


def test_default_loss_ignores_padding():
    model = build("llama")
    ids = batch(batch_size=2, seq=8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    padded = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        losses = mh.per_example_loss(model, {"input_ids": padded, "attention_mask": mask})
        alone = mh.per_example_loss(model, {"input_ids": ids[1:, :5]})
    torch.testing.assert_close(losses[1], alone[0], rtol=1e-5, atol=1e-6)
    scores = mh.compute_ffn_importance(model, [{"input_ids": padded, "attention_mask": mask}])
    unpadded = mh.compute_ffn_importance(model, [{"input_ids": ids[:1]}, {"input_ids": ids[1:, :5]}])
    for got, want in zip(scores, unpadded):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_importance_under_no_grad_and_inference_mode(context):
    model = build("gpt2")
    want = mh.compute_ffn_importance(model, [{"input_ids": batch()}])
    with context():
        got = mh.compute_ffn_importance(model, [{"input_ids": batch()}])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_importance_rejects_a_moefied_model():
    model = build("llama")
    mh.moefy(model, 2)
    with pytest.raises(ValueError, match="before moefy"):
        mh.compute_ffn_importance(model, [{"input_ids": batch()}])


def test_layerwise_distillation_loss():
    teacher, student = build("bert"), build("bert", seed=4)
    ids = batch()
    t = teacher(ids, output_hidden_states=True)
    assert mh.layerwise_distillation_loss(t, t).item() == 0
    s = student(ids, output_hidden_states=True)
    loss = mh.layerwise_distillation_loss(s, t)
    mse = sum(torch.nn.functional.mse_loss(a, b) for a, b in zip(s.hidden_states, t.hidden_states))
    ps, pt = s.logits.softmax(-1), t.logits.softmax(-1)
    kl = (pt * (pt.log() - ps.log())).sum(-1) + (ps * (ps.log() - pt.log())).sum(-1)
    torch.testing.assert_close(loss, mse + kl.mean())
    loss.backward()
    assert student.bert.encoder.layer[0].output.dense.weight.grad is not None
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        mh.layerwise_distillation_loss(student(ids), t)
