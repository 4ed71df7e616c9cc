"""Tests of ``modekernels.moe_mlp`` and its two stage ops on every backend against the float64
token-by-token oracle: forward, gradients, rows past offs[-1], determinism, ``opcheck``,
``torch.compile``, a hypothesis property test, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, backend_params, poisoned_allocations
from copy_recorder import CopiesOf
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import modekernels
from modekernels import backends
from modekernels.ops import moe_mlp as ops
from modekernels.reference import moe_mlp as reference

BACKENDS = backend_params("reference", "triton", "cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


class Case:
    """A moe_mlp problem. ``route``: "random" (k distinct experts per token), "one" (every
    token on expert E - 1), "sparse" (experts 0 and 2 only, so others are empty), "any" (drawn
    with replacement: a token may pick one expert twice, experts may stay empty)."""

    def __init__(self, name, T, H, I, E, k, activation, gated, bias, route="random"):
        self.name, self.T, self.H, self.I, self.E, self.k = name, T, H, I, E, k
        self.activation, self.gated, self.bias, self.route = activation, gated, bias, route

    def __repr__(self) -> str:
        return self.name


CASES = [
    Case("glu_silu_k2_E5_bias", 13, 16, 12, 5, 2, "silu", True, True),
    Case("gelu_k1_E3_single_token", 1, 8, 20, 3, 1, "gelu", False, False),
    Case("relu_k3_E6_empty_experts", 11, 24, 8, 6, 3, "relu", False, True),
    Case("glu_gelu_k1_all_on_one_expert", 40, 16, 16, 3, 1, "gelu", True, True, "one"),
    Case("glu_relu_k1_E7_sparse", 9, 8, 40, 7, 1, "relu", True, False, "sparse"),
    Case("glu_silu_k8_E8", 5, 8, 8, 8, 8, "silu", True, True),
    Case("zero_tokens", 0, 8, 8, 4, 2, "silu", True, True),
]


def make_inputs(case: Case, dtype: torch.dtype, linear_layout: bool = True):
    """(x, expert_idx, gate, w1, w2, b1, b2); with ``linear_layout`` w1 and w2 are transposed
    views of (E, N, K) tensors (the nn.Linear layout)."""
    T, H, I, E, k = case.T, case.H, case.I, case.E, case.k
    n1 = 2 * I if case.gated else I
    if case.route == "one":
        idx = torch.full((T, k), E - 1)
    elif case.route == "sparse":
        idx = torch.randint(0, 2, (T, k)) * 2
    elif case.route == "any":
        idx = torch.randint(0, E, (T, k))
    else:
        idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    idx = idx.long().to(DEVICE)
    if k == 1:
        idx = idx[:, 0]
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    gate = torch.rand(idx.shape, device=DEVICE).to(dtype)

    def weight(e, rows, cols):
        scale = 1 / math.sqrt(rows)
        if linear_layout:
            return (scale * torch.randn(e, cols, rows, device=DEVICE)).to(dtype).transpose(1, 2)
        return (scale * torch.randn(e, rows, cols, device=DEVICE)).to(dtype)

    w1, w2 = weight(E, H, n1), weight(E, I, H)
    b1 = torch.randn(E, n1, device=DEVICE).to(dtype) if case.bias else None
    b2 = torch.randn(E, H, device=DEVICE).to(dtype) if case.bias else None
    return x, idx, gate, w1, w2, b1, b2


def oracle(case: Case, x, idx, gate, w1, w2, b1, b2):
    def wide(t):
        return None if t is None else t.double()

    return reference.moe_mlp(wide(x), idx, wide(gate), wide(w1), wide(w2), activation=case.activation,
                             gated=case.gated, b1=wide(b1), b2=wide(b2))


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, case: Case, scale: float = 1.0):
    tol = scale * TOLERANCE[actual.dtype]
    reduction = max(case.H, case.I) * case.k
    magnitude = max(1.0, expected.abs().amax().item() / 4) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=tol,
                               atol=tol * math.sqrt(reduction) * magnitude)


def run(case: Case, inputs, backend):
    x, idx, gate, w1, w2, b1, b2 = inputs
    return modekernels.moe_mlp(x, idx, gate, w1, w2, activation=case.activation, gated=case.gated,
                               b1=b1, b2=b2, backend=backend)


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_float64_oracle(backend, dtype, case):
    inputs = make_inputs(case, dtype, linear_layout=dtype != torch.float16)
    with poisoned_allocations():
        y = run(case, inputs, backend)
    assert y.shape == (case.T, case.H) and y.dtype == dtype
    assert_matches(y, oracle(case, *inputs), case)


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_float64_oracle(backend, dtype, case):
    inputs = make_inputs(case, dtype, linear_layout=case.k != 3)
    x, idx, gate, w1, w2, b1, b2 = inputs
    leaves = [t for t in (x, gate, w1, w2, b1, b2) if t is not None]
    for t in leaves:
        t.requires_grad_()
    wide = [t.detach().double().requires_grad_() for t in leaves]
    y = run(case, inputs, backend)
    dy = torch.randn_like(y)
    with poisoned_allocations():
        grads = torch.autograd.grad(y, leaves, dy, allow_unused=True, materialize_grads=True)
    wide_inputs = iter(wide)
    full = [next(wide_inputs) if t is not None else None for t in (x, gate, w1, w2, b1, b2)]
    expected_y = oracle(case, full[0], idx, *full[1:])
    if expected_y.requires_grad:
        expected = torch.autograd.grad(expected_y, wide, dy.double(), materialize_grads=True)
    else:  # no tokens
        expected = [torch.zeros_like(t) for t in wide]
    for got, want in zip(grads, expected):
        assert got.shape == want.shape
        assert_matches(got, want, case, scale=4.0)


def token_loop_oracle(case: Case, x, idx, gate, w1, w2, b1, b2) -> torch.Tensor:
    """y_t = Σ_j gate_tj·(h_tj @ w2[e] + b2[e]) one token and one choice at a time, in the
    inputs' dtype (float64 in the tests): an oracle independent of any sort or grouped GEMM."""
    act = getattr(F, case.activation)  # F.gelu is the exact erf GELU
    idx, gate = idx.reshape(case.T, case.k), gate.reshape(case.T, case.k)
    rows = []
    for t in range(case.T):
        y_t = x.new_zeros(case.H)
        for j in range(case.k):
            e = int(idx[t, j])
            pre = x[t] @ w1[e] + (0 if b1 is None else b1[e])
            h = act(pre[: case.I]) * pre[case.I:] if case.gated else act(pre)
            y_t = y_t + gate[t, j] * (h @ w2[e] + (0 if b2 is None else b2[e]))
        rows.append(y_t)
    return torch.stack(rows) if rows else x.new_zeros(0, case.H)


