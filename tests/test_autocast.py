"""The ops, the modules and patched Hugging Face models under ``torch.autocast`` (the mixed
precision of ``Trainer(bf16=True)``): float32 parameters, activations in the autocast dtype.

Policies (:mod:`modekernels.ops.autocast`): ``moe_mlp`` and ``neutral_residue`` cast their matmul
operands to the autocast dtype, as torch's ``linear``/``addmm`` do, and return it; ``route_top1``
casts its logits to float32, as autocast does for ``softmax`` on CUDA; ``grouped_mm`` casts
nothing, like ``torch._grouped_mm``. Each is checked against the same computation with the inputs
cast by hand, through the public functions and through direct ``torch.ops`` calls, with the
gradients landing on the float32 parameters in float32.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import DEVICE, backend_params

import modekernels
import modekernels.hf
from modekernels.hf import add_adamix, add_domain_experts, add_neutral_residues, compose
from modekernels.nn import Adapter, AdapterMixture, MoEMLP, NeutralResidue

BACKENDS = backend_params("reference", "triton", "cuda")
# Autocast's dtypes: bfloat16 on the CPU; on CUDA float16 (its default) too.
DTYPES = [torch.bfloat16] + ([torch.float16] if DEVICE.type == "cuda" else [])
TOLERANCE = {torch.bfloat16: dict(rtol=3e-2, atol=3e-2), torch.float16: dict(rtol=4e-3, atol=4e-3)}


@pytest.fixture(params=DTYPES, ids=str)
def dtype(request) -> torch.dtype:
    return request.param


def autocast(dtype: torch.dtype) -> torch.autocast:
    return torch.autocast(DEVICE.type, dtype=dtype)


def leaves(*shapes, dtype=torch.float32) -> list[torch.Tensor]:
    return [torch.randn(s, device=DEVICE, dtype=dtype).requires_grad_() for s in shapes]


def by_hand(tensors, dtype):
    """Leaves holding ``tensors`` cast to ``dtype``: the inputs of the by-hand computation."""
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def assert_grads_match(got: list[torch.Tensor], want: list[torch.Tensor], dtype) -> None:
    """got: float32 leaves after the autocast backward; want: their by-hand casts."""
    for leaf, cast in zip(got, want):
        assert leaf.grad.dtype == leaf.dtype
        torch.testing.assert_close(leaf.grad, cast.grad.to(leaf.dtype), **TOLERANCE[dtype])


# --- ops ---------------------------------------------------------------------------------------


def _offs(*ends: int) -> torch.Tensor:
    return torch.tensor(ends, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direct", [False, True], ids=["public", "torch.ops"])
def test_grouped_mm_casts_nothing_like_torch_grouped_mm(backend, dtype, direct):
    """float32 stays float32 (computed in float32, not in the autocast dtype), as
    torch._grouped_mm under autocast; the autocast dtype stays itself; mixed dtypes are refused."""
    x, w = leaves((9, 32), (3, 32, 8))  # 16-byte rows, as torch._grouped_mm takes them
    offs = _offs(2, 2, 9)
    run = (lambda *a: torch.ops.modekernels.grouped_mm(*a, backend)) if direct else (
        lambda *a: modekernels.grouped_mm(*a, backend=backend))
    want = run(x, w, offs)
    want.sum().backward()
    want_grads = [x.grad.clone(), w.grad.clone()]
    x.grad = w.grad = None
    with autocast(dtype):
        got = run(x, w, offs)
        assert got.dtype == torch._grouped_mm(x.cpu(), w.cpu(), offs.cpu()).dtype == torch.float32
        assert run(x.to(dtype), w.to(dtype), offs).dtype == dtype
        with pytest.raises((TypeError, RuntimeError), match="dtype"):
            run(x.to(dtype), w, offs)
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for leaf, grad in zip((x, w), want_grads):
        torch.testing.assert_close(leaf.grad, grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direct", [False, True], ids=["public", "torch.ops"])
def test_route_top1_takes_low_precision_logits_in_float32(backend, dtype, direct):
    """Logits from a float32 router under autocast come in the autocast dtype; the routing runs
    on them in float32 (gate and losses float32), and the gradient reaches the float32 router."""
    proj = torch.nn.Linear(16, 5, bias=False, device=DEVICE)
    x = torch.randn(23, 16, device=DEVICE)

    def route(logits):
        if direct:
            gate, aux_loss, z_loss, *_ = torch.ops.modekernels.route_top1(logits, 0.75, backend)
            return gate, aux_loss, z_loss
        routing = modekernels.route_top1(logits, capacity_factor=0.75, backend=backend)
        return routing.gate, routing.aux_loss, routing.z_loss

    with autocast(dtype):
        logits = proj(x)
        got = route(logits)
    assert logits.dtype == dtype and all(t.dtype == torch.float32 for t in got)
    (want_logits,) = by_hand([logits], torch.float32)
    want = route(want_logits)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    sum(t.sum() for t in want).backward()
    (expected,) = torch.autograd.grad(logits, proj.weight, want_logits.grad.to(dtype),
                                      retain_graph=True)
    sum(t.sum() for t in got).backward()
    assert proj.weight.grad.dtype == torch.float32 and proj.weight.grad.abs().sum() > 0
    torch.testing.assert_close(proj.weight.grad, expected, rtol=0, atol=0)


def _moe_inputs(x_dtype):
    """x (T, H) in x_dtype; float32 leaves gate (T, k), w1 (E, H, 2I), w2 (E, I, H), b1, b2."""
    (x,) = leaves((13, 16), dtype=x_dtype)
    gate, w1, w2, b1, b2 = leaves((13, 2), (5, 16, 24), (5, 12, 16), (5, 24), (5, 16))
    expert_idx = torch.stack([torch.randperm(5, device=DEVICE)[:2] for _ in range(13)])
    return x, expert_idx, gate, w1, w2, b1, b2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype", ["float32", "autocast"])
def test_moe_mlp_runs_in_the_autocast_dtype(backend, dtype, x_dtype):
    """x and the float32 weights and biases are cast to the autocast dtype (the gate keeps its
    float32); y comes in that dtype, equal to the by-hand cast, and every leaf gets its gradient
    in its own dtype."""
    x_dtype = torch.float32 if x_dtype == "float32" else dtype
    x, expert_idx, gate, w1, w2, b1, b2 = _moe_inputs(x_dtype)

    def run(x, gate, w1, w2, b1, b2):
        return modekernels.moe_mlp(x, expert_idx, gate, w1, w2, activation="silu", gated=True,
                                   b1=b1, b2=b2, backend=backend)

    with autocast(dtype):
        got = run(x, gate, w1, w2, b1, b2)
    assert got.dtype == dtype
    cast = by_hand((x, gate, w1, w2, b1, b2), dtype)
    cast[1] = by_hand([gate], gate.dtype)[0]  # the gate keeps its float32
    want = run(*cast)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    dy = torch.randn_like(got)
    got.backward(dy)
    want.backward(dy)
    assert_grads_match([x, gate, w1, w2, b1, b2], cast, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_mlp_stage_ops_autocast_when_called_directly(backend, dtype):
    x, expert_idx, gate, w1, w2, b1, b2 = _moe_inputs(torch.float32)
    perm, offs = modekernels.sort_by_expert(expert_idx, 5)
    with autocast(dtype):
        h, _ = torch.ops.modekernels.moe_mlp_up(x, perm, offs, w1, b1, "gelu", True, 2, True,
                                                backend)
        got = torch.ops.modekernels.moe_mlp_down(h, perm, offs, w2, b2, gate, backend)
    assert h.dtype == got.dtype == dtype
    cast = by_hand((x, w1, b1, w2, b2), dtype)
    want_h, _ = torch.ops.modekernels.moe_mlp_up(cast[0], perm, offs, cast[1], cast[2], "gelu",
                                                 True, 2, True, backend)
    want = torch.ops.modekernels.moe_mlp_down(want_h, perm, offs, cast[3], cast[4], gate, backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.sum().backward()
    want.sum().backward()
    assert_grads_match([x, w1, b1, w2, b2], cast, dtype)


def _residue_inputs():
    """x (T, d) and float32 leaves: w_in, w_glu (a, d), w_out (d, a), w_gate (d,), b_gate (),
    b_in, b_glu (a,), b_out (d,), residual (T, d)."""
    return leaves((11, 16), (8, 16), (8, 16), (16, 8), (16,), (), (8,), (8,), (16,), (11, 16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("direct", [False, True], ids=["public", "torch.ops"])
def test_neutral_residue_runs_in_the_autocast_dtype(backend, dtype, direct):
    """Every input, the residual included (as addmm's), in the autocast dtype: y in it, g and l1
    float32, equal to the by-hand cast, gradients in float32 on the float32 leaves."""
    tensors = _residue_inputs()

    def run(x, w_in, w_glu, w_out, w_gate, b_gate, b_in, b_glu, b_out, residual):
        if direct:
            return torch.ops.modekernels.neutral_residue(
                x, w_in, w_glu, w_out, w_gate, b_gate, b_in, b_glu, b_out, residual, "gelu",
                "sigmoid", False, True, backend)[:3]
        return modekernels.neutral_residue(
            x, w_in, w_glu, w_out, w_gate, b_gate, b_in=b_in, b_glu=b_glu, b_out=b_out,
            residual=residual, activation="gelu", gate="sigmoid", backend=backend)

    with autocast(dtype):
        got = run(*tensors)
    assert [t.dtype for t in got] == [dtype, torch.float32, torch.float32]
    cast = by_hand(tensors, dtype)
    want = run(*cast)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    (got[0].float().square().sum() + got[2].sum()).backward()
    (want[0].float().square().sum() + want[2].sum()).backward()
    assert_grads_match(tensors, cast, dtype)


# --- modules -----------------------------------------------------------------------------------


def _randomised(module: torch.nn.Module) -> torch.nn.Module:
    """The module on DEVICE with every parameter drawn at random (zero-initialised ones too)."""
    module = module.to(DEVICE)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(std=0.5)
    return module


MODULES = {
    "NeutralResidue": lambda: NeutralResidue(16, 8),
    "NeutralResidue-sigmoid-no-glu": lambda: NeutralResidue(16, 8, glu=False, gate="sigmoid"),
    "Adapter": lambda: Adapter(16, 8),
    "AdapterMixture-train": lambda: AdapterMixture(16, 8, 3).train(),
    "AdapterMixture-eval": lambda: AdapterMixture(16, 8, 3).eval(),
    "MoEMLP": lambda: MoEMLP(16, 12, 4, activation="silu", gated=True, capacity_factor=1.5),
}


def _output_and_loss(module, x: torch.Tensor):
    """The output (..., d) of a module (or its compiled form) and a float32 loss over everything
    it returns."""
    out = module(x)
    if hasattr(out, "aux_loss"):  # MoEMLP
        return out.output, out.output.float().square().mean() + out.aux_loss + out.z_loss
    if isinstance(out, tuple):  # NeutralResidue: y, g, l1
        return out[0], out[0].float().square().mean() + out[2].mean()
    return out, out.float().square().mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODULES)
def test_module_under_autocast_matches_its_low_precision_copy(backend, dtype, name):
    """A float32 module under autocast against a copy cast to the autocast dtype (the same
    computation cast by hand): output in that dtype, within its tolerance, and float32
    gradients on the float32 parameters matching the copy's."""
    module = _randomised(MODULES[name]())
    copy_ = copy.deepcopy(module).to(dtype)
    x = torch.randn(3, 7, 16, device=DEVICE)
    with modekernels.use_backend(backend):
        torch.manual_seed(1)  # the same copies drawn by AdapterMixture in training
        with autocast(dtype):
            got, got_loss = _output_and_loss(module, x)
        torch.manual_seed(1)
        want, want_loss = _output_and_loss(copy_, x.to(dtype))
        assert got.dtype == want.dtype == dtype and got_loss.dtype == torch.float32
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])
        got_loss.backward()
        want_loss.backward()
    for (param_name, param), param_copy in zip(module.named_parameters(), copy_.parameters()):
        assert param.grad is not None and param.grad.dtype == torch.float32, param_name
        torch.testing.assert_close(param.grad, param_copy.grad.float(), **TOLERANCE[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["NeutralResidue", "AdapterMixture-train", "MoEMLP"])
def test_compiled_module_under_autocast_equals_eager(backend, dtype, name):
    """torch.compile(fullgraph=True) of a float32 module inside an autocast region: the op's
    autocast rule is traced into the graph; output and gradients equal eager."""
    module = _randomised(MODULES[name]())
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 7, 16, device=DEVICE)
    results = []
    with modekernels.use_backend(backend):
        for run in (module, compiled):
            module.zero_grad()
            torch.manual_seed(1)
            with autocast(dtype):
                out, loss = _output_and_loss(run, x)
            loss.backward()
            results.append([out] + [p.grad for p in module.parameters()])
    assert results[1][0].dtype == dtype
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


