"""Model surgery on tiny Hugging Face models of every supported family: the patching core,
neutral residues, adapters, AdaMix, unpatch, freezing, repr, training, generation and
torch.compile."""

from __future__ import annotations

import pytest
import torch
from hf_models import FAMILY_OF, NAMES, batch, build, logits

import modekernels
import modekernels.hf as mh


pytestmark = pytest.mark.usefixtures("reference_backend")


def ffn_of(model, i):
    family = mh.detect_family(model)
    _, blocks = mh.surgery.blocks(model)
    return getattr(blocks[i], family.ffn_attr)


def surgeries():
    return {
        "neutral_residue": lambda m: mh.add_neutral_residues(m, d_adapter=8),
        "adapter": lambda m: mh.add_adapters(m, 8),
        "adamix": lambda m: mh.add_adamix(m, num_adapters=3, d_adapter=8),
        "domain_experts": lambda m: mh.add_domain_experts(m, ["news", "code"], layers_per_expert=2),
    }


# --------------------------------------------------------------------------- families


@pytest.mark.parametrize("name", NAMES)
def test_detect_family(name):
    assert mh.detect_family(build(name)).name == FAMILY_OF[name]


def test_unsupported_model_is_named():
    with pytest.raises(ValueError, match="Linear.*no transformer blocks"):
        mh.detect_family(torch.nn.Linear(3, 3))


# --------------------------------------------------------------------------- identity at init, unpatch


@pytest.mark.parametrize("method", ["neutral_residue", "adapter", "adamix", "domain_experts"])
@pytest.mark.parametrize("name", NAMES)
def test_added_modules_leave_outputs_bit_identical_and_unpatch_restores(name, method):
    model = build(name)
    ids = batch()
    before = logits(model, ids)
    keys = list(model.state_dict())
    originals = [ffn_of(model, i) for i in range(2)]
    _, blocks = mh.surgery.blocks(model)
    original_blocks = list(blocks)
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}

    report = surgeries()[method](model)

    assert torch.equal(logits(model, ids), before)
    assert report.method == method and report.layers == [0, 1] and len(report.modules) == 2
    assert report.added_parameters == sum(
        p.numel() for m in mh.added_modules(model).values() for p in m.parameters()
    ) > 0
    # backbone names unchanged; only the added modules are new and trainable
    new_keys = [k for k in model.state_dict() if k not in keys]
    assert all(".added." in k for k in new_keys) and set(keys) <= set(model.state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".added." in n for n in trainable)
    assert report.trainable_parameters == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"added by modekernels: {method}" in repr(model)

    mh.unpatch(model)
    assert [ffn_of(model, i) for i in range(2)] == originals
    assert list(blocks) == original_blocks
    assert list(model.state_dict()) == keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grad_flags
    assert "modekernels" not in repr(model)
    assert torch.equal(logits(model, ids), before)
    assert mh.surgery.patch_records(model) == {}


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
def test_surgeries_stack_and_unpatch_together(name):
    model = build(name)
    ids = batch()
    before = logits(model, ids)
    keys = list(model.state_dict())
    mh.add_domain_experts(model, ["a"], layers_per_expert=1, blocks=[1])
    mh.add_neutral_residues(model, d_adapter=4, layers=[0, 1])
    mh.add_adapters(model, 4, layers=[1])
    assert torch.equal(logits(model, ids), before)
    # the FFN of the block under the domain experts runs its residue (the block's original sees it)
    residue = mh.added_modules(model, "neutral_residue")
    with torch.no_grad():
        for branch in residue.values():
            branch.residue.w_out.normal_()
    assert not torch.equal(logits(model, ids), before)
    assert all(b.last_l1 is not None for b in residue.values())
    mh.unpatch(model)
    assert list(model.state_dict()) == keys
    assert torch.equal(logits(model, ids), before)