@st.composite
def moe_cases(draw) -> Case:
    """Small interpreter-sized problems: zero, one or an odd number of tokens, E not a power of
    two, odd H and I, every activation, gated or not, with or without biases, and routings that
    leave experts empty, repeat an expert within a token or put every token on one expert."""
    E = draw(st.integers(1, 6))
    k = draw(st.integers(1, min(E, 3)))
    T = draw(st.sampled_from([0, 1, 2, 5, 7, 9, 12, 16, 19]))
    H, I = draw(st.integers(1, 21)), draw(st.integers(1, 21))
    activation = draw(st.sampled_from(["silu", "gelu", "relu"]))
    gated, bias = draw(st.booleans()), draw(st.booleans())
    route = draw(st.sampled_from(["random", "any", "one"]))
    name = f"T{T}_H{H}_I{I}_E{E}_k{k}_{activation}_gated{gated}_bias{bias}_{route}"
    return Case(name, T, H, I, E, k, activation, gated, bias, route)


def _relayout(w: torch.Tensor, linear: bool) -> torch.Tensor:
    """w (E, K, N) with the same values, contiguous or as a transposed view of (E, N, K)."""
    return w.transpose(1, 2).contiguous().transpose(1, 2) if linear else w.contiguous()


@pytest.mark.parametrize("backend", backend_params("reference", "triton", "cuda"))
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=moe_cases(), linear=st.tuples(st.booleans(), st.booleans()),
       index_dtype=st.sampled_from([torch.int64, torch.int32]), seed=st.integers(0, 2**31 - 1))
