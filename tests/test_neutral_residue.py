"""neutral_residue: every backend against the float64 reference (forward and the gradient of
every input through all three outputs), gate-sparse = dense bit for bit, opcheck,
torch.compile, bad input, and the NeutralResidue module with its loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import triton
from conftest import DEVICE, backend_params, poisoned_allocations
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modekernels
from modekernels import BackendUnavailable
from modekernels.nn import NeutralResidue, neutral_residue_loss
from modekernels.ops.neutral_residue import _neutral_residue_op
from modekernels.reference import neutral_residue as reference

BACKENDS = backend_params("reference", "triton", "cuda")
NAMES = ("x", "w_in", "w_glu", "w_out", "w_gate", "b_gate", "b_in", "b_glu", "b_out", "residual")
# (T, d, d_adapter): zero rows, one row, odd and non-power-of-two sizes, more than one tile.
SHAPES = [(0, 33, 7), (1, 33, 7), (37, 33, 7), (64, 48, 24), (5, 16, 1)]
# (glu, gate, activation, biases, residual)
VARIANTS = [
    (True, "relu", "silu", True, True),
    (True, "sigmoid", "gelu", False, False),
    (False, "none", "relu", True, False),
    (False, "relu", "gelu", True, True),
    (True, "none", "silu", False, True),
]
# Each variant on three of the shapes, every shape on three variants.
CASES = [
    pytest.param(SHAPES[(i + j) % len(SHAPES)], v, id=f"{'x'.join(map(str, SHAPES[(i + j) % 5]))}-"
                 + "-".join(map(str, v)))
    for i, v in enumerate(VARIANTS)
    for j in range(3)
]
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# Gradients pass through three roundings to 16 bits (dy_a, dh, d pre) before their GEMMs.
GRAD_TOLERANCE = {torch.float32: 2e-5, torch.float16: 8e-3, torch.bfloat16: 5e-2}


def _inputs(T, d, d_a, glu, gate, biases, residual, *, gate_bias=0.1) -> dict:
    """float64 master inputs on DEVICE, scaled so that every intermediate is O(1)."""

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, dtype=torch.float64, device=DEVICE) * scale

    gated = gate != "none"
    return {
        "x": rand(T, d),
        "w_in": rand(d_a, d, scale=d**-0.5),
        "w_glu": rand(d_a, d, scale=d**-0.5) if glu else None,
        "w_out": rand(d, d_a, scale=d_a**-0.5),
        "w_gate": rand(d, scale=d**-0.5) if gated else None,
        "b_gate": torch.tensor(gate_bias, dtype=torch.float64, device=DEVICE)
        if gated and biases
        else None,
        "b_in": rand(d_a, scale=0.5) if biases else None,
        "b_glu": rand(d_a, scale=0.5) if biases and glu else None,
        "b_out": rand(d, scale=0.5) if biases else None,
        "residual": rand(T, d) if residual else None,
    }


def _cast(inputs: dict, dtype, requires_grad=False) -> dict:
    return {
        k: None if t is None else t.to(dtype).requires_grad_(requires_grad)
        for k, t in inputs.items()
    }


def _call(t: dict, activation, gate, backend=None, sparse=False):
    return modekernels.neutral_residue(
        t["x"], t["w_in"], t["w_glu"], t["w_out"], t["w_gate"], t["b_gate"],
        b_in=t["b_in"], b_glu=t["b_glu"], b_out=t["b_out"], residual=t["residual"],
        activation=activation, gate=gate, sparse=sparse, backend=backend,
    )


def _oracle(t: dict, activation, gate):
    """The reference formula by autograd, on float64 inputs."""
    y, g, l1, _ = reference.neutral_residue(
        *(t[k] for k in NAMES), activation, gate, False, False
    )
    return y, g, l1


def _assert_close(actual, expected, dtype, what, tolerance=TOLERANCE):
    assert actual.shape == expected.shape, what
    assert not actual.isnan().any(), f"{what}: NaN"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= tolerance[dtype] * max(scale, 1.0), f"{what}: error {error}, scale {scale}"


def _cotangents(y, g, l1, dtype):
    """Random output gradients; none for l1 below float32, where ‖·‖₁'s sign flips for the
    entries within rounding of 0 (its gradient is checked in float32)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    out = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(DEVICE) for t in (y, g, l1)]
    if dtype != torch.float32:
        out[2].zero_()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, variant", CASES)
