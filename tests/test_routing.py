"""route_top1, sort_by_expert and hash_route against a float64 oracle written as plain loops.

The oracle (``_expected_routing``, ``_expected_sort``) restates the contract of
:mod:`modekernels.ops.routing` token by token, independently of the reference backend, so every
backend (the reference included) is checked against it.
"""

import math

import pytest
import torch
from conftest import DEVICE, backend_params
from hypothesis import given, settings
from hypothesis import strategies as st

import modekernels
from modekernels import backends
from modekernels.ops.routing import CUDA_MAX_EXPERTS, TRITON_MAX_EXPERTS, expert_capacity

BACKENDS = backend_params("reference", "triton", "cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GATE_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
# (T, E): zero and one token, one expert, non-powers of two, more experts than tokens.
SHAPES = [(0, 3), (1, 1), (1, 5), (37, 5), (64, 8), (100, 3), (6, 8)]
CAPACITY_FACTORS = [None, 1.0, 0.5]


def _triton():
    from modekernels.triton_kernels import routing

    return routing


def _cuda():
    from modekernels.cuda import routing

    return routing


def _expected_routing(logits: torch.Tensor, capacity: int) -> dict:
    """The contract, token by token, in float64."""
    x = logits.double().cpu()
    num_tokens, num_experts = x.shape
    rows = x.tolist()
    expert = [row.index(max(row)) for row in rows]  # first maximum
    kept_by_expert = [[] for _ in range(num_experts)]
    routed = [0] * num_experts
    dropped_tokens = []
    for t, e in enumerate(expert):
        routed[e] += 1
        (kept_by_expert[e] if routed[e] <= capacity else dropped_tokens).append(t)
    kept = [len(k) for k in kept_by_expert]
    probs = torch.softmax(x, dim=-1)
    dropped = torch.zeros(num_tokens, dtype=torch.bool)
    dropped[dropped_tokens] = True
    gate = torch.tensor([probs[t, e].item() for t, e in enumerate(expert)], dtype=torch.float64)
    gate[dropped] = 0.0
    denominator = max(num_tokens, 1)
    mean_prob = probs.sum(0) / denominator
    aux = num_experts * sum(routed[e] / denominator * mean_prob[e].item()
                            for e in range(num_experts))
    z = (torch.logsumexp(x, -1) ** 2).sum().item() / denominator
    return dict(
        expert_idx=torch.tensor(expert, dtype=torch.int64),
        gate=gate,
        perm=torch.tensor([t for k in kept_by_expert for t in k] + dropped_tokens,
                          dtype=torch.int64),
        offs=torch.tensor(kept, dtype=torch.int32).cumsum(0, dtype=torch.int32),
        tokens_per_expert=torch.tensor(kept, dtype=torch.int32),
        aux_loss=torch.tensor(aux, dtype=torch.float64),
        z_loss=torch.tensor(z, dtype=torch.float64),
        dropped=dropped,
    )


def _as_routing(outputs: tuple) -> tuple[modekernels.Routing, torch.Tensor, torch.Tensor]:
    """A backend's outputs as (Routing, lse, routed)."""
    gate, aux_loss, z_loss, lse, expert_idx, perm, offs, tokens, dropped, routed = outputs
    routing = modekernels.Routing(expert_idx, gate, perm, offs, tokens, aux_loss, z_loss, dropped)
    return routing, lse, routed


def _check_routing(routing: modekernels.Routing, logits: torch.Tensor, capacity: int) -> None:
    expected = _expected_routing(logits, capacity)
    assert isinstance(routing, modekernels.Routing)
    for name in ("expert_idx", "perm", "offs", "tokens_per_expert", "dropped"):
        actual = getattr(routing, name)
        assert actual.dtype == expected[name].dtype, name
        assert actual.device == logits.device, name
        torch.testing.assert_close(actual.cpu(), expected[name], rtol=0, atol=0, msg=name)
    assert routing.gate.dtype == logits.dtype
    tol = GATE_TOL[logits.dtype]
    torch.testing.assert_close(routing.gate.cpu().double(), expected["gate"], rtol=tol, atol=tol)
    for name in ("aux_loss", "z_loss"):
        actual = getattr(routing, name)
        assert actual.shape == () and actual.dtype == torch.float32, name
        torch.testing.assert_close(actual.cpu().double(), expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("capacity_factor", CAPACITY_FACTORS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_route_top1_matches_oracle(backend, dtype, shape, capacity_factor, poisoned):
    logits = torch.randn(shape, device=DEVICE).to(dtype)
    routing = modekernels.route_top1(logits, capacity_factor=capacity_factor, backend=backend)
    _check_routing(routing, logits, expert_capacity(*shape, capacity_factor))


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_top1_strided_logits(backend):
    logits = torch.randn(5, 45, device=DEVICE).t()[::2]  # (23, 5), strides (2, 45)
    routing = modekernels.route_top1(logits, capacity_factor=1.0, backend=backend)
    _check_routing(routing, logits, expert_capacity(23, 5, 1.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lowest_index(backend):
    logits = torch.randint(0, 3, (64, 5), device=DEVICE).float()  # many ties
    logits[0] = 1.0  # a row of equal logits picks expert 0
    routing = modekernels.route_top1(logits, backend=backend)
    assert torch.equal(routing.expert_idx, torch.argmax(logits, dim=-1))
    assert routing.expert_idx[0] == 0
    _check_routing(routing, logits, 64)


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tokens_on_one_expert(backend, capacity_factor):
    logits = torch.randn(40, 5, device=DEVICE)
    logits[:, 3] += 100.0
    routing = modekernels.route_top1(logits, capacity_factor=capacity_factor, backend=backend)
    capacity = expert_capacity(40, 5, capacity_factor)
    assert routing.tokens_per_expert.tolist() == [0, 0, 0, capacity, 0]
    assert routing.offs.tolist() == [0, 0, 0, capacity, capacity]
    assert routing.dropped.tolist() == [t >= capacity for t in range(40)]
    assert routing.perm.tolist() == list(range(40))
    _check_routing(routing, logits, capacity)


def test_expert_capacity():
    assert expert_capacity(100, 10, 1.1) == 11  # not 12 from 11.000000000000002
    assert expert_capacity(7, 3, 1.0) == 3
    assert expert_capacity(7, 3, None) == 7
    assert expert_capacity(1, 8, 0.01) == 1
    assert expert_capacity(7, 3, 1e19) == 7  # at most T (a larger one overflowed the cuda call)


# Row tiles of 8 (the smallest), several tiles per program and several scan steps, so that the
# prefixes across programs and tiles are exercised at interpreter sizes.
BLOCKINGS = [(8, 1, 1), (8, 2, 2), (16, 3, 1)]


@pytest.mark.parametrize("capacity_factor", [None, 0.7], ids=str)
@pytest.mark.parametrize("blocking", BLOCKINGS, ids=str)
@pytest.mark.parametrize("backend", backend_params("triton"))
def test_triton_route_across_programs(backend, blocking, capacity_factor):
    tk = _triton()
    num_tokens, num_experts = 75, 5
    block_t, tiles, chunk = blocking
    logits = torch.randn(num_tokens, num_experts, device=DEVICE)
    capacity = expert_capacity(num_tokens, num_experts, capacity_factor)
    routing, lse, routed = _as_routing(
        tk.route_top1(logits, capacity, tk.Blocking(block_t, 16, tiles, chunk)))
    _check_routing(routing, logits, capacity)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))
    assert routed.tolist() == torch.bincount(routing.expert_idx, minlength=num_experts).tolist()


# (T, E, rows per chunk): several chunks of odd lengths, experts beyond one warp's 32 lanes, the
# most experts the kernels take (one warp per block), and the default chunking.
CUDA_CHUNKINGS = [(75, 5, 7), (75, 5, 32), (300, 37, 100), (2000, 64, None), (70, 1000, 16),
                  (33, CUDA_MAX_EXPERTS, None)]


@pytest.mark.parametrize("capacity_factor", [None, 0.7], ids=str)
@pytest.mark.parametrize("chunking", CUDA_CHUNKINGS, ids=str)
@pytest.mark.parametrize("backend", backend_params("cuda"))
def test_cuda_route_across_chunks(backend, chunking, capacity_factor):
    num_tokens, num_experts, rows_per_chunk = chunking
    logits = torch.randn(num_tokens, num_experts, device=DEVICE)
    capacity = expert_capacity(num_tokens, num_experts, capacity_factor)
    routing, lse, routed = _as_routing(_cuda().route_top1(logits, capacity, rows_per_chunk))
    _check_routing(routing, logits, capacity)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))
    assert routed.tolist() == torch.bincount(routing.expert_idx, minlength=num_experts).tolist()


def _assert_same_choices(routing: modekernels.Routing, expected: modekernels.Routing) -> None:
    """Equal experts, perm, counts and drops, and equal gates with NaN where ``expected`` has NaN
    (for logits the float64 oracle cannot order: NaN, ±inf)."""
    for name in ("expert_idx", "perm", "offs", "tokens_per_expert", "dropped"):
        assert torch.equal(getattr(routing, name), getattr(expected, name)), name
    torch.testing.assert_close(routing.gate, expected.gate, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_pick_the_nan_like_argmax(backend):
    """A NaN counts above every number, +inf included, and the first NaN wins (torch.argmax's
    rule; Triton's argmax alone has none); the rest of the routing follows from that choice."""
    nan, inf = float("nan"), float("inf")
    logits = torch.randn(40, 37, device=DEVICE)
    logits[3, 20] = nan
    logits[5, 2] = logits[5, 30] = nan
    logits[7, 4], logits[7, 9] = inf, nan
    logits[8, 1], logits[8, 6] = nan, inf
    logits[9] = nan
    routing = modekernels.route_top1(logits, capacity_factor=1.0, backend=backend)
    assert torch.equal(routing.expert_idx, torch.argmax(logits, dim=-1))
    _assert_same_choices(
        routing, modekernels.route_top1(logits, capacity_factor=1.0, backend="reference"))


@pytest.mark.parametrize("backend", backend_params("triton", "cuda"))
def test_losses_are_deterministic(backend):
    logits = torch.randn(3000, 8, device=DEVICE) if DEVICE.type == "cuda" else torch.randn(
        100, 8, device=DEVICE)
    first = modekernels.route_top1(logits, capacity_factor=0.9, backend=backend)
    second = modekernels.route_top1(logits, capacity_factor=0.9, backend=backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _differentiable_oracle(logits: torch.Tensor, routing: modekernels.Routing):
    """gate, aux_loss and z_loss as float64 autograd expressions of a leaf copy of the logits."""
    x = logits.detach().double().requires_grad_()
    num_tokens, num_experts = x.shape
    probs = torch.softmax(x, -1)
    idx = routing.expert_idx.cpu()
    gate = probs.gather(1, idx[:, None].to(x.device))[:, 0] * (~routing.dropped)
    fraction = torch.bincount(idx, minlength=num_experts).double().to(x.device) / num_tokens
    aux = num_experts * (fraction * probs.mean(0)).sum()
    z = (torch.logsumexp(x, -1) ** 2).mean()
    return x, gate, aux, z


@pytest.mark.parametrize("capacity_factor", [None, 0.6], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_route_top1_gradients(backend, dtype, capacity_factor):
    num_tokens, num_experts = 53, 5
    logits = torch.randn(num_tokens, num_experts, device=DEVICE).to(dtype).requires_grad_()
    weight = torch.randn(num_tokens, device=DEVICE)
    routing = modekernels.route_top1(logits, capacity_factor=capacity_factor, backend=backend)
    loss = (routing.gate.float() * weight).sum() + 0.3 * routing.aux_loss + 0.7 * routing.z_loss
    loss.backward()
    x, gate, aux, z = _differentiable_oracle(logits, routing)
    ((gate * weight.double()).sum() + 0.3 * aux + 0.7 * z).backward()
    assert logits.grad.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(logits.grad.double(), x.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_tokens_get_no_gate_gradient(backend):
    logits = torch.randn(30, 3, device=DEVICE)
    logits[:, 1] += 10.0  # expert 1 overflows its capacity of 10
    logits.requires_grad_()
    routing = modekernels.route_top1(logits, capacity_factor=1.0, backend=backend)
    routing.gate.sum().backward()
    assert routing.dropped.sum() == 20
    assert torch.all(logits.grad[routing.dropped] == 0)
    assert torch.all(logits.grad[~routing.dropped].abs().sum(1) > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_loss_alone_has_a_gradient(backend):
    logits = torch.randn(20, 8, device=DEVICE, requires_grad=True)
    for pick in (lambda r: r.aux_loss, lambda r: r.z_loss):
        routing = modekernels.route_top1(logits, backend=backend)
        (grad,) = torch.autograd.grad(pick(routing), logits)
        x, _, aux, z = _differentiable_oracle(logits, routing)
        (expected,) = torch.autograd.grad(pick(routing._replace(aux_loss=aux, z_loss=z)), x)
        torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("blocking", BLOCKINGS[:2], ids=str)
@pytest.mark.parametrize("backend", backend_params("triton"))
def test_triton_backward_across_programs(backend, blocking):
    tk = _triton()
    from modekernels.reference import routing as ref

    logits = torch.randn(75, 5, device=DEVICE)
    routing, lse, routed = _as_routing(ref.route_top1(logits, 12))
    expert_idx, dropped = routing.expert_idx, routing.dropped
    grads = (torch.randn(75, device=DEVICE).expand(2, 75)[0],  # a strided gradient
             torch.tensor(0.3, device=DEVICE), torch.tensor(-0.7, device=DEVICE))
    args = (logits, lse, expert_idx, dropped, routed, *grads)
    block_t, tiles, chunk = blocking
    actual = tk.route_top1_backward(*args, tk.Blocking(block_t, 16, tiles, chunk))
    torch.testing.assert_close(actual, ref.route_top1_backward(*args), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(75, 5), (301, 37), (40, 1000)], ids=str)
@pytest.mark.parametrize("backend", backend_params("cuda"))
def test_cuda_backward_matches_reference(backend, shape):
    from modekernels.reference import routing as ref

    num_tokens, num_experts = shape
    logits = torch.randn(num_experts, num_tokens, device=DEVICE).t()  # column-major logits
    routing, lse, routed = _as_routing(ref.route_top1(logits, num_tokens // num_experts + 1))
    grads = (torch.randn(num_tokens, device=DEVICE).expand(2, num_tokens)[0],
             torch.tensor(0.3, device=DEVICE), torch.tensor(-0.7, device=DEVICE))
    args = (logits, lse, routing.expert_idx, routing.dropped, routed, *grads)
    actual = _cuda().route_top1_backward(*args)
    torch.testing.assert_close(actual, ref.route_top1_backward(*args), rtol=1e-5, atol=1e-7)


def _expected_sort(expert_idx: torch.Tensor, num_experts: int):
    flat = expert_idx.reshape(-1).tolist()
    perm = [slot for e in range(num_experts) for slot, v in enumerate(flat) if v == e]
    counts = [flat.count(e) for e in range(num_experts)]
    return torch.tensor(perm, dtype=torch.int64), torch.tensor(counts).cumsum(0).int()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("shape, num_experts", [
    ((0,), 3), ((1,), 1), ((37,), 5), ((100,), 8), ((6,), 8), ((1, 1), 1), ((40, 3), 3),
    ((25, 8), 8), ((13, 2), 5), ((0, 2), 3),
], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sort_by_expert_matches_oracle(backend, shape, num_experts, dtype, poisoned):
    expert_idx = torch.randint(0, num_experts, shape, device=DEVICE, dtype=dtype)
    perm, offs = modekernels.sort_by_expert(expert_idx, num_experts, backend=backend)
    expected_perm, expected_offs = _expected_sort(expert_idx.cpu(), num_experts)
    assert perm.dtype == torch.int64 and offs.dtype == torch.int32
    assert torch.equal(perm.cpu(), expected_perm)
    assert torch.equal(offs.cpu(), expected_offs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sort_by_expert_one_expert_holds_everything(backend):
    expert_idx = torch.full((30, 2), 4, device=DEVICE)
    perm, offs = modekernels.sort_by_expert(expert_idx, 7, backend=backend)
    assert perm.tolist() == list(range(60))
    assert offs.tolist() == [0, 0, 0, 0, 60, 60, 60]


@pytest.mark.parametrize("blocking", BLOCKINGS, ids=str)
@pytest.mark.parametrize("backend", backend_params("triton"))
def test_triton_sort_across_programs(backend, blocking):
    tk = _triton()
    expert_idx = torch.randint(0, 5, (30, 3), device=DEVICE)
    block_t, tiles, chunk = blocking
    perm, offs = tk.sort_by_expert(expert_idx, 5, tk.Blocking(block_t, 16, tiles, chunk))
    expected_perm, expected_offs = _expected_sort(expert_idx.cpu(), 5)
    assert torch.equal(perm.cpu(), expected_perm)
    assert torch.equal(offs.cpu(), expected_offs)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("chunking", [((30, 3), 5, 7), ((1000, 4), 64, 33), ((5000, 2), 300, None)],
                         ids=str)
@pytest.mark.parametrize("backend", backend_params("cuda"))
def test_cuda_sort_across_chunks(backend, chunking, dtype):
    shape, num_experts, rows_per_chunk = chunking
    expert_idx = torch.randint(0, num_experts, shape, device=DEVICE, dtype=dtype)
    perm, offs = _cuda().sort_by_expert(expert_idx, num_experts, rows_per_chunk)
    expected_perm, expected_offs = _expected_sort(expert_idx.cpu(), num_experts)
    assert torch.equal(perm.cpu(), expected_perm)
    assert torch.equal(offs.cpu(), expected_offs)


def _unchecked_kernel(backend: str, name: str, *args):
    """The triton or cuda kernel ``name`` called directly, past the op's host checks (as a GPU
    caller's values pass them), over several row programs of two tiles and a scan of several
    steps (triton) or chunks of 3 rows (cuda)."""
    if backend == "triton":
        tk = _triton()
        return getattr(tk, name)(*args, tk.Blocking(8, 16, 2, 2))
    return getattr(_cuda(), name)(*args, 3)


@pytest.mark.parametrize("backend", backend_params("triton", "cuda"))
def test_sort_puts_out_of_range_indices_last(backend):
    """Indices outside [0, E) (which the Python checks reject where they can see the values) are
    counted by no expert and go after all others in position order: perm stays a permutation,
    the same in both kernels."""
    expert_idx = torch.tensor([2, -1, 0, 7, 2, 1, 3, 0], device=DEVICE)
    perm, offs = _unchecked_kernel(backend, "sort_by_expert", expert_idx, 3)
    assert perm.tolist() == [2, 7, 5, 0, 4, 1, 3, 6]
    assert offs.tolist() == [2, 3, 5]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("backend", backend_params("triton", "cuda"))
def test_unchecked_out_of_range_indices_keep_perm_a_permutation(backend, dtype, poisoned):
    """Random (T, k) indices, two thirds of them outside [0, E): negative, past E among the
    triton tile's padding columns, past those, and the dtype's extremes, across programs and
    chunks."""
    from modekernels.reference import routing as ref

    num_experts = 5
    expert_idx = torch.randint(-num_experts, 2 * num_experts, (37, 2), dtype=dtype)
    info = torch.iinfo(dtype)
    expert_idx[:3] = torch.tensor([[info.min, -1], [num_experts, 15], [16, info.max]])
    perm, offs = _unchecked_kernel(backend, "sort_by_expert", expert_idx.to(DEVICE), num_experts)
    perm, offs = perm.cpu(), offs.cpu()
    flat = expert_idx.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    positions = torch.arange(flat.numel())
    expected_perm, expected_offs = ref.sort_by_expert(flat[valid], num_experts)
    num_valid = int(valid.sum())
    assert torch.equal(perm.sort().values, positions)
    assert offs[-1] == num_valid
    assert torch.equal(offs, expected_offs)
    assert torch.equal(perm[:num_valid], positions[valid][expected_perm])
    assert torch.equal(perm[num_valid:], positions[~valid])


@pytest.mark.parametrize("capacity", [0, 3])
@pytest.mark.parametrize("backend", backend_params("triton", "cuda"))
def test_kernels_route_infinite_rows_and_capacity_zero(backend, capacity):
    """What the op's host code never passes or cannot see: capacity 0 (every token dropped, gate
    0), a row of -inf (expert 0), rows holding +inf (their first +inf). Every output equals the
    reference's, lse and the losses included (an infinite row max is the row's logsumexp, as in
    torch.logsumexp), NaN where the reference has NaN."""
    from modekernels.reference import routing as ref

    inf = float("inf")
    logits = torch.randn(29, 6, device=DEVICE)
    logits[4] = -inf
    logits[7, 2] = logits[7, 5] = inf
    logits[11, 3] = inf
    routing, lse, routed = _as_routing(_unchecked_kernel(backend, "route_top1", logits, capacity))
    expected, expected_lse, expected_routed = _as_routing(ref.route_top1(logits, capacity))
    assert routing.expert_idx[[4, 7, 11]].tolist() == [0, 2, 3]
    _assert_same_choices(routing, expected)
    assert torch.equal(routed, expected_routed)
    assert lse[[4, 7, 11]].tolist() == [-inf, inf, inf]
    torch.testing.assert_close(lse, expected_lse, equal_nan=True)
    for name in ("aux_loss", "z_loss"):
        torch.testing.assert_close(getattr(routing, name), getattr(expected, name), equal_nan=True)
    if capacity == 0:
        assert torch.all(routing.dropped) and torch.all(routing.gate == 0)


@settings(max_examples=8, deadline=None)
@given(
    num_tokens=st.integers(0, 90),
    num_experts=st.integers(1, 9),
    capacity_factor=st.one_of(st.none(), st.floats(0.1, 2.0)),
    block_t=st.sampled_from([8, 16]),
    tiles=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_triton_route_property(num_tokens, num_experts, capacity_factor, block_t, tiles, seed):
    if backends.availability("triton", DEVICE):
        pytest.skip(backends.availability("triton", DEVICE))
    tk = _triton()
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=generator).to(DEVICE)
    capacity = expert_capacity(num_tokens, num_experts, capacity_factor)
    routing, _, _ = _as_routing(tk.route_top1(logits, capacity, tk.Blocking(block_t, 16, tiles, 2)))
    _check_routing(routing, logits, capacity)


def test_make_hash_table():
    table = modekernels.make_hash_table(1000, 7, seed=3)
    assert table.dtype == torch.int64 and table.shape == (1000,)
    counts = torch.bincount(table, minlength=7)
    assert counts.max() - counts.min() <= 1
    assert torch.equal(table, modekernels.make_hash_table(1000, 7, seed=3))
    assert not torch.equal(table, modekernels.make_hash_table(1000, 7, seed=4))
    assert not torch.equal(table[:100], torch.arange(100) % 7)  # shuffled, not plain round-robin
    free = modekernels.make_hash_table(1000, 7, seed=3, balanced=False)
    assert free.min() >= 0 and free.max() < 7
    assert not torch.equal(free, table)


@pytest.mark.parametrize("with_table", [True, False], ids=["table", "hash"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hash_route(backend, with_table):
    num_experts, vocab = 5, 50
    token_ids = torch.randint(0, vocab, (37,), device=DEVICE)
    table = modekernels.make_hash_table(vocab, num_experts).to(DEVICE) if with_table else None
    routing = modekernels.hash_route(token_ids, num_experts, table, backend=backend)
    if with_table:
        expected_idx = table[token_ids]
    else:
        expected_idx = (token_ids * 1_103_515_245 + 12_345) % (2**31 - 1) % num_experts
    assert torch.equal(routing.expert_idx, expected_idx)
    assert routing.expert_idx.dtype == torch.int64
    assert torch.equal(routing.gate, torch.ones(37, device=DEVICE))
    expected_perm, expected_offs = _expected_sort(expected_idx.cpu(), num_experts)
    assert torch.equal(routing.perm.cpu(), expected_perm)
    assert torch.equal(routing.offs.cpu(), expected_offs)
    assert routing.tokens_per_expert.tolist() == torch.bincount(
        expected_idx, minlength=num_experts).tolist()
    assert routing.tokens_per_expert.dtype == torch.int32
    assert routing.aux_loss.item() == 0 and routing.z_loss.item() == 0
    assert not routing.dropped.any()


def test_hash_route_same_token_same_expert():
    token_ids = torch.tensor([7, 3, 7, 7, 3, 9], device=DEVICE)
    expert_idx = modekernels.hash_route(token_ids, 4).expert_idx
    assert expert_idx[0] == expert_idx[2] == expert_idx[3] and expert_idx[1] == expert_idx[4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_route_top1(backend):
    for capacity_factor in (None, 0.5):
        logits = torch.randn(19, 5, device=DEVICE, requires_grad=True)
        torch.library.opcheck(torch.ops.modekernels.route_top1.default,
                              (logits, capacity_factor, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_route_top1_backward(backend):
    logits = torch.randn(19, 5, device=DEVICE)
    routing, lse, routed = _as_routing(torch.ops.modekernels.route_top1(logits, 0.5, "reference"))
    grads = (torch.randn(19, device=DEVICE), torch.tensor(0.5, device=DEVICE),
             torch.tensor(2.0, device=DEVICE))
    args = (logits, lse, routing.expert_idx, routing.dropped, routed, *grads, backend)
    torch.library.opcheck(torch.ops.modekernels.route_top1_backward.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_sort_by_expert(backend):
    for shape in ((23,), (11, 3)):
        expert_idx = torch.randint(0, 5, shape, device=DEVICE)
        torch.library.opcheck(torch.ops.modekernels.sort_by_expert.default,
                              (expert_idx, 5, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    def route(logits, token_ids, top2):
        routing = modekernels.route_top1(logits, capacity_factor=0.75, backend=backend)
        hashed = modekernels.hash_route(token_ids, 5, backend=backend)
        loss = routing.gate.sum() + routing.aux_loss + routing.z_loss
        return routing, hashed, modekernels.sort_by_expert(top2, 5, backend=backend), loss

    logits = torch.randn(29, 5, device=DEVICE)
    token_ids = torch.randint(0, 100, (29,), device=DEVICE)
    top2 = torch.topk(logits, 2, dim=-1).indices
    eager = route(logits, token_ids, top2)
    compiled = torch.compile(route, fullgraph=True, backend="aot_eager")(logits, token_ids, top2)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)

    grad_logits = logits.clone().requires_grad_()
    (eager_grad,) = torch.autograd.grad(route(grad_logits, token_ids, top2)[-1], grad_logits)
    compiled_fn = torch.compile(route, fullgraph=True, backend="aot_eager")
    (compiled_grad,) = torch.autograd.grad(compiled_fn(grad_logits, token_ids, top2)[-1],
                                           grad_logits)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=0, atol=0)


@pytest.mark.parametrize("logits, error, match", [
    (torch.randn(8), ValueError, "logits must have 2 dimensions"),
    (torch.randn(8, 3, dtype=torch.float64), TypeError, "logits must have dtype"),
    (torch.randint(0, 3, (8, 3)), TypeError, "logits must have dtype"),
    (torch.randn(8, 0), ValueError, "at least one expert"),
    ("logits", TypeError, "logits must be a torch.Tensor"),
    (torch.randn(8, 3, 1), ValueError, "logits must have 2 dimensions"),
], ids=["rank", "float64", "int", "no-experts", "not-a-tensor", "rank-3"])
def test_route_top1_rejects_bad_logits(logits, error, match):
    if isinstance(logits, torch.Tensor):
        logits = logits.to(DEVICE)
    with pytest.raises(error, match=match):
        modekernels.route_top1(logits)


@pytest.mark.parametrize("capacity_factor", [0.0, -1.0, math.inf, math.nan, "1", True], ids=str)
def test_route_top1_rejects_bad_capacity_factor(capacity_factor):
    with pytest.raises((ValueError, TypeError), match="capacity_factor"):
        modekernels.route_top1(torch.randn(8, 3, device=DEVICE), capacity_factor=capacity_factor)


@pytest.mark.parametrize("expert_idx, num_experts, error, match", [
    (torch.tensor([0, 3, 1]), 3, ValueError, r"expert_idx must lie in \[0, 3\)"),
    (torch.tensor([0, -1, 1]), 3, ValueError, r"expert_idx must lie in \[0, 3\)"),
    (torch.tensor([0.0, 1.0]), 3, TypeError, "expert_idx must have dtype"),
    (torch.zeros(2, 2, 2, dtype=torch.int64), 3, ValueError, r"\(T,\) or \(T, k\)"),
    (torch.zeros(4, 4, dtype=torch.int64), 3, ValueError, "k must be at most num_experts"),
    (torch.zeros(4, dtype=torch.int64), 0, ValueError, "num_experts must be a positive int"),
    ([0, 1], 3, TypeError, "expert_idx must be a torch.Tensor"),
    (torch.tensor([0, 1], dtype=torch.int16), 3, TypeError, "expert_idx must have dtype"),
    (torch.tensor(1), 3, ValueError, r"expert_idx must be \(T,\) or \(T, k\)"),
    (torch.zeros(4, dtype=torch.int64), 3.0, ValueError, "num_experts must be a positive int"),
    (torch.zeros(4, dtype=torch.int64), True, ValueError, "num_experts must be a positive int"),
], ids=["too-high", "negative", "float", "rank-3", "k-above-E", "no-experts", "list", "int16",
        "rank-0", "float-E", "bool-E"])
def test_sort_by_expert_rejects_bad_input(expert_idx, num_experts, error, match):
    if isinstance(expert_idx, torch.Tensor):
        expert_idx = expert_idx.to(DEVICE)
    with pytest.raises(error, match=match):
        modekernels.sort_by_expert(expert_idx, num_experts, backend="reference")


def test_more_entries_than_int32_offsets_count_are_refused():
    """2³¹ routed entries (expanded views: no memory) exceed what the int32 offsets count."""
    with pytest.raises(ValueError, match="logits holds 2147483648 entries"):
        modekernels.route_top1(torch.zeros(1, 2, device=DEVICE).expand(2**31, 2))
    with pytest.raises(ValueError, match="expert_idx holds 2147483648 entries"):
        modekernels.sort_by_expert(
            torch.zeros(1, 1, dtype=torch.int64, device=DEVICE).expand(2**30, 2), 3)


def test_hash_route_rejects_bad_input():
    table = modekernels.make_hash_table(10, 4)
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, 10\)"):
        modekernels.hash_route(torch.tensor([3, 10]), 4, table)
    with pytest.raises(ValueError, match=r"table must lie in \[0, 3\)"):
        modekernels.hash_route(torch.tensor([3, 9]), 3, table)
    with pytest.raises(TypeError, match="table must have dtype"):
        modekernels.hash_route(torch.tensor([3]), 4, table.float())
    with pytest.raises(ValueError, match="token_ids must have 1 dimensions"):
        modekernels.hash_route(torch.tensor([[3]]), 4, table)
    with pytest.raises(ValueError, match="token_ids must lie in"):
        modekernels.hash_route(torch.tensor([-1]), 4)
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        modekernels.make_hash_table(0, 4)
    with pytest.raises(TypeError, match="token_ids must be a torch.Tensor"):
        modekernels.hash_route([3, 9], 4)
    with pytest.raises(TypeError, match="token_ids must have dtype"):
        modekernels.hash_route(torch.tensor([3.0, 9.0]), 4)
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, 2147483647\)"):
        modekernels.hash_route(torch.tensor([2**40]), 4)
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        modekernels.hash_route(torch.tensor([3, 9]), 0)
    with pytest.raises(TypeError, match="table must be a torch.Tensor"):
        modekernels.hash_route(torch.tensor([3, 9]), 4, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="table must have 1 dimensions"):
        modekernels.hash_route(torch.tensor([3, 9]), 4, torch.zeros(10, 1, dtype=torch.int64))


@pytest.mark.parametrize("backend, limit", [
    pytest.param(*p.values, TRITON_MAX_EXPERTS, marks=p.marks, id=p.id)
    for p in backend_params("triton")
] + [
    pytest.param(*p.values, CUDA_MAX_EXPERTS, marks=p.marks, id=p.id)
    for p in backend_params("cuda")
])
def test_backend_declines_too_many_experts(backend, limit):
    logits = torch.randn(4, limit + 1, device=DEVICE)
    with pytest.raises(backends.BackendUnavailable, match=f"at most {limit} experts"):
        modekernels.route_top1(logits, backend=backend)
    with pytest.raises(backends.BackendUnavailable, match=f"at most {limit} experts"):
        modekernels.sort_by_expert(torch.zeros(4, dtype=torch.int64, device=DEVICE),
                                   limit + 1, backend=backend)


def _route_and_loss(logits, capacity_factor):
    routing = modekernels.route_top1(logits, capacity_factor=capacity_factor)
    return routing, routing.gate.sum() + routing.aux_loss + routing.z_loss


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic-dynamic", "dynamic"])
def test_compile_takes_a_capacity_factor_that_varies(dynamic):
    """A capacity factor that changes between calls (dynamo then traces it as a SymFloat), and
    dynamic shapes from the start: one full graph, equal to eager, forward and gradient; a bad
    factor is still refused, by the op when it runs."""
    compiled = torch.compile(_route_and_loss, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for num_tokens, capacity_factor in ((20, 1.0), (20, 0.5), (13, 0.75)):
        logits = torch.randn(num_tokens, 4, device=DEVICE)
        leaves = [logits.clone().requires_grad_() for _ in range(2)]
        got, want = compiled(leaves[0], capacity_factor), _route_and_loss(leaves[1], capacity_factor)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        grads = [torch.autograd.grad(out[1], leaf)[0] for out, leaf in zip((got, want), leaves)]
        torch.testing.assert_close(*grads, rtol=0, atol=0)
    # refused while tracing (torch 2.11 wraps the fake kernel's error) or by the op as it runs
    with pytest.raises((ValueError, RuntimeError),
                       match="capacity_factor must be a positive finite number"):
        compiled(logits, -1.0)