@example(case=Case("one_token_k3_on_one_expert", 1, 7, 5, 5, 3, "gelu", True, True, "one"),
         linear=(True, False), index_dtype=torch.int32, seed=1)
@example(case=Case("odd_tokens_one_expert_E6", 11, 13, 9, 6, 1, "relu", False, True, "one"),
         linear=(False, True), index_dtype=torch.int64, seed=2)
def test_property_matches_token_loop_oracle(backend, case, linear, index_dtype, seed):
    """Forward and the gradients of x, gate, w1, w2, b1, b2 in float32 against the float64
    token loop, with every allocation of the op poisoned."""
    torch.manual_seed(seed)
    x, idx, gate, w1, w2, b1, b2 = make_inputs(case, torch.float32, linear_layout=False)
    w1, w2, idx = _relayout(w1, linear[0]), _relayout(w2, linear[1]), idx.to(index_dtype)
    leaves = [t.requires_grad_() for t in (x, gate, w1, w2, b1, b2) if t is not None]
    dy = torch.randn(case.T, case.H, device=DEVICE)
    with poisoned_allocations():
        y = run(case, (x, idx, gate, w1, w2, b1, b2), backend)
        grads = torch.autograd.grad(y, leaves, dy, allow_unused=True, materialize_grads=True)
    wide = iter([t.detach().double().requires_grad_() for t in leaves])
    full = [None if t is None else next(wide) for t in (x, gate, w1, w2, b1, b2)]
    wide_leaves = [t for t in full if t is not None]
    expected_y = token_loop_oracle(case, full[0], idx, *full[1:])
    assert y.shape == (case.T, case.H) and y.dtype == torch.float32
    assert_matches(y, expected_y, case)
    if case.T:
        expected = torch.autograd.grad(expected_y, wide_leaves, dy.double(), allow_unused=True,
                                       materialize_grads=True)
    else:
        expected = [torch.zeros_like(t) for t in wide_leaves]
    for got, want in zip(grads, expected):
        assert got.shape == want.shape
        assert_matches(got, want, case, scale=4.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_rows_past_offs_contribute_nothing(backend):
    """Sorted rows at or past offs[-1] (capacity drops, expert-parallel sentinels) give zero
    hidden rows, zero output and zero gradient."""
    case = Case("tail", 10, 16, 12, 4, 2, "silu", True, True)
    x, idx, gate, w1, w2, b1, b2 = make_inputs(case, torch.float32)
    x.requires_grad_()
    gate.requires_grad_()
    idx = idx.clone()
    idx[3:6, 1] = case.E  # three slots owned by no expert here
    perm, offs = modekernels.sort_by_expert(idx, case.E + 1)
    offs = offs[: case.E]
    with poisoned_allocations():
        h = ops.moe_mlp_up(x, perm, offs, w1, b1, activation="silu", gated=True, top_k=2, backend=backend)
        y = ops.moe_mlp_down(h, perm, offs, w2, gate, b2, backend=backend)
    assert torch.all(h[int(offs[-1]):] == 0)
    kept_gate = gate.detach().clone()
    kept_gate[3:6, 1] = 0
    expected = oracle(case, x, idx.clamp(max=case.E - 1), kept_gate, w1, w2, b1, b2)
    assert_matches(y, expected, case)
    y.backward(torch.randn_like(y))
    assert torch.all(gate.grad[3:6, 1] == 0)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_layout_weights_get_gradients_without_copies(backend, bias):
    """w1 and w2 stored in the nn.Linear layout (E, N, K) and passed as their transposed views:
    the forward and the whole backward, accumulating .grad included, copy neither weight nor
    any tensor of a weight's size (each dW is written in its weight's layout), and the leaves'
    gradients come in their layout with the oracle's values. float32, where the reference
    upcasts nothing; no other tensor here has a weight's size."""
    case = Case("glu_silu_k2_E5", 13, 16, 12, 5, 2, "silu", True, bias)
    x, idx, gate, w1, w2, b1, b2 = make_inputs(case, torch.float32)
    w1_leaf, w2_leaf = (w.transpose(1, 2).requires_grad_() for w in (w1, w2))
    leaves = [t for t in (x, gate, w1_leaf, w2_leaf, b1, b2) if t is not None]
    for t in leaves:
        t.requires_grad_()
    dy = torch.randn(case.T, case.H, device=DEVICE)
    with CopiesOf(w1_leaf, w2_leaf, of_their_size=True) as recorder:
        y = run(case, (x, idx, gate, w1_leaf.transpose(1, 2), w2_leaf.transpose(1, 2), b1, b2), backend)
        y.backward(dy)
    assert recorder.copies == []
    for leaf in (w1_leaf, w2_leaf):
        assert leaf.grad.stride() == leaf.stride()
    wide = [t.detach().double().requires_grad_() for t in (w1_leaf, w2_leaf)]
    expected_y = oracle(case, x.detach(), idx, gate.detach(), *(w.transpose(1, 2) for w in wide),
                        b1, b2)
    for got, want in zip((w1_leaf.grad, w2_leaf.grad), torch.autograd.grad(expected_y, wide, dy.double())):
        assert_matches(got, want, case, scale=4.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bit_identical_across_runs(backend):
    case = Case("k4", 33, 16, 24, 5, 4, "gelu", True, True)
    inputs = make_inputs(case, torch.bfloat16)
    first, second = run(case, inputs, backend), run(case, inputs, backend)
    assert torch.equal(first, second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_gate_perm_and_offs(backend):
    """A top-1 gate, perm and offs given as strided views (stride 2, poison between) are read as
    the views say."""
    case = Case("strided", 12, 8, 16, 3, 1, "silu", False, True, "any")
    x, idx, gate, w1, w2, b1, b2 = make_inputs(case, torch.float32)

    def every_other(t, fill):
        return torch.stack([t, torch.full_like(t, fill)], -1)[..., 0]

    expected = oracle(case, x, idx, gate, w1, w2, b1, b2)
    assert_matches(run(case, (x, idx, every_other(gate, math.nan), w1, w2, b1, b2), backend),
                   expected, case)
    perm, offs = (every_other(t, -7) for t in modekernels.sort_by_expert(idx, case.E))
    h = ops.moe_mlp_up(x, perm, offs, w1, b1, activation="silu", gated=False, top_k=1,
                       backend=backend)
    y = ops.moe_mlp_down(h, perm, offs, w2, every_other(gate, math.nan)[:, None], b2,
                         backend=backend)
    assert_matches(y, expected, case)


def _opcheck_inputs(case: Case):
    x, idx, gate, w1, w2, b1, b2 = make_inputs(case, torch.float32)
    perm, offs = modekernels.sort_by_expert(idx, case.E)
    return x, perm, offs, gate.reshape(case.T, case.k), w1, w2, b1, b2


OPCHECK_CASE = Case("opcheck", 6, 8, 8, 3, 2, "silu", True, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_up(backend):
    x, perm, offs, _, w1, _, b1, _ = _opcheck_inputs(OPCHECK_CASE)
    torch.library.opcheck(
        torch.ops.modekernels.moe_mlp_up.default,
        (x.requires_grad_(), perm, offs, w1.detach().requires_grad_(), b1, "silu", True, 2, True),
        {"backend": backend},
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_down(backend):
    x, perm, offs, gate, _, w2, _, b2 = _opcheck_inputs(OPCHECK_CASE)
    h = torch.randn(perm.shape[0], OPCHECK_CASE.I, device=DEVICE)
    torch.library.opcheck(
        torch.ops.modekernels.moe_mlp_down.default,
        (h.requires_grad_(), perm, offs, w2.requires_grad_(), b2.requires_grad_(), gate.requires_grad_()),
        {"backend": backend},
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_equals_eager(backend):
    case = OPCHECK_CASE
    x, idx, gate, w1, w2, b1, b2 = make_inputs(case, torch.float32)
    dy = torch.randn(case.T, case.H, device=DEVICE)

    def forward(x, gate, w1, w2):
        return modekernels.moe_mlp(x, idx, gate, w1, w2, activation="silu", gated=True, b1=b1, b2=b2,
                                   backend=backend)

    def run_once(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, gate, w1, w2)]
        y = fn(*leaves)
        y.backward(dy)
        return [y.detach()] + [t.grad for t in leaves]

    eager = run_once(forward)
    compiled = run_once(torch.compile(forward, fullgraph=True))
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_inference_keeps_no_preactivation():
    x, perm, offs, _, w1, _, b1, _ = _opcheck_inputs(OPCHECK_CASE)
    h, pre = torch.ops.modekernels.moe_mlp_up(x, perm, offs, w1, b1, "silu", True, 2, False, "reference")
    assert pre.shape == (0, w1.shape[2]) and h.shape == (perm.shape[0], OPCHECK_CASE.I)


def _bad(**changes):
    x = torch.randn(4, 8)
    args = dict(x=x, expert_idx=torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2]]), gate=torch.rand(4, 2),
                w1=torch.randn(3, 8, 12), w2=torch.randn(3, 6, 8), activation="silu", gated=True,
                b1=None, b2=None)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "args, error, match",
    [
        (_bad(expert_idx=torch.tensor([[0, 1], [3, 0], [1, 2], [0, 2]])), ValueError, r"expert_idx must lie in \[0, 3\)"),
        (_bad(expert_idx=torch.tensor([[0, 1], [-1, 0], [1, 2], [0, 2]])), ValueError, "expert_idx must lie"),
        (_bad(expert_idx=torch.zeros(4, 2)), TypeError, "expert_idx must have dtype"),
        (_bad(w1=torch.randn(3, 8, 12, dtype=torch.float64)), TypeError, "w1 must have dtype float32"),
        (_bad(x=torch.randn(4, 8, dtype=torch.float64)), TypeError, "x must have dtype"),
        (_bad(gate=torch.rand(4, 3)), ValueError, "gate must have expert_idx's shape"),
        (_bad(w2=torch.randn(3, 5, 8)), ValueError, r"w2.shape\[1\] must be 6"),
        (_bad(w2=torch.randn(3, 6, 9)), ValueError, r"w2.shape\[2\] must be 8"),
        (_bad(w1=torch.randn(3, 9, 12)), ValueError, r"w1.shape\[1\] must be 8"),
        (_bad(w2=torch.randn(2, 6, 8)), ValueError, r"w2.shape\[0\] must be 3"),
        (_bad(b1=torch.randn(3, 6)), ValueError, r"b1 must have shape \(3, 12\)"),
        (_bad(b2=torch.randn(3, 8, dtype=torch.float16)), TypeError, "b2 must have dtype float32"),
        (_bad(expert_idx=torch.zeros(4, 4, dtype=torch.long), gate=torch.rand(4, 4)), ValueError, "k = expert_idx.shape"),
        (_bad(expert_idx=torch.zeros(5, dtype=torch.long), gate=torch.rand(5)), ValueError, r"expert_idx.shape\[0\]"),
        (_bad(activation="tanh"), ValueError, "activation must be one of"),
        (_bad(w1=torch.randn(3, 8, 11), w2=torch.randn(3, 11, 8), gated=False, activation="swish"), ValueError, "activation"),
        (_bad(x=[[1.0] * 8] * 4), TypeError, "^x must be a torch.Tensor"),
        (_bad(x=torch.randn(4, 8, 1)), ValueError, "^x must have 2 dimensions"),
        (_bad(expert_idx=torch.zeros(4, 2, 1, dtype=torch.int64), gate=torch.rand(4, 2, 1)), ValueError, r"^expert_idx must be \(T,\) or \(T, k\)"),
        (_bad(expert_idx=torch.zeros(4, 0, dtype=torch.int64), gate=torch.rand(4, 0)), ValueError, r"^k = expert_idx.shape\[1\] = 0 must be in \[1, 3\]"),
        (_bad(gate=torch.ones(4, 2, dtype=torch.int64)), TypeError, "^gate must have dtype"),
        (_bad(w1=torch.randn(8, 12)), ValueError, "^w1 must have 3 dimensions"),
        (_bad(w1=torch.randn(3, 8, 13)), ValueError, "gated w1 has 2·I columns"),
        (_bad(w1=torch.randn(0, 8, 12), w2=torch.randn(0, 6, 8)), ValueError, r"^k = expert_idx.shape\[1\] = 2 must be in \[1, 0\]"),
        (_bad(b1=1.0), TypeError, "^b1 must be a torch.Tensor"),
        (_bad(b1=torch.randn(12)), ValueError, "^b1 must have 2 dimensions"),
        (_bad(b2=[0.0] * 8), TypeError, "^b2 must be a torch.Tensor"),
        (_bad(gated="yes"), TypeError, "^gated must be a bool"),
        (_bad(gated=None), TypeError, "^gated must be a bool"),
    ],
)
def test_bad_input_names_the_argument(args, error, match):
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=match):
        modekernels.moe_mlp(**args, backend="reference")