def test_layers_choose_blocks_and_reject_bad_indices():
    model = build("llama")
    report = mh.add_neutral_residues(model, d_adapter=4, layers=[-1])
    assert report.layers == [1]
    assert isinstance(ffn_of(model, 1), mh.surgery.PatchedFFN)
    assert not isinstance(ffn_of(model, 0), mh.surgery.PatchedFFN)
    with pytest.raises(ValueError, match="already applied"):
        mh.add_neutral_residues(model, d_adapter=4, layers=[0])
    with pytest.raises(ValueError, match="layers: 5 is not a block index"):
        mh.add_adapters(build("llama"), 4, layers=[5])
    with pytest.raises(ValueError, match="layers: True is not a block index"):
        mh.add_adapters(build("llama"), 4, layers=[True])
    with pytest.raises(ValueError, match="layers must be a block index or a list of them"):
        mh.add_adapters(build("llama"), 4, layers="0")
    with pytest.raises(ValueError, match="d_adapter must be a positive int"):
        mh.add_adapters(build("llama"), 0)
    one = build("llama")  # an int is one block
    assert mh.add_neutral_residues(one, d_adapter=4, layers=0).layers == [0]
    assert mh.add_adapters(one, 4, layers=-1).layers == [1]


def test_freeze_base_false_trains_backbone_too():
    model = build("gpt2")
    mh.add_neutral_residues(model, d_adapter=4, freeze_base=False)
    assert all(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------- neutral residues


@pytest.mark.parametrize("name", ["roberta", "gpt2", "qwen3"])
def test_neutral_residue_ratio_sizes_the_adapters(name):
    model = build(name)
    base = sum(p.numel() for p in model.parameters())
    report = mh.add_neutral_residues(model, ratio=0.2)
    assert report.options["d_adapter"] >= 1
    assert abs(report.added_parameters / base - 0.2) < 0.02
    with pytest.raises(ValueError, match="d_adapter or ratio"):
        mh.add_neutral_residues(build(name), d_adapter=4, ratio=0.1)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_neutral_residue_loss_averages_l1_over_original_tokens(name):
    model = build(name)
    mh.add_neutral_residues(model, d_adapter=8)
    branches = list(mh.added_modules(model, "neutral_residue").values())
    with torch.no_grad():
        for b in branches:
            b.residue.w_out.normal_()
    ids = batch(batch_size=3)
    model(ids)
    mask = torch.tensor([[True] * 7, [False] * 7, [True, False] * 3 + [True]])
    loss = mh.neutral_residue_loss(model, mask)
    expected = torch.stack([(b.last_l1[mask]).mean() / 32 for b in branches]).mean()
    torch.testing.assert_close(loss, expected)
    # per-sequence mask
    seq_loss = mh.neutral_residue_loss(model, torch.tensor([True, False, False]))
    expected = torch.stack([b.last_l1[0].mean() / 32 for b in branches]).mean()
    torch.testing.assert_close(seq_loss, expected)
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".added." not in n)
    with pytest.raises(ValueError, match="original_mask must have shape"):
        mh.neutral_residue_loss(model, torch.ones(2, 7, dtype=torch.bool))


def test_neutral_residue_loss_needs_residues():
    with pytest.raises(ValueError, match="the model has no neutral residues"):
        mh.neutral_residue_loss(build("gpt2"), torch.ones(1, 1, dtype=torch.bool))


@pytest.mark.parametrize("method", ["neutral_residues", "moefy"])
def test_losses_read_after_the_forward_refuse_reentrant_checkpointing(method):
    """Reentrant gradient checkpointing runs the first pass without grad, so the ℓ1 and balance
    terms the modules keep would train nothing: an error says so; non-reentrant works."""
    ids = batch(batch_size=2, seq=6)
    for reentrant in (True, False):
        model = build("llama")
        if method == "neutral_residues":
            mh.add_neutral_residues(model, d_adapter=8)

            def extra():
                return mh.neutral_residue_loss(model, torch.ones(ids.shape, dtype=torch.bool))
        else:
            mh.moefy(model, 2)

            def extra():
                return sum(mh.moe_losses(model))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        loss = model(ids, labels=ids).loss
        if reentrant:
            with pytest.raises(RuntimeError, match="reentrant gradient checkpointing"):
                extra()
            continue
        term = extra()
        assert term.requires_grad
        (loss + term).backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0
                   for n, p in model.named_parameters() if ".added." in n)


