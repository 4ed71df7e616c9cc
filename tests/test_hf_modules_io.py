"""save_modules / load_modules / port_modules on tiny Hugging Face models."""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import batch, build

import modekernels.hf as mh


pytestmark = pytest.mark.usefixtures("reference_backend")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _perturb(model):
    """Give the added modules non-trivial weights (at init they are neutral)."""
    with torch.no_grad():
        for module in mh.added_modules(model).values():
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.1)


SURGERIES = {
    "neutral_residue": lambda m: mh.add_neutral_residues(m, d_adapter=8),
    "adapter": lambda m: mh.add_adapters(m, 8, layers=[1]),
    "adamix": lambda m: mh.add_adamix(m, num_adapters=2, d_adapter=8),
    "domain_experts": lambda m: mh.add_domain_experts(m, ["a", "b"], layers_per_expert=1),
}


@pytest.mark.parametrize(
    "name, methods",
    [
        ("bert", ["neutral_residue", "adamix"]),
        ("roberta", ["adapter"]),
        ("gpt2", ["neutral_residue", "domain_experts"]),
        ("llama", ["adapter", "domain_experts"]),
        ("qwen3", ["neutral_residue"]),
    ],
)
def test_save_pretrained_plus_load_modules_round_trip_is_exact(tmp_path, name, methods):
    model = build(name)
    for method in methods:
        SURGERIES[method](model)
    if "domain_experts" in methods:
        mh.compose(model)
    _perturb(model)
    ids = batch()
    expected = logits(model, ids)

    model.save_pretrained(tmp_path / "base")
    config = mh.save_modules(model, tmp_path / "modules")
    saved = json.loads((tmp_path / "modules" / "modules.json").read_text())
    assert saved == json.loads(json.dumps(config))
    assert saved["host"]["family"] == mh.detect_family(model).name
    assert saved["host"]["hidden_size"] == 32 and saved["host"]["num_layers"] == 2
    assert sorted({g["method"] for g in saved["methods"]}) == sorted(methods)

    fresh, info = type(model).from_pretrained(tmp_path / "base", output_loading_info=True)
    added = {f"{name}.{key}" for name, module in mh.added_modules(model).items()
             for key in module.state_dict()}
    assert not info["missing_keys"]  # every backbone key; the added ones left to load_modules
    # (transformers leaves out of its report the keys a model ignores, e.g. GPT-2's "attn.bias")
    assert info["unexpected_keys"] and set(info["unexpected_keys"]) <= added
    report = mh.load_modules(fresh.eval(), tmp_path / "modules")
    assert not report.refused and report.moved
    assert torch.equal(logits(fresh, ids), expected)  # MoDE's experts active again, as saved
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert trainable and all(".added." in n for n in trainable)


@pytest.mark.parametrize("stage", ["train_domain", "compose"])
def test_load_modules_restores_the_domain_experts_stage(tmp_path, stage):
    model = build("llama")
    mh.add_domain_experts(model, ["a", "b"], layers_per_expert=1)
    if stage == "train_domain":
        mh.train_domain(model, "b")
    else:
        mh.compose(model)
    _perturb(model)
    ids = batch()
    expected = logits(model, ids)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model.save_pretrained(tmp_path)  # the checkpoint and the modules, side by side
    saved = json.loads((tmp_path / "modules.json").read_text())["methods"][0]["options"]
    assert saved["stage"] == stage and saved["active"] == (["b"] if stage == "train_domain" else ["a", "b"])

    fresh = type(model).from_pretrained(tmp_path).eval()
    mh.load_modules(fresh, tmp_path)
    ported = build("llama", seed=3)  # another backbone of the same shapes
    mh.port_modules(tmp_path, ported)
    assert torch.equal(logits(fresh, ids), expected)
    for host in (fresh, ported):
        assert {n for n, p in host.named_parameters() if p.requires_grad} == trainable
        assert [m.active for m in mh.added_modules(host).values()] == [saved["active"]] * 2