def test_forward_and_gradients_match_reference(backend, dtype, variant, shape):
    glu, gate, activation, biases, residual = variant
    _check_against_oracle(_inputs(*shape, glu, gate, biases, residual), activation, gate,
                          backend, dtype)


def _check_against_oracle(inputs: dict, activation, gate, backend, dtype, *,
                          sparse=False, layout=lambda name, t: t) -> None:
    """The forward and the gradient of every input, poisoned allocations, against the float64
    oracle; ``layout(name, input)`` gives the tensor passed (any view of the same values)."""
    master = _cast(inputs, dtype)  # representable in dtype
    exact = _cast(master, torch.float64, requires_grad=True)
    expected = _oracle(exact, activation, gate)
    cotangents = _cotangents(*expected, dtype)
    expected_grads = torch.autograd.grad(
        sum((o * c).sum() for o, c in zip(expected, cotangents)),
        [t for t in exact.values() if t is not None],
    )

    t = {k: None if v is None else layout(k, v).requires_grad_()
         for k, v in _cast(master, dtype).items()}
    with poisoned_allocations():
        outputs = _call(t, activation, gate, backend, sparse)
    assert outputs[0].dtype == dtype
    assert outputs[1].dtype == outputs[2].dtype == torch.float32
    for name, a, e in zip(("y", "g", "l1"), outputs, expected):
        _assert_close(a, e, dtype, name)
    grads = torch.autograd.grad(
        sum((o.double() * c).sum() for o, c in zip(outputs, cotangents)),
        [x for x in t.values() if x is not None],
    )
    names = [k for k, x in t.items() if x is not None]
    for name, a, e, x in zip(names, grads, expected_grads, [x for x in t.values() if x is not None]):
        assert a.dtype == x.dtype and a.shape == x.shape, name
        _assert_close(a, e, dtype, f"d{name}", GRAD_TOLERANCE)


def _nan_strided(t: torch.Tensor) -> torch.Tensor:
    """t's values as a view of stride 2 along the last dimension, NaN in between."""
    return torch.stack([t, torch.full_like(t, float("nan"))], -1)[..., 0]


def _column_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


# How test_non_contiguous_matrices_are_read_by_stride passes each matrix.
STRIDED_LAYOUTS = {"x": _column_major, "w_in": _column_major, "w_glu": _nan_strided,
                   "w_out": _column_major, "residual": _nan_strided}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [False, True])