def test_stage_ops_reject_bad_slots():
    x, perm, offs, gate, w1, w2, b1, b2 = _opcheck_inputs(OPCHECK_CASE)
    with pytest.raises(ValueError, match="perm.shape"):
        ops.moe_mlp_up(x, perm[:-1], offs, w1, activation="silu", gated=True, top_k=2)
    with pytest.raises(ValueError, match="perm must hold slot indices"):
        ops.moe_mlp_up(x, perm + 100, offs, w1, activation="silu", gated=True, top_k=2)
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.moe_mlp_up(x, perm, offs.flip(0), w1, activation="silu", gated=True, top_k=2)
    with pytest.raises(ValueError, match="even number"):
        ops.moe_mlp_up(x, perm, offs, w1[:, :, :-1], activation="silu", gated=True, top_k=2)
    h = torch.randn(perm.shape[0], OPCHECK_CASE.I, device=DEVICE)
    with pytest.raises(ValueError, match=r"h.shape\[0\]"):
        ops.moe_mlp_down(h[:-1], perm, offs, w2, gate)


# --- modules: modekernels.nn.Top1Router, GroupedExperts, MoEMLP ---------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_mlp_module_learned_routing(backend):
    from modekernels.nn import MoEMLP

    layer = MoEMLP(16, 12, 5, activation="silu", gated=True, capacity_factor=1.0).to(DEVICE)
    x = torch.randn(2, 9, 16, device=DEVICE, requires_grad=True)
    with modekernels.use_backend(backend):
        out = layer(x)
    routing = modekernels.route_top1(layer.router.proj(x.reshape(-1, 16)), capacity_factor=1.0)
    experts = layer.experts
    expected = reference.moe_mlp(x.reshape(-1, 16), routing.expert_idx, routing.gate, experts.w1,
                                 experts.w2, activation="silu", gated=True, b1=experts.b1, b2=experts.b2)
    assert out.output.shape == x.shape
    torch.testing.assert_close(out.output.reshape(-1, 16), expected, rtol=1e-5, atol=1e-5)
    assert torch.all(out.output.reshape(-1, 16)[routing.dropped] == 0) and routing.dropped.any()
    torch.testing.assert_close(out.aux_loss, routing.aux_loss)
    (out.output.square().sum() + out.aux_loss + out.z_loss).backward()
    assert layer.router.proj.weight.grad.abs().sum() > 0 and experts.w1.grad.abs().sum() > 0


