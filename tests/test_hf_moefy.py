"""MoEBERT's moefy on tiny Hugging Face models: neuron dealing, exact reproduction of the dense
FFN, routing, losses, training, save/load and unpatch."""

from __future__ import annotations

import pytest
import torch
from hf_models import batch, build

import modekernels.hf as mh
from modekernels.hf.moefy import TOKEN_IDS_KWARG, deal_neurons


pytestmark = pytest.mark.usefixtures("reference_backend")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_deal_neurons_shares_the_top_and_deals_the_rest_round_robin():
    importance = torch.tensor([0.0, 5, 1, 4, 2, 3, 9, 7, 6, 8])
    # ranked: 6, 9, 7, 8, 1, 3, 5, 4, 2, 0
    neurons = deal_neurons(10, 3, shared_neurons=1, importance=importance)
    assert neurons.tolist() == [[6, 9, 1, 4], [6, 7, 3, 2], [6, 8, 5, 0]]
    assert deal_neurons(6, 2).tolist() == [[0, 2, 4], [1, 3, 5]]
    assert deal_neurons(7, 2, expert_dim=2).tolist() == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match=r"expert_dim must be an int in \(0, 2\]"):
        deal_neurons(8, 3, expert_dim=4)
    with pytest.raises(ValueError, match="shared_neurons"):
        deal_neurons(8, 2, shared_neurons=8)
    with pytest.raises(ValueError, match=r"importance must have shape \(8,\)"):
        deal_neurons(8, 2, importance=torch.ones(7))


def _dense_ffn_output(model, layer, x):
    family = mh.detect_family(model)
    _, blocks = mh.surgery.blocks(model)
    block = mh.surgery.unwrap(blocks[layer])
    if family.name == "bert":
        return mh.surgery.unwrap(block.output).dense(mh.surgery.unwrap(block.intermediate)(x))
    return mh.surgery.unwrap(block.mlp)(x)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "qwen2"])
def test_all_experts_active_reproduce_the_dense_ffn(name):
    model = build(name)
    x = torch.randn(5, 32)
    dense = [_dense_ffn_output(model, i, x) for i in range(2)]
    importance = [torch.rand(48), torch.rand(48)]
    report = mh.moefy(model, 4, importance=importance)
    assert report.options == {"num_experts": 4, "expert_dim": 12, "shared_neurons": 0, "routing": "learned"}
    for layer, module in enumerate(mh.added_modules(model, "moefy").values()):
        every = torch.arange(4).expand(5, 4).contiguous()
        with torch.no_grad():
            y = module.moe.experts(x, every, torch.ones(5, 4))
            y = y if module.bias is None else y + module.bias
        torch.testing.assert_close(y, dense[layer], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["roberta", "gpt2", "mistral"])
def test_one_expert_is_the_dense_model_and_unpatch_restores(name):
    model = build(name)
    ids = batch()
    before = logits(model, ids)
    keys = list(model.state_dict())
    mh.moefy(model, 1)
    assert "added by modekernels: moefy" in repr(model)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    aux, z = mh.moe_losses(model)
    assert aux.shape == () and z.shape == ()
    mh.unpatch(model)
    assert list(model.state_dict()) == keys
    assert torch.equal(logits(model, ids), before)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_moefy_trains_with_the_balance_loss_and_round_trips(tmp_path, name):
    model = build(name)
    ids = batch(batch_size=4, seq=8)
    importance = mh.compute_ffn_importance(model, [{"input_ids": ids[:2]}])
    mh.moefy(model, 2, shared_neurons=8, importance=importance)
    assert mh.surgery.patch_records(model)["moefy"][0]["expert_dim"] == 8 + 20
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        out = model(ids, labels=ids)
        aux, _ = mh.moe_losses(model)
        loss = out.loss + 0.01 * aux
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(".added.moefy." in n for n, p in model.named_parameters() if p.requires_grad)
    model.eval()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path / "base")
    mh.save_modules(model, tmp_path / "modules")
    fresh = type(model).from_pretrained(tmp_path / "base").eval()
    assert not mh.load_modules(fresh, tmp_path / "modules").refused
    assert torch.equal(logits(fresh, ids), expected)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_moefy_keeps_the_backbone_keys_so_a_reloaded_model_unpatches_to_the_base(tmp_path, name):
    model = build(name)
    ids = batch()
    base = logits(model, ids)
    keys = set(model.state_dict())
    mh.moefy(model, 2)
    assert keys <= set(model.state_dict())  # the dense FFN keeps its names
    assert all(".added." in n for n, p in model.named_parameters() if p.requires_grad)
    model.save_pretrained(tmp_path)
    fresh, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]  # the unexpected ones are the experts, for load_modules
    assert all(".added.moefy." in key for key in info["unexpected_keys"])
    mh.load_modules(fresh.eval(), tmp_path)
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    mh.unpatch(fresh)
    assert torch.equal(logits(fresh, ids), base)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_domain_experts_stack_on_a_moefied_model_in_either_order(name):
    ids = batch()
    outputs = []
    for order in (("moefy", "mode"), ("mode", "moefy")):
        model = build(name)
        for step in order:
            if step == "moefy":
                torch.manual_seed(5)  # the routers' initial weights
                mh.moefy(model, 2)
            else:
                mh.add_domain_experts(model, ["a"], layers_per_expert=1)
        mh.compose(model)
        with torch.no_grad():
            for experts in mh.added_modules(model, "domain_experts").values():
                experts.gate.weight.fill_(0.1)
        outputs.append(logits(model, ids))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_hash_routing_follows_the_token_ids():
    model = build("bert")
    mh.moefy(model, 4, routing="hash")
    ids = batch()
    model(ids)
    for module in mh.added_modules(model, "moefy").values():
        assert torch.equal(module.token_ids, ids)
        routing = module.moe.router(torch.zeros(ids.numel(), 32), ids.reshape(-1))
        assert torch.equal(routing.expert_idx, module.moe.router.table[ids.reshape(-1)])
    mh.unpatch(model)  # the hooks that carry the ids go too
    assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")  # v5.23
@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_hash_routing_under_checkpointing_reruns_each_block_with_its_own_ids(name, use_reentrant):
    """Two forwards of different ids, then one backward: activation checkpointing reruns the
    blocks of the first forward during backward() with the first forward's ids (the gradients
    equal those without checkpointing), and the attention never sees the ids."""
    model = build(name)
    mh.moefy(model, 4, routing="hash", freeze_base=False)
    model.train()
    first, second = batch(seed=1), batch(seed=2)

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks in every run
        loss = model(first, labels=first).loss + model(second, labels=second).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    _, blocks = mh.surgery.blocks(model)
    attention = mh.surgery.detect_family(model).attention_attr
    seen = []
    for block in blocks:  # runs after moefy's hook: what the attention's forward gets
        getattr(block, attention).register_forward_pre_hook(lambda m, a, k: seen.append(sorted(k)), with_kwargs=True)
    got = grads()
    assert len(seen) == 2 * len(blocks) * 2  # two forwards, each block rerun once
    assert not any(TOKEN_IDS_KWARG in kwargs for kwargs in seen)
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)


def test_moefy_rejects_what_it_cannot_fuse():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16))
    with pytest.raises(ValueError, match="activation 'gelu_tanh' has no fused expert kernel"):
        mh.moefy(model, 2)
    with pytest.raises(ValueError, match="routing must be"):
        mh.moefy(build("llama"), 2, routing="random")
    with pytest.raises(ValueError, match="one tensor per block"):
        mh.moefy(build("llama"), 2, importance=[torch.ones(48)])