def test_a_failed_strict_load_leaves_the_model_as_it_was(tmp_path):
    source = build("llama")
    mh.add_adapters(source, 8)
    mh.add_neutral_residues(source, d_adapter=8, layers=[1])
    _perturb(source)
    mh.save_modules(source, tmp_path)
    host = build("llama", seed=4)
    mh.add_neutral_residues(host, d_adapter=4, layers=[1])  # does not fit the saved residue
    _perturb(host)
    ids = batch()
    before = logits(host, ids)
    state = {k: v.clone() for k, v in host.state_dict().items()}
    flags = {n: p.requires_grad for n, p in host.named_parameters()}
    with pytest.raises(ValueError, match="nothing was changed"):
        mh.load_modules(host, tmp_path)
    assert sorted(mh.added_modules(host)) == ["model.layers.1.mlp.added.neutral_residue"]
    assert list(mh.surgery.patch_records(host)) == ["neutral_residue"]
    assert host.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in host.state_dict().items())
    assert {n: p.requires_grad for n, p in host.named_parameters()} == flags
    assert torch.equal(logits(host, ids), before)


def test_load_modules_into_the_patched_model_overwrites_its_modules(tmp_path):
    model = build("gpt2")
    mh.add_neutral_residues(model, d_adapter=8)
    _perturb(model)
    ids = batch()
    expected = logits(model, ids)
    mh.save_modules(model, tmp_path)
    _perturb(model)
    assert not torch.equal(logits(model, ids), expected)
    assert sorted(mh.load_modules(model, tmp_path).moved) == ["neutral_residue.0", "neutral_residue.1"]
    assert torch.equal(logits(model, ids), expected)


def test_load_modules_is_strict(tmp_path):
    model = build("llama")
    mh.add_neutral_residues(model, d_adapter=8)
    mh.save_modules(model, tmp_path)
    other = build("llama", hidden=48)
    with pytest.raises(ValueError, match="(?s)do not fit.*shape mismatch"):
        mh.load_modules(other, tmp_path)
    assert mh.added_modules(other) == {} and "save_pretrained" not in other.__dict__
    with pytest.raises(FileNotFoundError, match="modules.json"):
        mh.load_modules(build("llama"), tmp_path / "missing")
    with pytest.raises(ValueError, match="nothing to save"):
        mh.save_modules(build("llama"), tmp_path / "empty")


@pytest.mark.parametrize("name", ["roberta", "gpt2", "mistral"])
def test_port_modules_refuses_the_mismatched_layer_and_moves_the_rest(tmp_path, name):
    source = build(name)
    mh.add_neutral_residues(source, d_adapter=8)
    _perturb(source)
    mh.save_modules(source, tmp_path)

    host = build(name, seed=3)  # other backbone weights, same shapes
    mh.add_neutral_residues(host, d_adapter=4, layers=[1])  # its own, narrower residue on block 1
    own = {k: v.clone() for k, v in mh.added_modules(host)[next(iter(mh.added_modules(host)))].state_dict().items()}
    report = mh.port_modules(tmp_path, host)

    assert report.moved == ["neutral_residue.0"]
    assert list(report.refused) == ["neutral_residue.1"]
    assert "shape mismatch" in report.refused["neutral_residue.1"] and "(8, 32)" in report.refused["neutral_residue.1"]
    src = mh.added_modules(source)
    dst = mh.added_modules(host)
    name0 = next(n for n in src if ".0." in n)
    name1 = next(n for n in dst if ".1." in n)
    for k, v in src[name0].state_dict().items():
        assert torch.equal(dst[name0].state_dict()[k], v)
    for k, v in own.items():  # the host keeps its own module on the refused block
        assert torch.equal(dst[name1].state_dict()[k], v)
    assert "moved 1 modules, refused 1" in str(report)


def test_port_modules_onto_an_unpatched_host_with_fewer_blocks(tmp_path):
    source = build("llama", layers=3)
    mh.add_adapters(source, 8)
    _perturb(source)
    mh.save_modules(source, tmp_path)
    host = build("llama", seed=5)
    report = mh.port_modules(tmp_path, host)
    assert report.moved == ["adapter.0", "adapter.1"]
    assert report.refused == {"adapter.2": "the host has only 2 blocks"}
    assert mh.surgery.patch_records(host)["adapter"].keys() == {0, 1}
    mh.unpatch(host)
    assert torch.equal(logits(host, batch()), logits(build("llama", seed=5), batch()))


def test_port_modules_refuses_every_block_of_a_wider_host_and_leaves_it_unpatched(tmp_path):
    source = build("gpt2")
    mh.add_neutral_residues(source, d_adapter=8)
    mh.save_modules(source, tmp_path)
    host = build("gpt2", hidden=48)
    report = mh.port_modules(tmp_path, host)
    assert report.moved == [] and set(report.refused) == {"neutral_residue.0", "neutral_residue.1"}
    assert mh.added_modules(host) == {} and "modekernels" not in repr(host)
