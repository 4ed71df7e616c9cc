"""ExpertParallelExperts over gloo: W CPU processes, each with its own tokens (data parallel) and
its slice of the experts, against the full single-process GroupedExperts / MoEMLP in float32
(and under bfloat16 autocast).

Each world is spawned once per module (spawning costs seconds) and runs every case; the workers
save their results and the reference, and the tests below compare them. Bad calls run in a world
of their own whose collectives time out quickly, so that a rank left waiting fails fast."""

from __future__ import annotations


import gloo_world
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from modekernels.nn import ExpertParallelExperts, GroupedExperts, MoEMLP

WORLD_TIMEOUT_S = 90  # the whole world, spawn included; a hang fails instead of blocking CI
COLLECTIVE_TIMEOUT_S = 10  # the bad calls' world: a rank left waiting in a collective raises
H, I = 7, 5  # odd sizes
FP32_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
BF16_TOLERANCE = {"rtol": 2e-2, "atol": 2e-2}

def _case(experts: int, tokens: list[int], k: int, empty: int, activation: str, **options) -> dict:
    """A case: E experts, each rank's token count, k, ``empty`` an expert no token picks,
    the experts' options, ``local_rank`` a rank whose tokens pick only its own experts,
    ``autocast`` to run forward under CPU bfloat16 autocast, and ``compiled`` to run the
    expert-parallel module under torch.compile(fullgraph=True)."""
    return {"experts": experts, "tokens": tokens, "k": k, "empty": empty,
            "activation": activation, "gated": False, "bias": True, **options}


CASES_2 = {
    "top1": _case(4, [5, 7], 1, empty=3, activation="gelu"),
    "top2_gated_mesh": _case(4, [6, 4], 2, empty=3, activation="silu", gated=True, bias=False,
                             mesh=True),
    "top2_local_only": _case(4, [6, 5], 2, empty=3, activation="relu", local_rank=0),
    "top1_local_only": _case(4, [5, 6], 1, empty=1, activation="gelu", local_rank=1),
    "zero_tokens_on_a_rank": _case(4, [0, 6], 1, empty=0, activation="gelu"),
    "top2_autocast_bf16": _case(4, [5, 4], 2, empty=2, activation="silu", gated=True,
                                autocast=True),
    "top2_compiled_fullgraph": _case(4, [6, 3], 2, empty=1, activation="silu", gated=True,
                                     compiled=True),
}
CASES_3 = {
    "top2_three_ranks": _case(6, [4, 5, 3], 2, empty=5, activation="silu", gated=True,
                              local_rank=0),
}


def _routing(spec: dict, rank_of_token: torch.Tensor, world: int) -> torch.Tensor:
    """Global expert_idx (T,) or (T, k): k distinct experts per token, never ``empty``, and only
    the local experts of ``local_rank`` for that rank's tokens."""
    experts, k = spec["experts"], spec["k"]
    scores = torch.rand(rank_of_token.shape[0], experts)
    scores[:, spec["empty"]] += 2  # ranked last: never among the first k
    if "local_rank" in spec:
        per_rank = experts // world
        owner = torch.arange(experts) // per_rank
        mine = rank_of_token == spec["local_rank"]
        scores[mine.unsqueeze(1) & (owner != spec["local_rank"])] += 4
    chosen = scores.argsort(1)[:, :k]
    return chosen[:, 0] if k == 1 else chosen


