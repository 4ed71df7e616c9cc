"""The elementwise steps of moe_mlp's backward (``moe_mlp_act_backward``,
``moe_mlp_gate_backward``) on every backend against float64 autograd / formulas."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, backend_params

from modekernels.ops.moe_mlp_backward import activation_backward_op, gate_backward_op
from modekernels.reference.moe_mlp import activate

ALL_BACKENDS = backend_params("reference", "triton", "cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (S, I): no rows, one row, rows and columns past one block, a single column
SIZES = [(0, 8), (1, 24), (37, 130), (19, 1)]


def _strided(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A (rows, cols) column slice of a wider tensor: unit stride, row stride not cols."""
    return torch.randn(rows, cols + 3, device=DEVICE).to(dtype)[:, 1 : cols + 1]


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("gated", [True, False], ids=["glu", "plain"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_act_backward_matches_float64_autograd(backend, dtype, activation, gated, size, poisoned):
    S, I = size
    pre = _strided(S, 2 * I if gated else I, dtype)
    dh = _strided(S, I, dtype)
    dpre = activation_backward_op(dh, pre, activation, gated, backend)
    assert dpre.dtype == dtype and dpre.shape == pre.shape
    pre64 = pre.double().requires_grad_()
    activate(pre64, activation, gated).backward(dh.double())
    _close(dpre, pre64.grad, dtype)


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gate_backward_matches_float64(backend, dtype, size, poisoned):
    S, I = size
    dh_unscaled, h = _strided(S, I, dtype), _strided(S, I, dtype)
    gate = torch.rand(S, device=DEVICE)
    dh, dot = gate_backward_op(dh_unscaled, h, gate, backend)
    assert dh.dtype == dtype and dot.dtype == torch.float32 and dot.shape == (S,)
    _close(dh, dh_unscaled.double() * gate.double()[:, None], dtype)
    expected_dot = (dh_unscaled.double() * h.double()).sum(1)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(dot.double(), expected_dot, rtol=tol, atol=tol * max(I, 1) ** 0.5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gate_backward_is_deterministic(backend):
    dh_unscaled, h = _strided(64, 300, torch.bfloat16), _strided(64, 300, torch.bfloat16)
    gate = torch.rand(64, device=DEVICE)
    first = gate_backward_op(dh_unscaled, h, gate, backend)
    second = gate_backward_op(dh_unscaled, h, gate, backend)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def _column_major(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A (rows, cols) transposed view: unit stride down the columns."""
    return torch.randn(cols, rows, device=DEVICE).to(dtype).t()


@pytest.mark.parametrize("layout", [_strided, _column_major], ids=["row_slice", "column_major"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_opcheck(backend, layout):
    """Includes the fake kernels' output strides: contiguous whatever the inputs' layout, as every
    backend returns them."""
    pre, dh = layout(9, 2 * 12, torch.float32), layout(9, 12, torch.float32)
    torch.library.opcheck(
        torch.ops.modekernels.moe_mlp_act_backward.default, (dh, pre, "silu", True), {"backend": backend}
    )
    h = layout(9, 12, torch.float32)
    torch.library.opcheck(
        torch.ops.modekernels.moe_mlp_gate_backward.default,
        (dh, h, torch.rand(9, device=DEVICE)),
        {"backend": backend},
    )


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.randn(4, 6), torch.randn(4, 12).half(), "silu", True), TypeError, "dh must have dtype float16"),
        ((torch.randn(4, 6), torch.randn(4, 11), "silu", True), ValueError, "even number"),
        ((torch.randn(4, 5), torch.randn(4, 12), "silu", True), ValueError, r"dh\.shape\[1\] must be 6"),
        ((torch.randn(3, 6), torch.randn(4, 12), "silu", True), ValueError, r"dh\.shape\[0\] must be 4"),
        ((torch.randn(4, 12), torch.randn(4, 12), "tanh", False), ValueError, "activation must be one of"),
        ((torch.randn(4, 12), torch.randn(12), "relu", False), ValueError, "pre must have 2 dimensions"),
    ],
    ids=["dh_dtype", "odd_glu", "dh_columns", "dh_rows", "activation", "pre_rank"],
)
def test_act_backward_bad_input_names_the_argument(args, error, match):
    with pytest.raises(error, match=match):
        activation_backward_op(*args)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.randn(4, 6), torch.randn(4, 6), torch.rand(4).double()), TypeError, "sorted_gate must have dtype float32"),
        ((torch.randn(4, 6), torch.randn(4, 6), torch.rand(3)), ValueError, r"sorted_gate\.shape\[0\] must be 4"),
        ((torch.randn(4, 5), torch.randn(4, 6), torch.rand(4)), ValueError, "dh_unscaled must have h's shape"),
        ((torch.randn(4, 6).half(), torch.randn(4, 6), torch.rand(4)), TypeError, "dh_unscaled must have dtype float32"),
    ],
    ids=["gate_dtype", "gate_length", "shape", "dtype"],
)
def test_gate_backward_bad_input_names_the_argument(args, error, match):
    with pytest.raises(error, match=match):
        gate_backward_op(*args)
