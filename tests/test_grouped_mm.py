"""Tests of ``modekernels.grouped_mm`` (forward, dX, dW) on every backend against the float64
reference, ``torch._grouped_mm``, ``opcheck``, ``torch.compile`` and bad input."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from conftest import DEVICE, backend_params, poisoned_allocations
from copy_recorder import CopiesOf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import modekernels
from modekernels.ops import grouped_mm as grouped_mm_ops
from modekernels.reference import grouped_mm as reference

ALL_BACKENDS = backend_params("reference", "triton", "cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative tolerance by dtype; the absolute one grows with the square root of the reduction.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


class Case:
    """A grouped GEMM problem: group sizes (E = len(sizes)), ``tail`` rows past offs[-1]."""

    def __init__(self, name: str, K: int, N: int, sizes: list[int], tail: int = 0):
        self.name, self.K, self.N, self.sizes, self.tail = name, K, N, sizes, tail
        self.S = sum(sizes) + tail
        self.E = len(sizes)

    def offs(self) -> torch.Tensor:
        ends = torch.tensor(self.sizes, dtype=torch.int64).cumsum(0)
        return ends.to(dtype=torch.int32, device=DEVICE)

    def __repr__(self) -> str:
        return self.name


CASES = [
    Case("empty_groups_K24_N40", 24, 40, [13, 0, 29, 4, 0, 21]),
    Case("odd_K17_N33_tail", 17, 33, [7, 0, 40, 3, 11], tail=6),
    Case("one_group_all_rows", 32, 48, [0, 70, 0]),
    Case("single_row", 40, 24, [0, 1, 0]),
    Case("zero_rows", 24, 16, [0, 0, 0]),
    Case("only_tail_rows", 16, 24, [0, 0], tail=9),
    Case("several_k_tiles", 72, 64, [33, 31, 0], tail=2),
    Case("single_group", 24, 40, [45]),
    Case("K_zero", 0, 8, [3, 2], tail=1),
    Case("no_groups", 8, 16, [], tail=5),
]

# x: contiguous or a column slice; w: (E, K, N) or the nn.Linear layout (E, N, K) transposed.
LAYOUTS = ["contiguous", "linear_weight", "strided_x"]


def make_inputs(case: Case, dtype: torch.dtype, layout: str = "contiguous"):
    """x (S, K) and the weight leaf, with w (E, K, N) the view the op takes."""
    if layout == "strided_x":
        x = torch.randn(case.S, 2 * case.K, device=DEVICE).to(dtype)[:, ::2]
    else:
        x = torch.randn(case.S, case.K, device=DEVICE).to(dtype)
    if layout == "linear_weight":
        w_leaf = torch.randn(case.E, case.N, case.K, device=DEVICE).to(dtype)
    else:
        w_leaf = torch.randn(case.E, case.K, case.N, device=DEVICE).to(dtype)
    return x, w_leaf


def as_weight(w_leaf: torch.Tensor, layout: str) -> torch.Tensor:
    return w_leaf.transpose(1, 2) if layout == "linear_weight" else w_leaf


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, reduction: int, scale: float = 1.0):
    tol = scale * TOLERANCE[actual.dtype]
    torch.testing.assert_close(
        actual.double(), expected, rtol=tol, atol=tol * math.sqrt(max(reduction, 1))
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_forward_matches_float64_reference(backend, dtype, case, layout):
    x, w_leaf = make_inputs(case, dtype, layout)
    w = as_weight(w_leaf, layout)
    offs = case.offs()
    with poisoned_allocations():
        y = modekernels.grouped_mm(x, w, offs, backend=backend)
    assert y.shape == (case.S, case.N) and y.dtype == dtype and y.device == x.device
    assert_matches(y, reference.grouped_mm(x.double(), w.double(), offs), case.K)
    assert torch.all(y[sum(case.sizes) :] == 0), "rows past offs[-1] must be zero"


@pytest.mark.parametrize("layout", ["linear_weight", "strided_x"])  # dy is always strided
@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_backward_matches_float64_reference(backend, dtype, case, layout):
    x, w_leaf = make_inputs(case, dtype, layout)
    offs = case.offs()
    dy = torch.randn(case.N, case.S, device=DEVICE).to(dtype).t()  # non-contiguous
    x.requires_grad_()
    w_leaf.requires_grad_()
    x64 = x.detach().double().requires_grad_()
    w64_leaf = w_leaf.detach().double().requires_grad_()

    y = modekernels.grouped_mm(x, as_weight(w_leaf, layout), offs, backend=backend)
    with poisoned_allocations():
        y.backward(dy)
    y64 = reference.grouped_mm(x64, as_weight(w64_leaf, layout), offs)
    if y64.requires_grad:
        dx64, dw64 = torch.autograd.grad(y64, (x64, w64_leaf), dy.double(), materialize_grads=True)
    else:  # no groups: y does not depend on x or w
        dx64, dw64 = torch.zeros_like(x64), torch.zeros_like(w64_leaf)

    assert x.grad.shape == x.shape and w_leaf.grad.shape == w_leaf.shape
    assert_matches(x.grad, dx64, case.N)
    assert_matches(w_leaf.grad, dw64, max(case.sizes, default=0))
    assert torch.all(x.grad[sum(case.sizes) :] == 0), "rows past offs[-1] get zero gradient"


@pytest.mark.parametrize("case", CASES[:3], ids=repr)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_weight_grad_op_zeroes_empty_groups(backend, case):
    x, _ = make_inputs(case, torch.float32, "strided_x")
    dy = torch.randn(case.S, case.N, device=DEVICE)
    offs = case.offs()
    with poisoned_allocations():
        dw = torch.ops.modekernels.grouped_mm_weight_grad(x, dy, offs, backend=backend)
    assert_matches(dw, reference.grouped_mm_weight_grad(x.double(), dy.double(), offs), 70)
    for e, size in enumerate(case.sizes):
        if size == 0:
            assert torch.all(dw[e] == 0)


def _gathered_inputs(case: Case, dtype: torch.dtype, gather: str):
    """Source matrices with a different row count than the S sorted rows, row indices into them
    (repeats allowed, as top-k routing gives) and a float32 scale per row, as ``gather`` picks."""
    x_src = torch.randn(case.S + 3, 2 * case.K, device=DEVICE).to(dtype)[:, ::2]  # strided
    dy_src = torch.randn(max(case.S // 2, 1), case.N, device=DEVICE).to(dtype)
    kwargs = {}
    if gather in ("x", "both"):
        kwargs["x_rows"] = torch.randint(0, x_src.shape[0], (case.S,), device=DEVICE)
    if gather in ("dy", "dy_scaled", "both"):
        kwargs["dy_rows"] = torch.randint(0, dy_src.shape[0], (case.S,), device=DEVICE)
    if gather in ("dy_scaled", "both"):
        kwargs["dy_scale"] = torch.rand(case.S, device=DEVICE) * 2 - 0.5
    x = x_src if "x_rows" in kwargs else x_src[: case.S]
    dy = dy_src if "dy_rows" in kwargs else torch.randn(case.S, case.N, device=DEVICE).to(dtype)
    return x, dy, kwargs


def _explicit_rows(x, dy, x_rows=None, dy_rows=None, dy_scale=None):
    """The gathered and scaled operands in float64, written out independently of the op."""
    x, dy = x.double(), dy.double()
    if x_rows is not None:
        x = torch.stack([x[i] for i in x_rows.tolist()]) if len(x_rows) else x[:0]
    if dy_rows is not None:
        dy = torch.stack([dy[i] for i in dy_rows.tolist()]) if len(dy_rows) else dy[:0]
    if dy_scale is not None:
        dy = dy * dy_scale.double()[:, None]
    return x, dy


@pytest.mark.parametrize("gather", ["x", "dy", "dy_scaled", "both"])
@pytest.mark.parametrize("case", CASES[:5] + CASES[6:8], ids=repr)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_weight_grad_reads_gathered_scaled_rows(backend, dtype, case, gather):
    x, dy, kwargs = _gathered_inputs(case, dtype, gather)
    offs = case.offs()
    with poisoned_allocations():
        dw = torch.ops.modekernels.grouped_mm_weight_grad(x, dy, offs, **kwargs, backend=backend)
    expected = reference.grouped_mm_weight_grad(*_explicit_rows(x, dy, **kwargs), offs)
    # the scaled rows are rounded to dy's dtype before the product: one more rounding
    assert_matches(dw, expected, max(case.sizes, default=1), scale=2.0 if "dy_scale" in kwargs else 1.0)
    for e, size in enumerate(case.sizes):
        if size == 0:
            assert torch.all(dw[e] == 0)


@pytest.mark.parametrize("gather", ["none", "both"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3], CASES[4], CASES[8]], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_transposed_weight_grad_has_the_linear_layout_and_the_same_values(
    backend, dtype, case, gather
):
    """transposed=True: dw (E, K, N) with the strides of a contiguous (E, N, K), every element
    written, and the values of the contiguous dw: bit for bit on reference and triton (the same
    arithmetic, only the stores differ), to rounding on cuda (which computes dwᵀ = DYᵀ·X)."""
    x, dy, kwargs = _gathered_inputs(case, dtype, gather)
    offs = case.offs()
    contiguous = torch.ops.modekernels.grouped_mm_weight_grad(x, dy, offs, **kwargs, backend=backend)
    with poisoned_allocations():
        dw = torch.ops.modekernels.grouped_mm_weight_grad(
            x, dy, offs, **kwargs, transposed=True, backend=backend
        )
    assert dw.shape == (case.E, case.K, case.N)
    assert dw.stride() == torch.empty(case.E, case.N, case.K).transpose(1, 2).stride()
    if backend == "cuda":
        assert_matches(dw, contiguous.double(), max(case.sizes, default=1))
    else:
        assert torch.equal(dw, contiguous)


def _every_other(t: torch.Tensor, fill) -> torch.Tensor:
    """t's values as a strided view (stride 2), interleaved with ``fill``."""
    return torch.stack([t, torch.full_like(t, fill)], -1)[..., 0]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_strided_offsets_and_row_vectors(backend):
    """offs, x_rows, dy_rows and dy_scale given as strided views are read as the views say."""
    case = CASES[1]
    x, w = make_inputs(case, torch.float32)
    offs = _every_other(case.offs(), -7)
    y = modekernels.grouped_mm(x, w, offs, backend=backend)
    assert_matches(y, reference.grouped_mm(x.double(), w.double(), case.offs()), case.K)
    x, dy, kwargs = _gathered_inputs(case, torch.float32, "both")
    expected = reference.grouped_mm_weight_grad(*_explicit_rows(x, dy, **kwargs), case.offs())
    kwargs = {k: _every_other(v, -7) for k, v in kwargs.items()}
    dw = torch.ops.modekernels.grouped_mm_weight_grad(x, dy, offs, **kwargs, backend=backend)
    assert_matches(dw, expected, max(case.sizes), scale=2.0)