def _grads(module: torch.nn.Module) -> dict:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _experts_case(spec: dict, rank: int, world: int) -> dict:
    torch.manual_seed(1234)
    full = GroupedExperts(spec["experts"], H, I, activation=spec["activation"],
                          gated=spec["gated"], bias=spec["bias"])
    tokens = torch.tensor(spec["tokens"])
    rank_of_token = torch.repeat_interleave(torch.arange(world), tokens)
    expert_idx = _routing(spec, rank_of_token, world)
    gate_shape = expert_idx.shape
    x = torch.randn(rank_of_token.shape[0], H, requires_grad=True)
    gate = torch.rand(gate_shape, requires_grad=True)
    probe = torch.randn(rank_of_token.shape[0], H)

    group = init_device_mesh("cpu", (world,)) if spec.get("mesh") else None
    ep = ExpertParallelExperts(full, group)
    first = int(tokens[:rank].sum())
    rows = slice(first, first + int(tokens[rank]))
    x_mine = x.detach()[rows].clone().requires_grad_()
    gate_mine = gate.detach()[rows].clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=spec.get("autocast", False)):
        run = torch.compile(ep, fullgraph=True) if spec.get("compiled") else ep
        y_mine = run(x_mine, expert_idx[rows], gate_mine)
        y = full(x, expert_idx, gate)  # every rank's tokens, one process
    (y_mine * probe[rows]).sum().backward()
    (y * probe).sum().backward()
    local = slice(ep.first_expert, ep.first_expert + ep.num_local_experts)
    owner = expert_idx[rows] // ep.num_local_experts
    result = {
        "got": {"y": y_mine.detach(), "dx": x_mine.grad, "dgate": gate_mine.grad, **_grads(ep)},
        "want": {"y": y.detach()[rows], "dx": x.grad[rows], "dgate": gate.grad[rows],
                 **{n: g[local] for n, g in _grads(full).items()}},
        "slots_to_rank": torch.bincount(owner.reshape(-1), minlength=world),
    }
    if local.start <= spec["empty"] < local.stop:
        result["empty_expert_grad"] = ep.w1.grad[spec["empty"] - local.start]
    return result


def _moe_case(rank: int, world: int) -> dict:
    """MoEMLP with a learned router dropping tokens (capacity 0.5), its experts swapped for the
    expert-parallel ones: each rank routes its own tokens; the reference is the full MoEMLP on
    the same tokens, with the expert gradients summed over ranks."""
    torch.manual_seed(99)
    full = MoEMLP(H, I, 4, capacity_factor=0.5)
    ep = MoEMLP(H, I, 4, capacity_factor=0.5)
    ep.load_state_dict(full.state_dict())
    ep.experts = ExpertParallelExperts(full.experts)
    torch.manual_seed(100 + rank)  # each rank its own tokens
    x = torch.randn(3, 3, H, requires_grad=True)
    probe = torch.randn(3, 3, H)
    x_ep = x.detach().clone().requires_grad_()
    out = ep(x_ep)
    (out.output * probe).sum().backward()
    want = full(x)
    (want.output * probe).sum().backward()
    expert_grads = _grads(full.experts)
    for g in expert_grads.values():
        dist.all_reduce(g)
    local = slice(ep.experts.first_expert, ep.experts.first_expert + ep.experts.num_local_experts)
    dropped = full.router(x.detach().reshape(-1, H)).dropped.sum()
    return {
        "got": {"y": out.output.detach(), "dx": x_ep.grad, "router": ep.router.proj.weight.grad,
                **{f"experts.{n}": g for n, g in _grads(ep.experts).items()}},
        "want": {"y": want.output.detach(), "dx": x.grad, "router": full.router.proj.weight.grad,
                 **{f"experts.{n}": g[local] for n, g in expert_grads.items()}},
        "dropped": dropped,
    }


def _indivisible_case() -> str:
    try:
        ExpertParallelExperts(GroupedExperts(3, H, I))
    except ValueError as error:
        return str(error)
    return "no error"


def _message(call) -> str:
    """What ``call()`` raises, as "Type: message", or "no error"."""
    try:
        call()
    except Exception as error:  # a rank left waiting gets the collective's timeout instead
        return f"{type(error).__name__}: {error}"
    return "no error"


def _bad_calls_worker(rank: int, world: int, out_dir: str) -> None:
    """Calls that fail on one rank only: every rank must raise the same error, and the ranks stay
    in step for the good call after them."""
    gloo_world.join(rank, world, out_dir, timeout_s=COLLECTIVE_TIMEOUT_S)
    torch.manual_seed(5)
    ep = ExpertParallelExperts(GroupedExperts(4, H, I))
    x, gate = torch.randn(3, H), torch.rand(3, 2)
    valid = torch.tensor([[0, 1], [2, 3], [1, 2]])
    index_on_rank_1 = torch.tensor([0, 1, 4 if rank == 1 else 2])
    negative_on_rank_0 = torch.tensor([[0, 1], [2, -1 if rank == 0 else 3], [1, 2]])
    x_grad_on_rank_1 = x.clone().requires_grad_(rank == 1)
    results = {
        "index_too_large_on_rank_1": _message(lambda: ep(x, index_on_rank_1, gate[:, 0])),
        "negative_index_on_rank_0": _message(lambda: ep(x, negative_on_rank_0, gate)),
        "x_requires_grad_on_rank_1": _message(
            lambda: ep(x_grad_on_rank_1, valid, gate).sum().backward()),
        "good_call_after": _message(
            lambda: ep(x.clone().requires_grad_(), valid, gate).sum().backward()),
    }
    gloo_world.leave(results, rank, out_dir)


