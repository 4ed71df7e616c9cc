"""``experts_implementation="modekernels"`` under transformers' own expert parallelism: tiny
Mixtral and Qwen3-MoE models, saved and loaded with ``from_pretrained(distributed_config=...)`` on
2 gloo CPU processes, against the same checkpoint in one process with ``"eager"``: logits, loss
and every parameter gradient, on the reference and Triton backends.

transformers 5.2x (``DistributedConfig(tp_size=2, ep_size=2, ep_implementation=...)``) shards the
experts by expert (``grouped_gemm``: each rank's module keeps ``num_experts // 2`` experts and is
flagged ``_is_expert_parallel``) and reaches them through an ``EPImplementation``:
``"all_reduce"`` runs each rank's experts on the shared batch with the routes to the other rank's
experts set to the sentinel id ``num_local_experts`` (weight 0) and all-reduces the outputs;
``"all_to_all"`` sends each (token, expert) pair to its owner, so the experts see local ids only.
transformers 5.17 (``DistributedConfig(tp_size=2, enable_expert_parallel=True)``) shards the same
way, and its ``ep_router`` style writes the same sentinel, without the flag.

One world is spawned per module (spawning costs seconds) and runs every case; the workers save
their results and the tests below compare them with the single-process eager model."""

from __future__ import annotations

import gloo_world
import pytest
import torch
import transformers
from conftest import backend_params
from test_hf_experts import FAMILIES

WORLD = 2
WORLD_TIMEOUT_S = 150  # the whole world, spawn included; a hang fails instead of blocking CI
MODELS = ("mixtral", "qwen3_moe")
BACKENDS = [p.values[0] for p in backend_params("reference", "triton") if not p.marks]
HAS_EP_SIZE = "ep_size" in transformers.DistributedConfig.__dataclass_fields__
# How the experts get their tokens, and whether the routes to the other rank's experts reach
# them as sentinel ids (>= the local expert count).
MODES = {"all_reduce": True, "all_to_all": False} if HAS_EP_SIZE else {"ep_router": True}


def _distributed_config(mode: str) -> transformers.DistributedConfig:
    if HAS_EP_SIZE:
        return transformers.DistributedConfig(tp_size=WORLD, ep_size=WORLD, ep_implementation=mode)
    return transformers.DistributedConfig(tp_size=WORLD, enable_expert_parallel=True)


def _spy_on_the_experts(log: dict) -> None:
    """Re-register ``"modekernels"`` (in this worker process only) so that it also records what
    transformers hands it: the calls, the local expert counts and whether sentinel ids came."""
    from transformers.integrations.moe import ExpertsInterface

    from modekernels.hf.experts import modekernels_experts_forward

    def spy(self, hidden_states, top_k_index, top_k_weights):
        log["calls"] += 1
        log["num_experts"].add(self.num_experts)
        log["sentinels"] += int((top_k_index >= self.num_experts).sum())
        return modekernels_experts_forward(self, hidden_states, top_k_index, top_k_weights)

    ExpertsInterface.register("modekernels", spy)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A gradient as one plain tensor (a collective for DTensors: every rank calls it in the
    same order)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _run_case(path: str, mode: str, backend: str, ids: torch.Tensor) -> dict:
    import modekernels

    log = {"calls": 0, "num_experts": set(), "sentinels": 0}
    _spy_on_the_experts(log)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, distributed_config=_distributed_config(mode), experts_implementation="modekernels")
    experts = model.model.layers[0].mlp.experts
    with modekernels.use_backend(backend):
        with torch.no_grad():
            logits = model(ids).logits
        out = model(ids, labels=ids)
        out.loss.backward()
    return {
        "logits": logits, "train_logits": out.logits.detach(), "loss": out.loss.detach(),
        "grads": {n: _full(p.grad) for n, p in model.named_parameters() if p.grad is not None},
        "sharded": type(experts.down_proj).__name__ == "DTensor",
        "implementation": model.config._experts_implementation, **log,
    }


def _worker(rank: int, paths: dict, ids: torch.Tensor, out_dir: str) -> None:
    gloo_world.join(rank, WORLD, out_dir)
    results = {(family, mode, backend): _run_case(path, mode, backend, ids)
               for family, path in paths.items() for mode in MODES for backend in BACKENDS}
    gloo_world.leave(results, rank, out_dir)


def _eager(path: str, ids: torch.Tensor) -> dict:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager")
    out = model(ids, labels=ids)
    out.loss.backward()
    return {"logits": out.logits.detach(), "loss": out.loss.detach(),
            "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            "num_experts": model.model.layers[0].mlp.experts.num_experts}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(the workers' results by rank, the eager results by family)."""
    root = tmp_path_factory.mktemp("hf_ep")
    paths = {}
    for family in MODELS:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]())
        paths[family] = str(root / family)
        model.save_pretrained(paths[family])
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    ranks = gloo_world.run_world(_worker, (paths, ids, str(root)), WORLD, root, WORLD_TIMEOUT_S)
    return ranks, {family: _eager(path, ids) for family, path in paths.items()}


def assert_close(got, want, what):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", MODELS)
def test_expert_parallel_matches_eager(world, family, mode, backend):
    ranks, eager = world
    want = eager[family]
    for rank, results in enumerate(ranks):
        got = results[family, mode, backend]
        where = f"rank {rank}"
        # the experts really are split, and run on modekernels
        assert got["sharded"] and got["implementation"] == "modekernels", where
        assert got["calls"] > 0 and got["num_experts"] == {want["num_experts"] // WORLD}, where
        # the routes to the other rank's experts reach them as sentinels exactly when expected
        assert (got["sentinels"] > 0) == MODES[mode], (where, got["sentinels"])
        assert_close(got["logits"], want["logits"], f"{where}, logits without gradients")
        assert_close(got["train_logits"], want["logits"], f"{where}, logits")
        assert_close(got["loss"], want["loss"], f"{where}, loss")
        assert got["grads"].keys() == want["grads"].keys(), where
        for name, grad in want["grads"].items():
            assert_close(got["grads"][name], grad, f"{where}, gradient of {name}")