@pytest.mark.parametrize(
    "offs, clamped",
    [([-4, 6, 40], [0, 6, 11]), ([3, 12, 15], [3, 11, 11]), ([5, 3, 9], None)],
    ids=["negative_and_past_S", "past_S", "decreasing"],
)
@pytest.mark.parametrize("backend", backend_params("triton", "cuda"))
def test_unchecked_device_offsets_stay_in_bounds(backend, offs, clamped):
    """Offsets are value-checked on the host only where the host can read them. Kernels given
    invalid ones (as a device-side caller can) clamp every group into [0, S): nothing is read or
    written outside the S rows, every output element is written, and offsets merely out of
    range act as their clamped values. (Decreasing offsets make groups overlap; which group
    then computes a shared row is the kernel's choice, so only the bounds are checked.)"""
    kernels = importlib.import_module(
        {"triton": "modekernels.triton_kernels.grouped_mm", "cuda": "modekernels.cuda.grouped_mm"}[backend]
    )
    S, K, N = 11, 16, 24
    x, dy = torch.randn(S, K, device=DEVICE), torch.randn(S, N, device=DEVICE)
    w = torch.randn(len(offs), K, N, device=DEVICE)
    with poisoned_allocations():
        y = kernels.grouped_mm(x, w, torch.tensor(offs, dtype=torch.int32, device=DEVICE))
        dw = kernels.grouped_mm_weight_grad(x, dy, torch.tensor(offs, dtype=torch.int32, device=DEVICE))
    assert y.isfinite().all() and dw.isfinite().all()
    if clamped is not None:
        clamped = torch.tensor(clamped, dtype=torch.int32, device=DEVICE)
        assert_matches(y, reference.grouped_mm(x.double(), w.double(), clamped), K)
        assert_matches(dw, reference.grouped_mm_weight_grad(x.double(), dy.double(), clamped), S)