def _worker(rank: int, world: int, cases: dict, out_dir: str) -> None:
    gloo_world.join(rank, world, out_dir)
    results = {name: _experts_case(spec, rank, world) for name, spec in cases.items()}
    if world == 2:
        results["moe_mlp_capacity"] = _moe_case(rank, world)
        results["indivisible"] = _indivisible_case()
    gloo_world.leave(results, rank, out_dir)


def _run_world(world: int, cases: dict, out_dir) -> list[dict]:
    return gloo_world.run_world(_worker, (world, cases, str(out_dir)), world, out_dir, WORLD_TIMEOUT_S)


@pytest.fixture(scope="module")
def world_2(tmp_path_factory):
    return _run_world(2, CASES_2, tmp_path_factory.mktemp("ep2"))


@pytest.fixture(scope="module")
def world_3(tmp_path_factory):
    return _run_world(3, CASES_3, tmp_path_factory.mktemp("ep3"))


@pytest.fixture(scope="module")
def bad_calls_world(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ep_bad")
    return gloo_world.run_world(_bad_calls_worker, (2, str(out_dir)), 2, out_dir,
                                WORLD_TIMEOUT_S)


def _assert_matches(results: list[dict], case: str, tolerance: dict = FP32_TOLERANCE) -> None:
    for rank, result in enumerate(results):
        got, want = result[case]["got"], result[case]["want"]
        assert got.keys() == want.keys(), (rank, sorted(got), sorted(want))
        for name in want:
            torch.testing.assert_close(got[name], want[name], **tolerance,
                                       msg=lambda m, r=rank, n=name: f"rank {r}, {n}: {m}")


def _assert_empty_expert_has_no_grad(results: list[dict], case: str) -> None:
    """The one rank holding the expert no rank's token reaches gives it a zero gradient."""
    grads = [result[case]["empty_expert_grad"] for result in results
             if "empty_expert_grad" in result[case]]
    assert len(grads) == 1 and torch.count_nonzero(grads[0]) == 0, grads


@pytest.mark.parametrize("case", sorted(CASES_2))
def test_matches_full_experts_two_ranks(world_2, case):
    spec = CASES_2[case]
    _assert_matches(world_2, case, BF16_TOLERANCE if spec.get("autocast") else FP32_TOLERANCE)
    _assert_empty_expert_has_no_grad(world_2, case)
    if "local_rank" in spec:  # that rank sends nothing to the other rank
        sent = world_2[spec["local_rank"]][case]["slots_to_rank"]
        assert sent[1 - spec["local_rank"]] == 0 and sent.sum() > 0


def test_matches_full_experts_three_ranks(world_3):
    _assert_matches(world_3, "top2_three_ranks")
    _assert_empty_expert_has_no_grad(world_3, "top2_three_ranks")
    sent = world_3[0]["top2_three_ranks"]["slots_to_rank"]
    assert sent[1:].sum() == 0 and sent[0] > 0


def test_moe_mlp_with_dropped_tokens(world_2):
    _assert_matches(world_2, "moe_mlp_capacity")
    assert all(result["moe_mlp_capacity"]["dropped"] > 0 for result in world_2)


def test_experts_not_divisible_by_world_size(world_2):
    for result in world_2:
        message = result["indivisible"]
        assert "E = 3" in message and "divisible" in message and "W = 2" in message, message


@pytest.mark.parametrize("case, rank", [("index_too_large_on_rank_1", 1),
                                        ("negative_index_on_rank_0", 0)])
def test_bad_index_on_one_rank_raises_on_every_rank(bad_calls_world, case, rank):
    for result in bad_calls_world:
        message = result[case]
        assert message.startswith("ValueError: expert_idx must be in [0, 4)"), message
        assert f"rank(s) [{rank}]" in message, message


def test_requires_grad_differing_across_ranks_raises_on_every_rank(bad_calls_world):
    for result in bad_calls_world:
        message = result["x_requires_grad_on_rank_1"]
        assert message.startswith("ValueError: x.requires_grad") and "[1, 2]" in message, message


def test_ranks_stay_in_step_after_bad_calls(bad_calls_world):
    assert [result["good_call_after"] for result in bad_calls_world] == ["no error"] * 2