def test_non_contiguous_matrices_are_read_by_stride(backend, sparse):
    """x, the weights and the residual as column-major or NaN-strided views: forward and
    gradients as with contiguous inputs."""
    _check_against_oracle(
        _inputs(21, 20, 6, True, "relu", True, True, gate_bias=-0.1), "silu", "relu", backend,
        torch.float32, sparse=sparse,
        layout=lambda name, t: STRIDED_LAYOUTS.get(name, lambda m: m)(t),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adapter_wider_than_one_column_tile(backend, dtype):
    """d_adapter 136 spans several column tiles of the project kernel and of the GLU backward
    (32 wide in the interpreter, at most 128 on a GPU), the last one partial; dense and
    gate-sparse, forward and gradients, and the two modes bit-identical in inference."""
    inputs = _inputs(37, 40, 136, True, "relu", True, True, gate_bias=-0.2)
    for sparse in (False, True):
        _check_against_oracle(inputs, "silu", "relu", backend, dtype, sparse=sparse)
    t = _cast(inputs, dtype)
    dense, sparse = (_call(t, "silu", "relu", backend, sparse=mode) for mode in (False, True))
    assert 0 < int((dense[1] == 0).sum()) < 37, "the test needs rows gated off and on"
    for d, s in zip(dense, sparse):
        assert torch.equal(d.view(torch.uint8), s.view(torch.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_output_alone_has_the_right_gradient(backend):
    """Unused outputs reach the backward as None: each output's gradient alone."""
    master = _inputs(29, 20, 6, True, "sigmoid", True, True)
    exact = _cast(master, torch.float64, requires_grad=True)
    t = _cast(master, torch.float32, requires_grad=True)
    leaves = [x for x in t.values() if x is not None]
    exact_leaves = [x for x in exact.values() if x is not None]
    for which in range(3):
        expected = torch.autograd.grad(
            _oracle(exact, "gelu", "sigmoid")[which].sum(), exact_leaves, allow_unused=True
        )
        actual = torch.autograd.grad(
            _call(t, "gelu", "sigmoid", backend)[which].sum(), leaves, allow_unused=True
        )
        for a, e in zip(actual, expected):
            if e is None:
                assert a is None or not a.any()
            else:
                _assert_close(a, e, torch.float32, f"output {which}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "gate_bias", [-0.6, -100.0, 100.0], ids=["some-off", "all-off", "all-on"]
)
@pytest.mark.parametrize("T", [1, 45])
def test_gate_sparse_is_bit_identical_to_dense(backend, dtype, gate_bias, T):
    master = _inputs(T, 33, 7, True, "relu", True, True, gate_bias=gate_bias)
    t = _cast(master, dtype)
    dense = _call(t, "silu", "relu", backend)
    sparse = _call(t, "silu", "relu", backend, sparse=True)
    if gate_bias == -0.6 and T > 1:
        off = (dense[1] == 0).sum().item()
        assert 0 < off < T, "the test needs some rows gated off and some on"
    for d, s in zip(dense, sparse):
        assert torch.equal(d.view(torch.uint8), s.view(torch.uint8))
    # The backward through the sparse path matches the dense one.
    t = _cast(master, dtype, requires_grad=True)
    leaves = [x for x in t.values() if x is not None]
    grads = [
        torch.autograd.grad(sum(o.float().sum() for o in _call(t, "silu", "relu", backend,
                                                                 sparse=mode)), leaves)
        for mode in (False, True)
    ]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", backend_params("triton"))
def test_gate_sparse_gate_bits_do_not_depend_on_the_tuned_k_tile(backend, monkeypatch):
    """The fused dense launch tuned to another BLOCK_K (16) than the untuned gate-only launch of
    gate-sparse mode still computes g, and so y and l1, with the same bits: the gate's K loop
    steps by its own fixed tile."""
    from modekernels.triton_kernels import neutral_residue as triton_residue

    tuned = triton.Config({"BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)
    monkeypatch.setattr(triton_residue._project_kernel, "configs", [tuned])
    t = _cast(_inputs(45, 97, 7, True, "relu", True, True, gate_bias=-0.1), torch.float32)
    dense = _call(t, "silu", "relu", backend)
    sparse = _call(t, "silu", "relu", backend, sparse=True)
    for d, s in zip(dense, sparse):
        assert torch.equal(d.view(torch.uint8), s.view(torch.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [False, True])
def test_strided_vectors_are_read_by_stride(backend, sparse):
    """Bias and gate vectors given as strided views (stride 2, NaN between) are read as the
    views say."""
    master = _inputs(21, 20, 6, True, "relu", True, True)
    expected = _oracle(master, "silu", "relu")
    t = _cast(master, torch.float32)
    for name in ("w_gate", "b_in", "b_glu", "b_out"):
        t[name] = torch.stack([t[name], torch.full_like(t[name], float("nan"))], -1)[..., 0]
    for name, a, e in zip(("y", "g", "l1"), _call(t, "silu", "relu", backend, sparse), expected):
        _assert_close(a, e, torch.float32, name)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="checks the error for CPU tensors")
def test_cuda_backend_needs_cuda_tensors():
    """The cuda backend exists for this op; on CPU tensors it declines, naming why."""
    t = _cast(_inputs(4, 8, 3, True, "relu", True, False), torch.float32)
    with pytest.raises(BackendUnavailable, match="needs CUDA tensors"):
        _call(t, "silu", "relu", "cuda")


def _formula(t: dict, activation, gate):
    """(y, g, l1) written out from the block's formula in the inputs' dtype (float64 here): an
    oracle independent of modekernels.reference."""
    x = t["x"]

    def affine(w, b):
        return x @ w.T if b is None else x @ w.T + b

    h = getattr(F, activation)(affine(t["w_in"], t["b_in"]))  # F.gelu is the exact erf GELU
    if t["w_glu"] is not None:
        h = h * affine(t["w_glu"], t["b_glu"])
    a = h @ t["w_out"].T + (0 if t["b_out"] is None else t["b_out"])
    if gate == "none":
        g = x.new_ones(x.shape[0])
    else:
        z = x @ t["w_gate"] + (0 if t["b_gate"] is None else t["b_gate"])
        g = torch.relu(z) if gate == "relu" else torch.sigmoid(z)
    y_a = g[:, None] * a
    return y_a if t["residual"] is None else t["residual"] + y_a, g, y_a.abs().sum(1)


@st.composite
def residue_problems(draw) -> tuple:
    """(T, d, d_adapter, glu, gate, activation, biases, residual, gate_bias): zero, one or an odd
    number of rows, odd sizes, every option; the gate bias puts some, most or few ReLU gates at
    exactly 0."""
    return (
        draw(st.sampled_from([0, 1, 2, 5, 7, 13, 21, 33])),
        draw(st.integers(1, 40)),
        draw(st.integers(1, 17)),
        draw(st.booleans()),
        draw(st.sampled_from(["relu", "sigmoid", "none"])),
        draw(st.sampled_from(["silu", "gelu", "relu"])),
        draw(st.booleans()),
        draw(st.booleans()),
        draw(st.sampled_from([-0.5, 0.1, 0.5])),
    )


@pytest.mark.parametrize("backend", backend_params("reference", "triton", "cuda"))
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=residue_problems(), seed=st.integers(0, 2**31 - 1))
def test_property_matches_formula(backend, problem, seed):
    """float32 forward (y, g, l1) and the gradient of every input through all three outputs
    against the float64 formula, allocations poisoned; in inference the gate-sparse path equals
    the dense one bit for bit."""
    T, d, d_a, glu, gate, activation, biases, residual, gate_bias = problem
    torch.manual_seed(seed)
    master = _cast(_inputs(T, d, d_a, glu, gate, biases, residual, gate_bias=gate_bias),
                   torch.float32)
    exact = _cast(master, torch.float64, requires_grad=True)
    expected = _formula(exact, activation, gate)
    cotangents = _cotangents(*expected, torch.float32)
    exact_leaves = [v for v in exact.values() if v is not None]
    expected_grads = torch.autograd.grad(
        sum((o * c).sum() for o, c in zip(expected, cotangents)), exact_leaves,
        allow_unused=True, materialize_grads=True,
    )

    t = _cast(master, torch.float32, requires_grad=True)
    leaves = [v for v in t.values() if v is not None]
    with poisoned_allocations():
        outputs = _call(t, activation, gate, backend)
        grads = torch.autograd.grad(
            sum((o.double() * c).sum() for o, c in zip(outputs, cotangents)), leaves,
            allow_unused=True, materialize_grads=True,
        )
    for name, a, e in zip(("y", "g", "l1"), outputs, expected):
        _assert_close(a, e, torch.float32, name)
    names = [k for k, v in t.items() if v is not None]
    for name, a, e, leaf in zip(names, grads, expected_grads, leaves):
        assert a.dtype == leaf.dtype, name
        _assert_close(a, e, torch.float32, f"d{name}", GRAD_TOLERANCE)

    inference = _cast(master, torch.float32)
    with torch.no_grad(), poisoned_allocations():
        dense = _call(inference, activation, gate, backend)
        sparse = _call(inference, activation, gate, backend, sparse=True)
    for a, b in zip(dense, sparse):  # flattened: an empty output may have any strides
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _op_args(t: dict, activation, gate, sparse, keep_pre, backend):
    return (*(t[k] for k in NAMES), activation, gate, sparse, keep_pre, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    cases = [(VARIANTS[0], (9, 12, 5), False), (VARIANTS[0], (9, 12, 5), True),
             (VARIANTS[2], (6, 16, 4), False)]
    for variant, shape, sparse in cases:
        glu, gate, activation, biases, residual = variant
        for requires_grad in (False, True):
            t = _cast(_inputs(*shape, glu, gate, biases, residual, gate_bias=-0.1),
                      torch.float32, requires_grad)
            torch.library.opcheck(
                _neutral_residue_op,
                _op_args(t, activation, gate, sparse, requires_grad, backend),
            )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sparse", [False, True])
def test_torch_compile_fullgraph_matches_eager(backend, sparse):
    master = _inputs(21, 24, 6, True, "relu", True, True, gate_bias=-0.2)

    def block(t):
        y, g, l1 = _call(t, "gelu", "relu", backend, sparse=sparse)
        return y.float().sum() + g.sum() + l1.sum(), y

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    t_eager = _cast(master, torch.float32, requires_grad=True)
    t_compiled = _cast(master, torch.float32, requires_grad=True)
    loss_e, y_e = block(t_eager)
    loss_c, y_c = compiled(t_compiled)
    torch.testing.assert_close(y_c, y_e)
    loss_e.backward()
    loss_c.backward()
    for k in NAMES:
        if t_eager[k] is not None:
            torch.testing.assert_close(t_compiled[k].grad, t_eager[k].grad, msg=k)


def _good():
    return _cast(_inputs(6, 10, 4, True, "relu", True, True), torch.float32)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda t: t.update(w_in=t["w_in"][:, :-1]), ValueError, r"w_in.shape\[1\]"),
        (lambda t: t.update(w_glu=t["w_glu"][:-1]), ValueError, r"w_glu.shape\[0\]"),
        (lambda t: t.update(w_out=t["w_out"][:, :-1]), ValueError, r"w_out.shape\[1\]"),
        (lambda t: t.update(w_out=t["w_out"][:-1]), ValueError, r"w_out.shape\[0\]"),
        (lambda t: t.update(w_gate=t["w_gate"][:-1]), ValueError, r"w_gate.shape\[0\]"),
        (lambda t: t.update(b_in=t["b_in"][:-1]), ValueError, r"b_in.shape\[0\]"),
        (lambda t: t.update(b_out=t["b_out"][:-1]), ValueError, r"b_out.shape\[0\]"),
        (lambda t: t.update(b_gate=t["b_gate"][None]), ValueError, "b_gate"),
        (lambda t: t.update(residual=t["residual"][:-1]), ValueError, r"residual.shape\[0\]"),
        (lambda t: t.update(w_out=t["w_out"].double()), TypeError, "w_out"),
        (lambda t: t.update(b_glu=t["b_glu"].half()), TypeError, "b_glu"),
        (lambda t: t.update(x=t["x"].long()), TypeError, "x"),
        (lambda t: t.update(x=t["x"][0]), ValueError, "x"),
        (lambda t: t.update(w_gate=t["w_gate"].to("meta")), ValueError, "w_gate"),
        (lambda t: t.update(residual=t["residual"].to("meta")), ValueError, "residual"),
        (lambda t: t.update(w_gate=None, b_gate=None), ValueError, "w_gate"),
        (lambda t: t.update(w_glu=None), ValueError, "b_glu"),
    ],
)
def test_bad_input_names_the_argument(change, error, match):
    t = _good()
    change(t)
    with pytest.raises(error, match=match):
        _call(t, "silu", "relu")


@pytest.mark.parametrize(
    "activation, gate, match", [("tanh", "relu", "activation"), ("silu", "softmax", "gate")]
)
def test_bad_option_names_the_argument(activation, gate, match):
    with pytest.raises(ValueError, match=match):
        _call(_good(), activation, gate)


# (argument, how, change, error, match): the cases the two tables above do not hold, on each
# backend, through the public function. ``change`` edits the keyword arguments of a valid call.
BAD_INPUT_SWEEP = [
    ("x", "not-a-tensor", lambda t: t.update(x=t["x"].tolist()), TypeError, "^x must be a torch.Tensor"),
    ("w_in", "none", lambda t: t.update(w_in=None), TypeError, "^w_in must be a torch.Tensor"),
    ("w_in", "rank-3", lambda t: t.update(w_in=t["w_in"][..., None]), ValueError, "^w_in must have 2 dimensions"),
    ("w_glu", "rank-1", lambda t: t.update(w_glu=t["w_glu"][0]), ValueError, "^w_glu must have 2 dimensions"),
    ("w_out", "none", lambda t: t.update(w_out=None), TypeError, "^w_out must be a torch.Tensor"),
    ("w_out", "rank-1", lambda t: t.update(w_out=t["w_out"][:, 0]), ValueError, "^w_out must have 2 dimensions"),
    ("w_gate", "rank-2", lambda t: t.update(w_gate=t["w_gate"][None]), ValueError, "^w_gate must have 1 dimensions"),
    ("w_gate", "python-float", lambda t: t.update(w_gate=1.0), TypeError, "^w_gate must be a torch.Tensor"),
    ("b_gate", "python-float", lambda t: t.update(b_gate=0.1), TypeError, "^b_gate must be a torch.Tensor"),
    ("b_gate", "without-w_gate", lambda t: t.update(w_gate=None, gate="none"), ValueError, "^b_gate was given without w_gate"),
    ("b_in", "rank-2", lambda t: t.update(b_in=t["b_in"][None]), ValueError, "^b_in must have 1 dimensions"),
    ("b_in", "list", lambda t: t.update(b_in=t["b_in"].tolist()), TypeError, "^b_in must be a torch.Tensor"),
    ("residual", "rank-1", lambda t: t.update(residual=t["residual"][0]), ValueError, "^residual must have 2 dimensions"),
    ("residual", "columns", lambda t: t.update(residual=t["residual"][:, :-1]), ValueError, r"^residual.shape\[1\] must be 10"),
    ("residual", "float64", lambda t: t.update(residual=t["residual"].double()), TypeError, "^residual must have dtype float32"),
    ("w_gate", "with-gate-none", lambda t: t.update(gate="none", b_gate=None), ValueError, "^w_gate must be given exactly"),
    ("activation", "none", lambda t: t.update(activation=None), ValueError, "^activation must be one of"),
    ("gate", "int", lambda t: t.update(gate=3), ValueError, "^gate must be one of"),
    ("sparse", "str", lambda t: t.update(sparse="yes"), TypeError, "^sparse must be a bool"),
]


@pytest.mark.parametrize(
    "change, error, match",
    [pytest.param(*row[2:], id=f"{row[0]}-{row[1]}") for row in BAD_INPUT_SWEEP],
)
@pytest.mark.parametrize("backend", backend_params("reference", "triton", "cuda"))
def test_bad_input_sweep_names_the_argument(backend, change, error, match):
    """A Python exception naming the argument, raised before any backend runs: never a
    RuntimeError from inside torch or an AttributeError from a kernel, never a silent result."""
    kwargs = dict(_good(), activation="silu", gate="relu")
    change(kwargs)
    with pytest.raises(error, match=match):
        modekernels.neutral_residue(**kwargs, backend=backend)


def test_backward_without_kept_preactivations_raises():
    t = _good()
    args = _op_args(t, "silu", "relu", False, False, None)
    w_in = t["w_in"].requires_grad_()
    y, g, l1, pre = _neutral_residue_op(*args[:1], w_in, *args[2:])
    with pytest.raises(RuntimeError, match="pre-activations"):
        y.sum().backward()


# The module ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("glu, gate", [(True, "relu"), (False, "sigmoid"), (True, "none")])
def test_module_output_is_exactly_zero_at_init(backend, glu, gate):
    module = NeutralResidue(24, 8, num_layers=3, glu=glu, gate=gate).to(DEVICE)
    x = torch.randn(2, 5, 24, device=DEVICE)
    residual = torch.randn(2, 5, 24, device=DEVICE)
    with modekernels.use_backend(backend):
        y, g, l1 = module(x)
        y_r, _, _ = module(x, residual)
    assert y.shape == (2, 5, 24) and g.shape == l1.shape == (2, 5)
    assert torch.equal(y, torch.zeros_like(y)) and torch.equal(l1, torch.zeros_like(l1))
    assert torch.equal(y_r, residual)


def test_module_initialisation_variances():
    d, L = 512, 4
    module = NeutralResidue(d, 256, num_layers=L)
    for name in ("w_in", "w_glu"):
        var = getattr(module, name).var().item()
        assert abs(var * d * L - 1) < 0.05, name
    assert abs(module.w_gate.var().item() * d * L - 1) < 0.2  # d samples only
    assert not module.w_out.any() and not module.b_out.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_the_op_and_trains(backend):
    module = NeutralResidue(20, 6, activation="gelu", gate="relu", sparse=False).to(DEVICE)
    with torch.no_grad():
        module.w_out.normal_()
    x = torch.randn(3, 7, 20, device=DEVICE)
    with modekernels.use_backend(backend):
        y, g, l1 = module(x)
        y_op, g_op, l1_op = modekernels.neutral_residue(
            x.reshape(21, 20), module.w_in, module.w_glu, module.w_out, module.w_gate,
            module.b_gate.view(()), b_in=module.b_in, b_glu=module.b_glu, b_out=module.b_out,
            activation="gelu",
        )
        torch.testing.assert_close(y, y_op.view(3, 7, 20))
        torch.testing.assert_close(l1, l1_op.view(3, 7))
        (y.sum() + l1.sum()).backward()
    assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(d_model=0), ValueError, "^d_model must be a positive int"),
        (dict(d_model=8.0), ValueError, "^d_model must be a positive int"),
        (dict(d_adapter=-1), ValueError, "^d_adapter must be a positive int"),
        (dict(d_adapter=True), ValueError, "^d_adapter must be a positive int"),
        (dict(num_layers=0), ValueError, "^num_layers must be a positive int"),
        (dict(num_layers=-1), ValueError, "^num_layers must be a positive int"),
        (dict(activation="tanh"), ValueError, "^activation must be one of"),
        (dict(gate="tanh"), ValueError, "^gate must be one of"),
        (dict(gate=None), ValueError, "^gate must be one of"),
        (dict(glu="yes"), TypeError, "^glu must be a bool"),
        (dict(sparse=1), TypeError, "^sparse must be a bool"),
    ],
    ids=lambda v: str(v) if not isinstance(v, dict) else ",".join(f"{k}={v[k]}" for k in v),
)
def test_module_rejects_bad_arguments_at_construction(kwargs, error, match):
    args = {"d_model": 8, "d_adapter": 2, **kwargs}
    with pytest.raises(error, match=match):
        NeutralResidue(args.pop("d_model"), args.pop("d_adapter"), **args)


