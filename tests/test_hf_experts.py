"""Tests of ``experts_implementation="modekernels"`` (``modekernels.hf.register``): tiny models
of each MoE family against ``"eager"``, and experts modules with every flag combination, a model's
own ``_apply_gate``, a post-expert norm and expert-parallel sentinels against transformers' own
``batched_mm`` / ``grouped_mm`` implementations, outputs and gradients, on the reference and
Triton backends."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers
from conftest import DEVICE, backend_params
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.models.mixtral.modeling_mixtral import MixtralExperts
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

import modekernels
import modekernels.hf

BACKENDS = backend_params("reference", "triton")
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "mixtral": lambda: transformers.MixtralConfig(
        **COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_experts=6, num_experts_per_tok=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON, intermediate_size=48, moe_intermediate_size=16, num_experts=6,
        num_experts_per_tok=2, head_dim=8),
    "olmoe": lambda: transformers.OlmoeConfig(
        **COMMON, intermediate_size=16, num_experts=5, num_experts_per_tok=2),
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **{**COMMON, "num_key_value_heads": 4}, intermediate_size=48, moe_intermediate_size=16,
        n_routed_experts=6, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=0, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
    # Transposed layout, biases, interleaved gate/up halves and its own _apply_gate.
    "gpt_oss": lambda: transformers.GptOssConfig(
        **COMMON, intermediate_size=16, num_local_experts=5, num_experts_per_tok=2, head_dim=8),
}


def tiny_model(family: str) -> nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        FAMILIES[family](), experts_implementation="eager").to(DEVICE)
    with torch.no_grad():  # biases and sinks start at zero: make them count
        for name, param in model.named_parameters():
            if name.endswith("bias") or name.endswith("sinks"):
                param.normal_(std=0.1)
    return model


def loss_and_grads(model: nn.Module, ids: torch.Tensor):
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def assert_close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_register_is_idempotent_and_runs_on_import():
    """Importing ``modekernels.hf`` registered the forward; registering again changes nothing in
    transformers' registry (no entry added, none replaced)."""
    assert ALL_EXPERTS_FUNCTIONS["modekernels"] is modekernels.hf.experts.modekernels_experts_forward
    before = dict(ALL_EXPERTS_FUNCTIONS)
    modekernels.hf.register()
    modekernels.hf.register()
    after = dict(ALL_EXPERTS_FUNCTIONS)
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_eager(backend, family):
    model = tiny_model(family)
    ids = torch.randint(0, 64, (2, 5), device=DEVICE)
    logits, grads = loss_and_grads(model, ids)
    model.set_experts_implementation("modekernels")
    assert model.config._experts_implementation == "modekernels"
    with modekernels.use_backend(backend):
        got_logits, got_grads = loss_and_grads(model, ids)
    assert_close(got_logits, logits)
    assert got_grads.keys() == grads.keys()
    for name in grads:
        assert_close(got_grads[name], grads[name])


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_matches_eager(backend, family):
    """Greedy decoding with the KV cache (a left-padded prompt batch, then one token per
    sequence per step, so most experts are empty) picks the same tokens as eager, with close
    scores."""
    model = tiny_model(family)
    ids = torch.randint(2, 64, (2, 6), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # the second prompt is two tokens shorter, padded on the left
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                  output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        want = model.generate(ids, **kwargs)
        model.set_experts_implementation("modekernels")
        with modekernels.use_backend(backend):
            got = model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for got_scores, want_scores in zip(got.scores, want.scores):
        assert_close(got_scores, want_scores)


@pytest.mark.parametrize("family, compile_backend", [
    ("mixtral", "inductor"), ("gpt_oss", "aot_eager"), ("qwen2_moe", "aot_eager"),
])
def test_compiled_training_step_matches_eager(family, compile_backend, reference_backend):
    """The whole model under torch.compile on the modekernels experts: no more graph breaks
    than with transformers' own grouped_mm experts (none with current transformers; the GPU
    image's 5.17 breaks in the model's own code, before any experts run), fullgraph wherever
    that has none, and the compiled logits and gradients equal eager's."""
    ids = torch.randint(0, 64, (2, 5), device=DEVICE)

    def graph_breaks(implementation: str) -> int:
        model = tiny_model(family)
        model.set_experts_implementation(implementation)
        torch._dynamo.reset()
        return torch._dynamo.explain(model)(ids, labels=ids).graph_break_count

    host_breaks = graph_breaks("grouped_mm")
    assert graph_breaks("modekernels") <= host_breaks
    model = tiny_model(family)
    model.set_experts_implementation("modekernels")
    logits, grads = loss_and_grads(model, ids)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=host_breaks == 0, backend=compile_backend)
    got_logits, got_grads = loss_and_grads(compiled, ids)
    got_grads = {name.removeprefix("_orig_mod."): grad for name, grad in got_grads.items()}
    torch.testing.assert_close(got_logits, logits, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(got_grads[name], grads[name], rtol=1e-4, atol=1e-5)


def test_from_pretrained_takes_the_implementation(tmp_path):
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, experts_implementation="modekernels").to(DEVICE)
    assert loaded.config._experts_implementation == "modekernels"
    ids = torch.randint(0, 64, (1, 6), device=DEVICE)
    with torch.no_grad():
        assert_close(loaded(ids).logits, model(ids).logits)