def _output_and_grads(grouped_mm, x, w_leaf, layout, dy):
    """y = grouped_mm(x, w) for w the weight view of ``w_leaf``, and the gradients of x and of
    w_leaf for the upstream gradient dy."""
    x, w_leaf = x.detach().requires_grad_(), w_leaf.detach().requires_grad_()
    y = grouped_mm(x, as_weight(w_leaf, layout))
    dx, dw = torch.autograd.grad(y, (x, w_leaf), dy)
    return y.detach(), dx, dw


@pytest.mark.parametrize("layout", ["contiguous", "linear_weight"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_matches_torch_grouped_mm(backend, dtype, layout):
    """y, dX and dW equal torch._grouped_mm's. torch leaves the rows past offs[-1] undefined in
    y and, in its CPU backward, in dX (left unwritten: values like 1e37 come out), so only the
    covered rows of those two are compared; dW is compared whole, empty groups included."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip(f"torch {torch.__version__} has no torch._grouped_mm")
    case = Case("aligned", 32, 48, [9, 0, 30, 17], tail=4)
    x, w_leaf = make_inputs(case, dtype, layout)
    offs = case.offs()
    dy = torch.randn(case.S, case.N, device=DEVICE).to(dtype)
    try:
        expected = _output_and_grads(
            lambda x, w: torch._grouped_mm(x, w, offs=offs), x, w_leaf, layout, dy
        )
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torch._grouped_mm rejects {dtype}, {layout} on {DEVICE}: {exc}")
    y, dx, dw = _output_and_grads(
        lambda x, w: modekernels.grouped_mm(x, w, offs, backend=backend), x, w_leaf, layout, dy
    )
    expected_y, expected_dx, expected_dw = (t.double() for t in expected)
    covered = sum(case.sizes)
    assert_matches(y[:covered], expected_y[:covered], case.K, scale=2.0)
    assert_matches(dx[:covered], expected_dx[:covered], case.N, scale=2.0)
    assert_matches(dw, expected_dw, max(case.sizes), scale=2.0)


# odd sizes, an empty group, tail rows; K = 1 and N = 1, where (E, K, N) and (E, N, K) order
# the memory alike. No group size is E·K or E·N, so no group's rows of x or dy have the weight's
# size: the recorder then tracks the weight and its gradient only.
LINEAR_LAYOUT_CASES = [CASES[1], Case("K1", 1, 7, [2, 0, 5]), Case("N1", 9, 1, [2, 0, 5], tail=2)]


@pytest.mark.parametrize("case", LINEAR_LAYOUT_CASES, ids=repr)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_linear_layout_weight_is_not_copied(backend, case):
    """w given as the transposed view of an (E, N, K) tensor is read in place by the forward and
    by the backward's dX = dY·Wᵀ, which takes w.transpose(1, 2): the (E, N, K) tensor itself;
    dW is written in the (E, N, K) layout, so autograd accumulates it into .grad as it is, with
    no copy of a weight-sized tensor. float32, where the reference has no float32 upcast of
    w[e] to make."""
    x, w_leaf = make_inputs(case, torch.float32, "linear_weight")
    x.requires_grad_()
    w_leaf.requires_grad_()
    w, offs = as_weight(w_leaf, "linear_weight"), case.offs()
    dy = torch.randn(case.S, case.N, device=DEVICE)
    with CopiesOf(w_leaf, of_their_size=True) as recorder:
        y = modekernels.grouped_mm(x, w, offs, backend=backend)
        y.backward(dy)
    assert recorder.copies == []
    assert_matches(y, reference.grouped_mm(x.double(), w.double(), offs), case.K)
    assert x.grad is not None and w_leaf.grad.is_contiguous()
    expected_dw = reference.grouped_mm_weight_grad(x.double(), dy.double(), offs)
    assert_matches(w_leaf.grad, expected_dw.transpose(1, 2), max(case.sizes))


@pytest.mark.parametrize("w, linear", [
    (torch.empty(3, 5, 4).transpose(1, 2), True),
    (torch.empty(1, 5, 4).transpose(1, 2), True),
    (torch.empty(3, 4, 5), False),
    (torch.empty(3, 5, 8)[:, :, :4].transpose(1, 2), False),  # K columns of a wider tensor
    (torch.empty(3, 5, 1).transpose(1, 2), False),  # K = 1: contiguous too
    (torch.empty(3, 1, 4).transpose(1, 2), False),  # N = 1: contiguous too
    (torch.empty(3, 0, 4).transpose(1, 2), False),
], ids=["linear", "linear_one_group", "contiguous", "sliced", "K1", "N1", "empty"])
def test_is_linear_layout(w, linear):
    """transposed=True is asked for exactly where w is the transposed view of a contiguous
    (E, N, K) and not contiguous itself."""
    assert grouped_mm_ops.is_linear_layout(w) is linear


def test_copy_recorder_sees_copies_inside_the_ops():
    """The recorder of the tests above sees a copy made inside a modekernels op: the reference's
    float32 upcast of each bfloat16 w[e]."""
    case = CASES[1]
    x, w_leaf = make_inputs(case, torch.bfloat16, "linear_weight")
    w = as_weight(w_leaf, "linear_weight")
    with CopiesOf(w_leaf) as recorder:
        modekernels.grouped_mm(x, w, case.offs(), backend="reference")
    assert len(recorder.copies) == case.E and all("_to_copy" in c for c in recorder.copies)


def test_copy_recorder_sees_the_copy_of_a_gradient_accumulated_in_another_layout():
    """The recorder sees autograd's copy of a gradient into its leaf's layout as it accumulates
    .grad: what an (E, K, N) contiguous dW of an (E, N, K) weight used to cost."""
    w_leaf = torch.randn(4, 6, 5, device=DEVICE, requires_grad=True)
    with CopiesOf(w_leaf, of_their_size=True) as recorder:
        w_leaf.transpose(1, 2).backward(torch.ones(4, 5, 6, device=DEVICE))
    assert len(recorder.copies) == 1 and w_leaf.grad.is_contiguous()


def _opcheck_inputs():
    case = Case("opcheck", 24, 40, [5, 0, 12], tail=3)
    x, w_leaf = make_inputs(case, torch.float32, "linear_weight")
    return case, x, as_weight(w_leaf, "linear_weight"), case.offs()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_opcheck_forward(backend):
    _, x, w, offs = _opcheck_inputs()
    torch.library.opcheck(
        torch.ops.modekernels.grouped_mm.default,
        (x.requires_grad_(), w.detach().requires_grad_(), offs),
        {"backend": backend},
    )


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_opcheck_weight_grad(backend, transposed):
    case, x, _, offs = _opcheck_inputs()
    dy = torch.randn(case.S, case.N, device=DEVICE)
    torch.library.opcheck(
        torch.ops.modekernels.grouped_mm_weight_grad.default,
        (x, dy, offs),
        {"transposed": transposed, "backend": backend},
    )


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_opcheck_gathered_weight_grad(backend, transposed):
    case = Case("opcheck", 24, 40, [5, 0, 12], tail=3)
    x, dy, kwargs = _gathered_inputs(case, torch.float32, "both")
    torch.library.opcheck(
        torch.ops.modekernels.grouped_mm_weight_grad.default,
        (x, dy, case.offs()),
        {**kwargs, "transposed": transposed, "backend": backend},
    )


@pytest.mark.parametrize("backend", backend_params("reference", "triton"))
def test_compile_fullgraph_equals_eager(backend):
    case, x, w, offs = _opcheck_inputs()
    dy = torch.randn(case.S, case.N, device=DEVICE)

    def run(fn):
        xl = x.detach().clone().requires_grad_()
        wl = w.detach().clone().requires_grad_()
        y = fn(xl, wl, offs)
        y.backward(dy)
        return y.detach(), xl.grad, wl.grad

    def forward(x, w, offs):
        return modekernels.grouped_mm(x, w, offs, backend=backend)

    eager = run(forward)
    compiled = run(torch.compile(forward, fullgraph=True))
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    sizes=st.lists(st.integers(0, 20), min_size=1, max_size=7),
    tail=st.integers(0, 4),
    K=st.integers(1, 40),
    N=st.integers(1, 40),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_group_splits(backend, sizes, tail, K, N, seed):
    torch.manual_seed(seed)
    case = Case("hypothesis", K, N, sizes, tail)
    x, w = make_inputs(case, torch.float32)
    dy = torch.randn(case.S, N, device=DEVICE)
    offs = case.offs()
    y = modekernels.grouped_mm(x, w, offs, backend=backend)
    dw = torch.ops.modekernels.grouped_mm_weight_grad(x, dy, offs, backend=backend)
    assert_matches(y, reference.grouped_mm(x.double(), w.double(), offs), K)
    expected_dw = reference.grouped_mm_weight_grad(x.double(), dy.double(), offs)
    assert_matches(dw, expected_dw, max(sizes))


@pytest.mark.parametrize("backend", backend_params("triton"))
def test_triton_tunes_decode_and_training_row_counts_apart(backend):
    """The grouped GEMMs' autotune key holds the mean rows per group as a power of two (capped),
    so a decode step's tuning does not serve a training step's shapes, nor one per batch size."""
    from modekernels.triton_kernels import grouped_mm as kernels
    from modekernels.triton_kernels import moe_mlp as moe_kernels
    from modekernels.triton_kernels.common import rows_bucket

    assert [rows_bucket(rows, 8) for rows in (0, 1, 8, 9, 100, 128)] == [1, 1, 1, 2, 16, 16]
    assert rows_bucket(32768, 8) == rows_bucket(1 << 30, 8) == 4096
    assert rows_bucket(5, 0) == 8
    for kernel in (kernels._grouped_mm_kernel, kernels._grouped_mm_weight_grad_kernel,
                   moe_kernels._moe_up_kernel, moe_kernels._moe_down_kernel):
        assert "rows_bucket" in kernel.keys


@pytest.mark.parametrize("backend", backend_params("triton"))
def test_triton_float32_follows_allow_tf32(backend):
    from modekernels.triton_kernels.common import dot_options

    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert dot_options(torch.float32)["INPUT_PRECISION"] == "ieee"
        matmul.allow_tf32 = True
        assert dot_options(torch.float32)["INPUT_PRECISION"] == "tf32"
        case, x, w, offs = _opcheck_inputs()
        y = modekernels.grouped_mm(x, w, offs, backend=backend)  # TF32: about 1e-3 relative
    finally:
        matmul.allow_tf32 = saved
    if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9: the new API, which makes
        saved = matmul.fp32_precision  # reading allow_tf32 raise once it sets TF32
        try:
            matmul.fp32_precision = "tf32"
            assert dot_options(torch.float32)["INPUT_PRECISION"] == "tf32"
            matmul.fp32_precision = "ieee"
            assert dot_options(torch.float32)["INPUT_PRECISION"] == "ieee"
        finally:
            matmul.fp32_precision = saved
    expected = reference.grouped_mm(x.double(), w.double(), offs)
    torch.testing.assert_close(y.double(), expected, rtol=5e-3, atol=5e-2)


def _bad(**change):
    """Valid (x, w, offs) for S=10, K=8, N=6, E=3, with some replaced."""
    args = {
        "x": torch.randn(10, 8),
        "w": torch.randn(3, 8, 6),
        "offs": torch.tensor([2, 5, 9], dtype=torch.int32),
    }
    args.update(change)
    return args


BAD_INPUTS = [
    ("x_float64", _bad(x=torch.randn(10, 8, dtype=torch.float64)), TypeError, "x must have dtype"),
    ("w_dtype", _bad(w=torch.randn(3, 8, 6, dtype=torch.bfloat16)), TypeError, "w must have dtype"),
    ("w_device", _bad(w=torch.randn(3, 8, 6, device="meta")), ValueError, "w must be on"),
    ("x_rank", _bad(x=torch.randn(10, 8, 1)), ValueError, "x must have 2 dimensions"),
    ("w_rank", _bad(w=torch.randn(8, 6)), ValueError, "w must have 3 dimensions"),
    ("offs_rank", _bad(offs=torch.tensor([[2, 5, 9]], dtype=torch.int32)), ValueError, "offs must"),
    ("offs_rank0", _bad(offs=torch.tensor(9, dtype=torch.int32)), ValueError, "^offs must have 1 dimensions"),
    ("x_int", _bad(x=torch.ones(10, 8, dtype=torch.int64)), TypeError, "^x must have dtype"),
    ("x_list", _bad(x=[[1.0] * 8] * 10), TypeError, "^x must be a torch.Tensor"),
    ("w_float", _bad(w=1.0), TypeError, "^w must be a torch.Tensor"),
    ("offs_list", _bad(offs=[2, 5, 9]), TypeError, "^offs must be a torch.Tensor"),
    ("K_mismatch", _bad(w=torch.randn(3, 7, 6)), ValueError, r"w\.shape\[1\] must be 8"),
    ("offs_int64", _bad(offs=torch.tensor([2, 5, 9])), TypeError, "offs must have dtype int32"),
    (
        "offs_length",
        _bad(offs=torch.tensor([5, 9], dtype=torch.int32)),
        ValueError,
        r"offs\.shape\[0\] must be 3",
    ),
    (
        "offs_decreasing",
        _bad(offs=torch.tensor([5, 2, 9], dtype=torch.int32)),
        ValueError,
        "offs must be non-decreasing",
    ),
    (
        "offs_negative",
        _bad(offs=torch.tensor([-1, 5, 9], dtype=torch.int32)),
        ValueError,
        "offs must be non-negative",
    ),
    (
        "offs_past_S",
        _bad(offs=torch.tensor([2, 5, 11], dtype=torch.int32)),
        ValueError,
        r"offs\[-1\] must be at most",
    ),
]


@pytest.mark.parametrize(
    "args, error, match", [pytest.param(*b[1:], id=b[0]) for b in BAD_INPUTS]
)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_input_names_the_argument(backend, args, error, match):
    with pytest.raises(error, match=match):
        modekernels.grouped_mm(**args, backend=backend)


@pytest.mark.parametrize(
    "x, dy, offs, error, match",
    [
        pytest.param(
            torch.randn(10, 8),
            torch.randn(9, 6),
            torch.tensor([4, 10], dtype=torch.int32),
            ValueError,
            r"dy\.shape\[0\] must be 10",
            id="dy_rows",
        ),
        pytest.param(
            torch.randn(10, 8),
            torch.randn(10, 6, dtype=torch.float16),
            torch.tensor([4, 10], dtype=torch.int32),
            TypeError,
            "dy must have dtype",
            id="dy_dtype",
        ),
        pytest.param(
            torch.randn(10, 8),
            torch.randn(10, 6),
            torch.tensor([4, 12], dtype=torch.int32),
            ValueError,
            r"offs\[-1\] must be at most",
            id="offs_past_S",
        ),
    ],
)
def test_weight_grad_bad_input_names_the_argument(x, dy, offs, error, match):
    with pytest.raises(error, match=match):
        torch.ops.modekernels.grouped_mm_weight_grad(x, dy, offs, backend="reference")


_ROWS = torch.tensor([0, 3, 3, 1], dtype=torch.int64)


@pytest.mark.parametrize(
    "gather, error, match",
    [
        ({"x_rows": _ROWS.int()}, TypeError, "x_rows must have dtype int64"),
        ({"x_rows": _ROWS[None]}, ValueError, "x_rows must have 1 dimensions"),
        ({"x_rows": torch.tensor([0, 3, 5, 1])}, ValueError, r"x_rows must lie in \[0, 5\)"),
        ({"x_rows": torch.tensor([0, -1, 2, 1])}, ValueError, r"x_rows must lie in \[0, 5\)"),
        ({"x_rows": _ROWS, "dy_rows": _ROWS[:3]}, ValueError, r"dy_rows\.shape\[0\] must be 4"),
        ({"x_rows": _ROWS, "dy_rows": torch.tensor([0, 1, 2, 7])}, ValueError, r"dy_rows must lie in \[0, 4\)"),
        ({"x_rows": _ROWS, "dy_rows": _ROWS, "dy_scale": torch.ones(4).double()}, TypeError, "dy_scale must have dtype float32"),
        ({"x_rows": _ROWS, "dy_rows": _ROWS, "dy_scale": torch.ones(3)}, ValueError, r"dy_scale\.shape\[0\] must be 4"),
    ],
    ids=["x_rows_int32", "x_rows_rank", "x_rows_past_x", "x_rows_negative", "dy_rows_length",
         "dy_rows_past_dy", "dy_scale_dtype", "dy_scale_length"],
)
def test_gathered_weight_grad_bad_input_names_the_argument(gather, error, match):
    x, dy = torch.randn(5, 8), torch.randn(4, 6)
    offs = torch.tensor([2, 4], dtype=torch.int32)
    with pytest.raises(error, match=match):
        torch.ops.modekernels.grouped_mm_weight_grad(x, dy, offs, **gather, backend="reference")


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        modekernels.grouped_mm(**_bad(), backend="cutlass")


def test_unavailable_backend_says_why():
    with pytest.raises(modekernels.BackendUnavailable, match="'cuda'.*needs CUDA tensors"):
        modekernels.grouped_mm(**_bad(), backend="cuda")


# The sm80 CUTLASS 2.x kernels of the cuda backend, forced on any GPU (Hopper included) that can
# run them. Besides CASES: several M, N and K tiles with partial ones, and more groups than one
# warp of the kernel's problem visitor reads at a time.
SM80_CASES = CASES + [
    Case("multi_tile_K136_N264", 136, 264, [300, 0, 129, 1], tail=7),
    Case("many_groups", 32, 40, [(7 * e) % 10 for e in range(45)], tail=3),
]


@pytest.fixture
def sm80_launches(monkeypatch):
    """The cuda backend runs the sm80 kernels wherever they fit; the list collects the kernel
    family of each grouped GEMM launch."""
    from modekernels.cuda import grouped_mm as cuda_grouped_mm

    monkeypatch.setattr(cuda_grouped_mm, "_FORCE_SM80", True)
    launches = []
    real_launch = cuda_grouped_mm._launch

    def recording_launch(op, family, *args, **kwargs):
        launches.append(family)
        return real_launch(op, family, *args, **kwargs)

    monkeypatch.setattr(cuda_grouped_mm, "_launch", recording_launch)
    return launches


def _expected_family(case: Case) -> str:
    """The sm80 kernels take K and N multiples of 8 (16 bytes of 16-bit elements)."""
    return "sm80" if case.K % 8 == 0 and case.N % 8 == 0 else "simt"


@pytest.mark.parametrize("layout", ["contiguous", "linear_weight"])
@pytest.mark.parametrize("case", SM80_CASES, ids=repr)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", backend_params("cuda"))
def test_sm80_forward_matches_float64_reference(sm80_launches, backend, dtype, case, layout):
    x, w_leaf = make_inputs(case, dtype, layout)
    w = as_weight(w_leaf, layout)
    offs = case.offs()
    with poisoned_allocations():
        y = modekernels.grouped_mm(x, w, offs, backend=backend)
    assert_matches(y, reference.grouped_mm(x.double(), w.double(), offs), case.K)
    assert torch.all(y[sum(case.sizes) :] == 0), "rows past offs[-1] must be zero"
    runs_a_kernel = case.S > 0 and case.K > 0 and case.E > 0
    assert sm80_launches == ([_expected_family(case)] if runs_a_kernel else [])


@pytest.mark.parametrize("case", SM80_CASES, ids=repr)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", backend_params("cuda"))
def test_sm80_weight_grad_matches_float64_reference(sm80_launches, backend, dtype, case):
    x, _ = make_inputs(case, dtype)
    dy = torch.randn(case.N, case.S, device=DEVICE).to(dtype).t()  # made contiguous by the op
    offs = case.offs()
    with poisoned_allocations():
        dw = torch.ops.modekernels.grouped_mm_weight_grad(x, dy, offs, backend=backend)
    expected = reference.grouped_mm_weight_grad(x.double(), dy.double(), offs)
    assert_matches(dw, expected, max(case.sizes, default=1))
    for e, size in enumerate(case.sizes):
        if size == 0:
            assert torch.all(dw[e] == 0), f"empty group {e} must get a zero gradient"
    runs_a_kernel = case.S > 0 and case.K > 0 and case.N > 0 and case.E > 0
    assert sm80_launches == ([_expected_family(case)] if runs_a_kernel else [])


@pytest.mark.parametrize(
    "capability, dtype, K, N, first",
    [
        ((9, 0), torch.bfloat16, 64, 128, "cuda"),
        ((9, 0), torch.float16, 64, 128, "cuda"),
        ((9, 0), torch.float32, 64, 128, "triton"),  # cuda would run its CUDA-core kernel
        ((9, 0), torch.bfloat16, 60, 128, "triton"),  # rows of 120 bytes: no TMA
        ((9, 0), torch.bfloat16, 64, 36, "triton"),
        ((8, 0), torch.bfloat16, 64, 128, "triton"),
        ((10, 0), torch.bfloat16, 64, 128, "triton"),
    ],
)
def test_automatic_order_puts_cuda_first_where_cutlass_runs_on_hopper(monkeypatch, capability, dtype, K, N, first):
    from modekernels.ops.grouped_mm import _fastest_first

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    x, w, dy = torch.empty(4, K, dtype=dtype), torch.empty(2, K, N, dtype=dtype), torch.empty(4, N, dtype=dtype)
    offs = torch.tensor([1, 4], dtype=torch.int32)
    gpu = torch.device("cuda", 0)
    assert _fastest_first(gpu, (x, w, offs))[0] == first
    assert _fastest_first(gpu, (x, dy, offs, None, None, None))[0] == first