def test_neutral_residue_loss_from_l1():
    l1 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    loss = neutral_residue_loss(l1, mask, d_model=2)
    assert math.isclose(loss.item(), (1 + 3 + 6) / 3 / 2, rel_tol=1e-6)
    loss.backward()
    torch.testing.assert_close(l1.grad, mask.float() / 6)
    none = neutral_residue_loss(l1, torch.zeros_like(mask), d_model=2)
    assert none.item() == 0.0 and none.requires_grad


@pytest.mark.parametrize(
    "mask, error",
    [
        (torch.ones(2, 2, dtype=torch.bool), ValueError),
        (torch.ones(6, dtype=torch.bool), ValueError),
        (torch.ones(2, 3), TypeError),
        (torch.ones(2, 3, dtype=torch.bool, device="meta"), ValueError),
    ],
)
def test_neutral_residue_loss_rejects_a_bad_mask(mask, error):
    with pytest.raises(error, match="mask"):
        neutral_residue_loss(torch.ones(2, 3), mask, d_model=4)


@pytest.mark.parametrize("d_model", [0, -3, 2.5, None])
def test_neutral_residue_loss_rejects_a_bad_d_model(d_model):
    with pytest.raises(ValueError, match="^d_model must be a positive int"):
        neutral_residue_loss(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), d_model)