def _flag_experts(has_gate: bool, has_bias: bool, is_transposed: bool, act: str) -> nn.Module:
    """An experts module with the given flags; its own forward is never called (transformers'
    implementations read only the weights and flags)."""

    @use_experts_implementation(has_gate=has_gate, has_bias=has_bias, is_transposed=is_transposed)
    class FlagExperts(nn.Module):
        def __init__(self, config):
            super().__init__()
            E, H, inner = config.num_experts, config.hidden_size, config.intermediate_size
            n1 = 2 * inner if has_gate else inner
            prefix = "gate_up_proj" if has_gate else "up_proj"
            self.num_experts = E
            self.act_fn = ACT2FN[config.hidden_act]
            up, down = ((E, H, n1), (E, inner, H)) if is_transposed else ((E, n1, H), (E, H, inner))
            setattr(self, prefix, nn.Parameter(0.3 * torch.randn(up)))
            self.down_proj = nn.Parameter(0.3 * torch.randn(down))
            if has_bias:
                setattr(self, prefix + "_bias", nn.Parameter(torch.randn(E, n1)))
                self.down_proj_bias = nn.Parameter(torch.randn(E, H))

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("the eager forward is not under test")

    config = SimpleNamespace(num_experts=5, hidden_size=16, intermediate_size=12, hidden_act=act,
                             _experts_implementation="batched_mm")
    return FlagExperts(config).to(DEVICE)


def routing(T: int, E: int, k: int):
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(DEVICE)
    weights = torch.rand(T, k, device=DEVICE).requires_grad_()
    return idx, weights


def run_experts(module: nn.Module, implementation: str, x, idx, weights, backend: str | None = None):
    """Output and gradients of x, routing weights and parameters under an implementation."""
    module.config._experts_implementation = implementation
    x = x.detach().clone().requires_grad_()
    weights = weights.detach().clone().requires_grad_()
    with modekernels.use_backend(backend):
        y = module(x, idx, weights)
    leaves = [x, weights, *module.parameters()]
    grads = torch.autograd.grad(y, leaves, torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y),
                                allow_unused=True, materialize_grads=True)
    return [y.detach(), *grads]


def assert_same_results(got, want):
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)


FLAGS = [  # has_gate, has_bias, is_transposed, activation (fused: silu, gelu, relu)
    (True, False, False, "silu"),
    (True, True, True, "gelu"),
    (True, True, False, "gelu_pytorch_tanh"),
    (False, False, True, "relu"),
    (False, True, False, "gelu"),
    (False, False, False, "relu2"),
]


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "gate{}_bias{}_transposed{}_{}".format(*f))
@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_flags_match_batched_mm(backend, flags):
    module = _flag_experts(*flags)
    x = torch.randn(9, 16, device=DEVICE)
    idx, weights = routing(9, 5, 2)
    want = run_experts(module, "batched_mm", x, idx, weights)
    got = run_experts(module, "modekernels", x, idx, weights, backend)
    assert_same_results(got, want)


def _nemotron_experts():  # not gated, relu² (outside the kernels), (E, out, in) layout
    config = SimpleNamespace(n_routed_experts=4, hidden_size=16, moe_intermediate_size=12,
                             moe_latent_size=None, mlp_hidden_act="relu2",
                             _experts_implementation="eager")
    return NemotronHExperts(config)