# --------------------------------------------------------------------------- AdaMix


@pytest.mark.parametrize("name", ["roberta", "gpt2", "mistral"])
def test_merge_adamix_gives_the_mixture_eval_output(name):
    model = build(name)
    mh.add_adamix(model, num_adapters=3, d_adapter=8)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.2)
    ids = batch()
    before = logits(model, ids)
    base = build(name)
    assert not torch.allclose(before, logits(base, ids), atol=1e-4)
    report = mh.merge_adamix(model)
    assert report.options["merged"] is True
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-5, atol=1e-5)
    assert all(".added.adamix" in n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="already merged"):
        mh.merge_adamix(model)
    mh.unpatch(model)
    torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=0, atol=0)


# --------------------------------------------------------------------------- training


def _eval_loss(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


def _train(model, ids, steps=4, lr=1e-2):
    """A plain AdamW loop over the trainable parameters; (eval loss before, eval loss after)."""
    before = _eval_loss(model, ids)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, _eval_loss(model, ids)


@pytest.mark.parametrize("method", ["neutral_residue", "adapter", "adamix"])
@pytest.mark.parametrize("name", ["bert", "gpt2", "qwen2"])
def test_plain_loop_trains_only_the_added_modules(name, method):
    model = build(name)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    surgeries()[method](model)
    ids = batch(batch_size=4, seq=8)
    before, after = _train(model, ids)
    assert after < before
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_trainer_trains_a_patched_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = build("llama")
    mh.add_neutral_residues(model, d_adapter=8)
    ids = batch(batch_size=8, seq=8)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
        report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 3
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_trainer_resumes_the_added_modules_from_its_checkpoint(tmp_path):
    """Trainer's checkpoint of a patched model holds the added modules, so resuming restores
    them (Trainer loads its model file into the patched model), and the modules' own files sit
    beside it for load_modules."""
    from transformers import Trainer, TrainingArguments

    ids = batch(batch_size=8, seq=8)
    data = [{"input_ids": row, "labels": row} for row in ids]

    def trainer(model):
        args = TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
            report_to=[], use_cpu=True, save_strategy="steps", save_steps=2,
        )
        return Trainer(model=model, args=args, train_dataset=data)

    trained = build("llama")
    mh.add_neutral_residues(trained, d_adapter=8)
    trainer(trained).train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "modules.json").is_file()

    resumed = build("llama")
    mh.add_neutral_residues(resumed, d_adapter=8)
    trainer(resumed).train(resume_from_checkpoint=str(checkpoint))
    added = dict(trained.named_parameters())
    for name, p in resumed.named_parameters():
        if ".added." in name:
            assert torch.equal(p, added[name]), name


