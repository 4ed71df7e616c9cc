"""MoDE domain experts on tiny Hugging Face models: identity at init, routing by domain id,
stage 1 (train one domain) and stage 2 (compose)."""

from __future__ import annotations

import pytest
import torch
from hf_models import NAMES, batch, build, logits, perturb_domain_experts
from torch.utils._python_dispatch import TorchDispatchMode

import modekernels.hf as mh


pytestmark = pytest.mark.usefixtures("reference_backend")


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
    perturb_domain_experts(model)
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
    with pytest.raises(ValueError, match="a list of names, not one string"):
        mh.add_domain_experts(build("gpt2"), "ab")
    with pytest.raises(ValueError, match="^blocks: 7 is not a block index"):
        mh.add_domain_experts(build("gpt2"), ["a"], blocks=[7])
    assert mh.add_domain_experts(build("gpt2"), ["a"], blocks=1).layers == [1]
    with pytest.raises(ValueError, match="add_domain_experts first"):
        mh.compose(build("gpt2"))


# --------------------------------------------------------------------------- grouped experts


def _loop_forward(self, x, y, *args, **kwargs):
    """The oracle: each active expert's layers one after another over the whole batch."""
    import inspect

    y_bb = y[0] if isinstance(y, tuple) else y
    logits = self.gate(x)
    allowed = torch.zeros(1 + len(self.domains), dtype=torch.bool)
    allowed[0] = True
    for name in self.active:
        allowed[1 + self.domains.index(name)] = True
    allowed = allowed.expand(logits.shape)
    if self.domain_ids is not None:
        column = torch.arange(logits.shape[-1]) - 1
        allowed = allowed & ((column == self.domain_ids.view(-1, 1, 1)) | (column == -1))
    a = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    out = a[..., :1] * y_bb
    for name in self.active:
        h = x
        for layer in self.experts[name]:
            bound = inspect.signature(layer.forward).bind_partial(h, *args, **kwargs)
            for key, value in (("past_key_values", None), ("use_cache", False)):
                if key in bound.arguments:
                    bound.arguments[key] = value
            h = layer(*bound.args, **bound.kwargs)
            h = h[0] if isinstance(h, tuple) else h
        j = 1 + self.domains.index(name)
        out = out + a[..., j : j + 1] * h
    return (out, *y[1:]) if isinstance(y, tuple) else out


def _logits_and_grads(model, ids, mask, domain_ids, oracle):
    experts = list(mh.added_modules(model).values())
    if oracle:
        for module in experts:
            module.forward = _loop_forward.__get__(module)
    try:
        out = model(ids, attention_mask=mask, domain_ids=domain_ids).logits
    finally:
        for module in experts:
            module.__dict__.pop("forward", None)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    if not out.requires_grad:  # no sequence reaches a trainable expert
        return out, [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad((out * weights).sum(), params, allow_unused=True)
    return out.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("name", NAMES)
def test_grouped_experts_equal_the_per_expert_loop(name, monkeypatch):
    model = build(name)
    mh.add_domain_experts(model, ["news", "code", "law"], layers_per_expert=2)
    mh.compose(model)
    perturb_domain_experts(model)
    ids = batch(batch_size=5, seq=6)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # padding reaches the experts' attention through the gathered mask
    mask[3, 5:] = 0
    domain_ids = torch.tensor([2, -1, 0, 2, 0])  # "code" has no sequence
    for active, routing, ids_on_host in (
        ("all", domain_ids, True), ("all", None, True), ("code", domain_ids, True),
        ("law", domain_ids, True), ("law", None, True),
        # ids on the GPU: the batch keeps its size, unrouted sequences sorted last and skipped
        ("all", domain_ids, False), ("law", domain_ids, False),
    ):
        if active == "all":
            mh.compose(model)
        else:
            mh.train_domain(model, active)
        want = _logits_and_grads(model, ids, mask, routing, oracle=True)
        with monkeypatch.context() as patch:
            if not ids_on_host:
                patch.setattr(mh.domain_experts, "values_visible", lambda t: False)
            got = _logits_and_grads(model, ids, mask, routing, oracle=False)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] = self.counts.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name, linears", [("llama", 7), ("gpt2", 4)])
def test_each_linear_of_the_experts_is_one_grouped_mm_whatever_the_domains(name, linears):
    model = build(name)
    domains = ["a", "b", "c"]
    mh.add_domain_experts(model, domains, layers_per_expert=2, blocks=[1])
    mh.compose(model)
    ids = batch(batch_size=4)
    grouped_mm = torch.ops.modekernels.grouped_mm.default
    for active, domain_ids in ((domains[:1], [0, 0, -1, 0]), (domains, [2, 0, 1, -1]), (domains, None)):
        for module in mh.added_modules(model).values():
            module.active = list(active)
        with _CountOps() as ops:
            logits(model, ids, domain_ids=None if domain_ids is None else torch.tensor(domain_ids))
        assert ops.counts.get(grouped_mm, 0) == 2 * linears
    with _CountOps() as ops:  # backbone-only sequences cost nothing in the experts
        logits(model, ids, domain_ids=torch.tensor([-1, -1, -1, -1]))
    assert grouped_mm not in ops.counts
    with pytest.raises(ValueError, match=r"domain_ids must have shape \(4,\), one id per sequence; got \(3,\)"):
        logits(model, ids, domain_ids=torch.tensor([0, 1, 2]))


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")  # v5.23
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_disable` is deprecated:FutureWarning")
@pytest.mark.parametrize("enabled_before_surgery", [False, True])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_reaches_the_expert_layers(use_reentrant, enabled_before_surgery):
    """With gradient_checkpointing_enable (before or after add_domain_experts) each depth of the
    stacked expert layers runs as one checkpointed call, rerun during backward() with its own
    grouping; the gradients equal those without checkpointing."""
    model = build("llama")
    enable = dict(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if enabled_before_surgery:
        model.gradient_checkpointing_enable(**enable)
    mh.add_domain_experts(model, ["news", "code", "law"], layers_per_expert=2)
    mh.compose(model)
    perturb_domain_experts(model)
    if not enabled_before_surgery:
        model.gradient_checkpointing_enable(**enable)
    model.train()
    experts = list(mh.added_modules(model).values())
    calls = []
    for module in experts:
        for layer in module.experts["news"]:  # the first source of each stacked depth
            def spy(*args, _inner=layer._gradient_checkpointing_func, **kwargs):
                calls.append(1)
                return _inner(*args, **kwargs)

            layer._gradient_checkpointing_func = spy
    ids, domain_ids = batch(batch_size=4, seq=6), torch.tensor([2, -1, 0, 2])

    def grads():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids, domain_ids=domain_ids).loss
        loss = loss + model(ids.flip(0), labels=ids.flip(0)).loss  # another grouping before backward
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    got = grads()
    assert len(calls) == 2 * len(experts) * 2  # two forwards, two stacked depths per block
    model.gradient_checkpointing_disable()
    want = grads()
    assert len(calls) == 2 * len(experts) * 2
    assert got.keys() == want.keys() and any(".experts.law." in n for n in got)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)