def _muse_spark_experts():  # post-expert norm
    muse_spark = pytest.importorskip(
        "transformers.models.muse_spark.modeling_muse_spark",
        reason=f"transformers {transformers.__version__} has no muse_spark model family")
    config = SimpleNamespace(num_local_experts=4, moe_hidden_size=16, moe_intermediate_size=12,
                             hidden_act="silu", post_norm_eps=1e-6, _experts_implementation="eager")
    return muse_spark.MuseSparkExperts(config)


def _gpt_oss_experts():  # own _apply_gate, interleaved halves, transposed, biases
    config = SimpleNamespace(num_local_experts=4, hidden_size=16, intermediate_size=12,
                             swiglu_alpha=1.702, swiglu_limit=7.0, _experts_implementation="eager")
    return GptOssExperts(config)


def _mixtral_experts():
    config = SimpleNamespace(num_local_experts=4, hidden_size=16, intermediate_size=12,
                             hidden_act="silu", _experts_implementation="eager")
    return MixtralExperts(config)


MODULES = {"nemotron_h": _nemotron_experts, "muse_spark": _muse_spark_experts,
           "gpt_oss": _gpt_oss_experts, "mixtral": _mixtral_experts}


def initialised(factory) -> nn.Module:
    module = factory().to(DEVICE)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(std=0.3)
    return module


@pytest.mark.parametrize("family", MODULES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_module_matches_eager(backend, family):
    module = initialised(MODULES[family])
    x = torch.randn(7, 16, device=DEVICE)
    idx, weights = routing(7, 4, 2)
    want = run_experts(module, "eager", x, idx, weights)
    got = run_experts(module, "modekernels", x, idx, weights, backend)
    assert_same_results(got, want)


@pytest.mark.parametrize("family", MODULES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_module_under_autocast_matches_eager(backend, family):
    """float32 experts, bf16 hidden states under CPU autocast (a bf16 model's activations with
    float32 master weights): the same dtypes as the eager experts, values within bf16's
    tolerance, gradients in float32 (the post-expert-norm path runs grouped_mm on operands cast
    as the matmul it replaces)."""
    module = initialised(MODULES[family])
    x = torch.randn(7, 16, device=DEVICE).bfloat16()
    idx, weights = routing(7, 4, 2)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        want = run_experts(module, "eager", x, idx, weights)
        got = run_experts(module, "modekernels", x, idx, weights, backend)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.float(), w.float(), rtol=3e-2, atol=3e-2 * max(1.0, w.abs().max().item()))


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "muse_spark"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_parallel_sentinels_match_grouped_mm(backend, family):
    """Ids >= num_experts are tokens of other ranks, with zero routing weight: no output, no
    gradient, as transformers' grouped_mm (and batched_mm) give."""
    module = initialised(MODULES[family])
    # transformers without the flag treats ids >= num_experts as sentinels always, and its
    # batched_mm then leaks a routing-weight gradient into the sentinel slots.
    batched_mm_masks_sentinels = hasattr(module, "_is_expert_parallel")
    module._is_expert_parallel = True
    x = torch.randn(8, 16, device=DEVICE)
    idx, weights = routing(8, 4, 2)
    idx[1, 0], idx[4, 1], idx[6, 0] = 4, 4, 9
    with torch.no_grad():
        weights[idx >= 4] = 0
    got = run_experts(module, "modekernels", x, idx, weights, backend)
    batched = run_experts(module, "batched_mm", x, idx, weights)
    if not batched_mm_masks_sentinels:
        batched[2] = batched[2].masked_fill(idx >= 4, 0.0)
    assert_same_results(got, batched)
    assert_same_results(got, run_experts(module, "grouped_mm", x, idx, weights))
    assert torch.all(got[2][idx >= 4] == 0), "sentinel slots get no routing-weight gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_without_the_flag_take_out_of_range_ids_as_sentinels(backend):
    """transformers before ``_is_expert_parallel`` marks tokens of other ranks by ids >=
    num_experts alone: a module without the flag gives what a flagged one gives."""
    module = initialised(_mixtral_experts)
    vars(module).pop("_is_expert_parallel", None)
    x = torch.randn(6, 16, device=DEVICE)
    idx, weights = routing(6, 4, 2)
    idx[0, 1], idx[3, 0] = 4, 7
    with torch.no_grad():
        weights[idx >= 4] = 0
    unflagged = run_experts(module, "modekernels", x, idx, weights, backend)
    module._is_expert_parallel = True
    assert_same_results(unflagged, run_experts(module, "modekernels", x, idx, weights, backend))