def test_domain_experts_train_under_trainer_with_domain_ids(tmp_path):
    """With Trainer's defaults (remove_unused_columns=True) the domain_ids column reaches the
    experts: the model's forward signature names it."""
    import inspect

    from transformers import Trainer, TrainingArguments

    model = build("gpt2")
    mh.add_domain_experts(model, ["a", "b"], layers_per_expert=1)
    mh.compose(model)
    assert "domain_ids" in inspect.signature(model.forward).parameters
    seen = []
    for experts in mh.added_modules(model).values():
        experts.register_forward_pre_hook(lambda module, args: seen.append(module.domain_ids))
    ids = batch(batch_size=4, seq=8)
    data = [{"input_ids": row, "labels": row, "domain_ids": torch.tensor(i % 2)} for i, row in enumerate(ids)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
        report_to=[], use_cpu=True, save_strategy="no",
    )
    assert Trainer(model=model, args=args, train_dataset=data).train().global_step == 2
    assert len(seen) == 2 * 2 and all(sorted(got.tolist()) == [0, 0, 1, 1] for got in seen)  # shuffled rows
    mh.unpatch(model)
    assert "forward" not in model.__dict__ and "save_pretrained" not in model.__dict__


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")  # v5.23
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_gradient_checkpointing_reaches_blocks_wrapped_by_domain_experts(name):
    model = build(name)
    mh.add_domain_experts(model, ["a"], layers_per_expert=1)
    mh.compose(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ids = batch()
    model.train()
    torch.manual_seed(0)  # the same dropout masks in both runs
    model(ids, labels=ids).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, blocks = mh.surgery.blocks(model)
    originals = [mh.surgery.unwrap(block) for block in blocks]
    assert all(isinstance(block, mh.surgery.PatchedBlock) for block in blocks)
    assert all(block.gradient_checkpointing for block in originals)
    calls = []
    for block in originals:  # count the checkpointed calls
        def spy(*args, _inner=block._gradient_checkpointing_func, **kwargs):
            calls.append(1)
            return _inner(*args, **kwargs)

        block._gradient_checkpointing_func = spy
    torch.manual_seed(0)
    model(ids, labels=ids).loss.backward()
    assert len(calls) == len(originals)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_torch_compile_matches_eager(name):
    model = build(name)
    mh.add_neutral_residues(model, d_adapter=8)
    mh.add_adamix(model, num_adapters=2, d_adapter=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    ids = batch()
    mask = torch.ones(ids.shape, dtype=torch.bool)
    eager = logits(model, ids)
    eager_loss = mh.neutral_residue_loss(model, mask)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        out = compiled(ids).logits
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mh.neutral_residue_loss(model, mask), eager_loss, rtol=1e-5, atol=1e-6)


def _greedy(model, ids, steps, **kwargs):
    """Greedy decoding by full forwards on every prefix (no cache): the oracle of generate."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, use_cache=False, **kwargs).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("method", ["neutral_residue", "adapter", "adamix", "domain_experts"])
@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen3"])
def test_generate_with_the_kv_cache_matches_generate_without(name, method):
    """A patched decoder generates with the KV cache (one new token per step through the added
    modules, MoDE's active experts included) exactly as it does recomputing every prefix."""
    model = build(name)
    surgeries()[method](model)
    if method == "domain_experts":
        mh.compose(model)  # every expert takes part
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    ids = batch(batch_size=2, seq=5)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                  pad_token_id=0)
    with torch.no_grad():
        recomputed = model.generate(ids, use_cache=False, **kwargs)
        cached = model.generate(ids, **kwargs)
    assert cached.shape == (2, 10)
    assert torch.equal(cached, recomputed)


def test_generate_passes_domain_ids_to_the_experts():
    model = build("llama")
    mh.add_domain_experts(model, ["a", "b"], layers_per_expert=1)
    mh.compose(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    ids = batch(batch_size=2, seq=5)
    domain_ids = torch.tensor([1, -1])
    with torch.no_grad():
        out = model.generate(ids, domain_ids=domain_ids, use_cache=False, max_new_tokens=4, do_sample=False,
                             pad_token_id=0)
    assert torch.equal(out, _greedy(model, ids, 4, domain_ids=domain_ids))


def test_triton_interpreter_runs_through_a_patched_model():
    from conftest import DEVICE
    from modekernels.backends import availability

    reason = availability("triton", DEVICE)
    if reason:
        pytest.skip(reason)
    model = build("llama").to(DEVICE)
    mh.add_neutral_residues(model, d_adapter=8)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    ids = batch(batch_size=1, seq=5).to(DEVICE)
    expected = logits(model, ids)
    with modekernels.use_backend("triton"):
        out = logits(model, ids)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