def test_router_jitter_only_in_training():
    from modekernels.nn import Top1Router

    router = Top1Router(8, 4, jitter=0.5).to(DEVICE)
    x = torch.randn(64, 8, device=DEVICE)
    router.eval()
    assert torch.equal(router(x).expert_idx, router(x).expert_idx)
    torch.testing.assert_close(router(x).gate, torch.softmax(router.proj(x), -1).amax(-1))
    router.train()
    assert not torch.equal(router(x).gate, router(x).gate)


def test_router_hash_and_random_modes():
    from modekernels.nn import MoEMLP, Top1Router

    ids = torch.randint(0, 50, (40,), device=DEVICE)
    x = torch.randn(40, 8, device=DEVICE)
    hashed = Top1Router(8, 4, mode="hash", vocab_size=50).to(DEVICE)
    routing = hashed(x, ids)
    assert torch.equal(routing.expert_idx, hashed.table[ids]) and torch.all(routing.gate == 1)
    with pytest.raises(ValueError, match="token_ids"):
        hashed(x)
    draws = [Top1Router(8, 4, mode="random")(x).expert_idx for _ in range(2)]
    assert not torch.equal(*draws) and all(d.min() >= 0 and d.max() < 4 for d in draws)
    layer = MoEMLP(8, 6, 4, router="hash", vocab_size=50, bias=False).to(DEVICE)
    out = layer(x.view(5, 8, 8), ids.view(5, 8))
    expected = reference.moe_mlp(x, layer.router.table[ids], torch.ones(40, device=DEVICE),
                                 layer.experts.w1, layer.experts.w2, activation="gelu", gated=False)
    torch.testing.assert_close(out.output.reshape(40, 8), expected, rtol=1e-5, atol=1e-5)
    assert out.aux_loss == 0 and out.z_loss == 0
    with pytest.raises(ValueError, match="mode must be one of"):
        Top1Router(8, 4, mode="top2")


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic-dynamic", "dynamic"])
def test_module_compiles_with_a_capacity_factor_that_varies(dynamic):
    """MoEMLP whose router's capacity factor changes between calls (train and eval values):
    one full graph, equal to eager."""
    from modekernels.nn import MoEMLP

    layer = MoEMLP(16, 12, 5, activation="silu", gated=True, capacity_factor=1.25).to(DEVICE)
    compiled = torch.compile(layer, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    x = torch.randn(40, 16, device=DEVICE)
    for capacity_factor in (1.25, 2.0, 0.5):
        layer.router.capacity_factor = capacity_factor
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


def test_compiles_with_dynamic_shapes_and_the_weights_as_inputs():
    """moe_mlp under dynamic=True with the weights as graph inputs: the expert count
    ``w1.shape[0]`` is a SymInt; the results equal eager for two shapes."""

    def forward(x, expert_idx, gate, w1, w2):
        return modekernels.moe_mlp(x, expert_idx, gate, w1, w2, activation="gelu", gated=False)

    compiled = torch.compile(forward, fullgraph=True, dynamic=True, backend="aot_eager")
    for T, H, I, E in ((7, 16, 12, 5), (11, 8, 6, 3)):
        inputs = (torch.randn(T, H, device=DEVICE), torch.randint(0, E, (T,), device=DEVICE),
                  torch.rand(T, device=DEVICE), torch.randn(E, H, I, device=DEVICE),
                  torch.randn(E, I, H, device=DEVICE))
        torch.testing.assert_close(compiled(*inputs), forward(*inputs), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_backend_runs_every_op_of_the_call(backend):
    """backend= reaches the sort by expert too, not only the GEMM stages (on the CPU the
    automatic choice of the sort would be the reference)."""
    case = CASES[0]
    with backends.record_runs() as runs:
        run(case, make_inputs(case, torch.float32), backend)
    assert runs["sort_by_expert"] == backend and runs["moe_mlp_up"] == backend