# --- Hugging Face models -----------------------------------------------------------------------

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def _loss_and_grads(model, ids, dtype):
    model.zero_grad()
    with autocast(dtype):
        out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("patch", ["neutral_residues", "adamix", "domain_experts"])
def test_patched_llama_trains_under_autocast(backend, dtype, patch):
    """A tiny Llama patched with neutral residues, AdaMix or MoDE's domain experts (grouped
    GEMMs over the experts' stacked layers): under autocast it equals the unpatched model at
    initialisation (the added modules output zero; MoDE's experts inactive), and once its added
    weights are nonzero (and MoDE's experts composed) its logits stay within the autocast
    dtype's tolerance of the float32 run, with float32 gradients on the added float32
    parameters."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, intermediate_size=48))
    model = model.to(DEVICE)
    ids = torch.randint(0, 64, (2, 7), device=DEVICE)
    with torch.no_grad(), autocast(dtype):
        base = model(ids).logits
    if patch == "neutral_residues":
        add_neutral_residues(model, d_adapter=8)
    elif patch == "adamix":
        add_adamix(model, d_adapter=8, num_adapters=2)
    else:
        add_domain_experts(model, ["a", "b"], layers_per_expert=1)
    added = {n: p for n, p in model.named_parameters() if ".added." in n}
    assert added
    with modekernels.use_backend(backend):
        with torch.no_grad(), autocast(dtype):
            torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
        if patch == "domain_experts":
            compose(model)
        with torch.no_grad():
            for param in added.values():
                param.normal_(std=0.1)
            torch.manual_seed(1)  # the same AdaMix copies in both runs
            want = model(ids).logits
        torch.manual_seed(1)
        out, grads = _loss_and_grads(model, ids, dtype)
    assert out.loss.dtype == torch.float32 and out.logits.dtype == base.dtype
    torch.testing.assert_close(out.logits.float(), want, rtol=0.1, atol=0.1)
    for name in added:
        assert grads[name].dtype == torch.float32 and grads[name].abs().sum() > 0, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixtral_experts_under_autocast_match_eager(backend, dtype):
    """A tiny Mixtral with experts_implementation="modekernels" under autocast against
    transformers' eager experts under the same autocast: same dtypes, logits and float32
    gradients within the autocast dtype's tolerance."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=4,
                                        num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    model = model.to(DEVICE)
    ids = torch.randint(0, 64, (2, 5), device=DEVICE)
    want, want_grads = _loss_and_grads(model, ids, dtype)
    want_grads = {n: g.clone() for n, g in want_grads.items()}
    model.set_experts_implementation("modekernels")
    with modekernels.use_backend(backend):
        got, got_grads = _loss_and_grads(model, ids, dtype)
    assert got.logits.dtype == want.logits.dtype and got.loss.dtype == torch.float32
    torch.testing.assert_close(got.logits, want.logits, **TOLERANCE[dtype])
    assert got_grads.keys() == want_grads.keys()
    for name, grad in got_grads.items():
        assert grad.dtype == torch.float32, name
        torch.testing.assert_close(grad, want_grads[name], **TOLERANCE[dtype])
