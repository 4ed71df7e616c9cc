"""The host code of the ``cuda`` backend (``modekernels/cuda/*.py``) without a GPU: every
``modekernels._C`` entry is replaced by an emulator that reads and writes the CPU tensors through
the raw pointers, shapes and element strides it is given, with the semantics ``csrc/*.h``
documents. A wrong pointer, stride, layout, size or dtype code on the Python side then shows up
as a result that differs from the reference; the Hopper emulators also enforce the C++ kernels'
TMA preconditions, so the Python kernel choice must never pick a call the kernel would refuse.
The kernels themselves are checked on a GPU by the op tests."""

import contextlib
import ctypes
import types

import pytest
import torch

pytest.importorskip("modekernels._C", reason="the CUDA extension is not built here")

from modekernels.cuda import grouped_mm as cuda_grouped_mm  # noqa: E402
from modekernels.cuda import moe_mlp as cuda_moe_mlp  # noqa: E402
from modekernels.cuda import neutral_residue as cuda_neutral_residue  # noqa: E402
from modekernels.reference import grouped_mm as ref_grouped_mm  # noqa: E402
from modekernels.reference import moe_mlp as ref_moe_mlp  # noqa: E402
from modekernels.reference import neutral_residue as ref_neutral_residue  # noqa: E402

DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}
ACTIVATIONS = {0: "identity", 1: "silu", 2: "gelu", 3: "relu"}
GATES = {0: "none", 1: "relu", 2: "sigmoid"}


def _view(address: int, dtype: torch.dtype, shape: tuple, strides: tuple) -> torch.Tensor:
    """The CPU memory at ``address`` seen as a tensor of ``shape`` with element ``strides``, as a
    kernel given these arguments reads it (writes go to the caller's tensor)."""
    if any(n == 0 for n in shape):
        return torch.empty(shape, dtype=dtype)
    assert address != 0 and all(s >= 0 for s in strides)
    span = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    itemsize = torch.empty((), dtype=dtype).element_size()
    memory = (ctypes.c_char * (span * itemsize)).from_address(address)
    return torch.frombuffer(memory, dtype=dtype).as_strided(shape, strides)


def _require_tma(dtype: int, pointers: tuple, strides: tuple, unit_strides: bool) -> None:
    """The preconditions the sm90 entry points check (csrc/grouped_mm_sm90.cuh)."""
    per_16_bytes = 16 // DTYPES[dtype].itemsize
    if not (dtype != 0 and unit_strides and all(p % 16 == 0 for p in pointers)
            and all(s % per_16_bytes == 0 for s in strides)):
        raise ValueError("the sm90 kernel refuses these arguments")


class FakeC:
    """``modekernels._C`` emulated on CPU tensors; ``calls`` lists the entry points run."""

    def __init__(self):
        self.calls: list[str] = []

    def has_sm90_kernels(self):
        return True

    def grouped_mm_sm90_workspace_size(self, E, dtype, sm_count):
        return 256 + 128 * E + 64 * sm_count

    def _forward(self, x, w, offs, y, S, K, N, E, x_stride_s, x_stride_k, w_stride_e,
                 w_stride_k, w_stride_n, dtype, stream):
        dt = DTYPES[dtype]
        result = ref_grouped_mm.grouped_mm(
            _view(x, dt, (S, K), (x_stride_s, x_stride_k)),
            _view(w, dt, (E, K, N), (w_stride_e, w_stride_k, w_stride_n)),
            _view(offs, torch.int32, (E,), (1,)),
        )
        _view(y, dt, (S, N), (N, 1)).copy_(result)

    def _weight_grad(self, x, dy, offs, dw, S, K, N, E, x_stride_s, x_stride_k, dy_stride_s,
                     dy_stride_n, dtype, stream):
        dt = DTYPES[dtype]
        result = ref_grouped_mm.grouped_mm_weight_grad(
            _view(x, dt, (S, K), (x_stride_s, x_stride_k)),
            _view(dy, dt, (S, N), (dy_stride_s, dy_stride_n)),
            _view(offs, torch.int32, (E,), (1,)),
        )
        _view(dw, dt, (E, K, N), (K * N, N, 1)).copy_(result)

    def grouped_mm_simt(self, **a):
        self.calls.append("grouped_mm_simt")
        self._forward(**a)

    def grouped_mm_weight_grad_simt(self, **a):
        self.calls.append("grouped_mm_weight_grad_simt")
        self._weight_grad(**a)

    def grouped_mm_sm90(self, *, workspace, workspace_bytes, sm_count, **a):
        self.calls.append("grouped_mm_sm90")
        row_major = a["w_stride_n"] == 1
        ldw = a["w_stride_k"] if row_major else a["w_stride_n"]
        _require_tma(a["dtype"], (a["x"], a["w"], a["y"]),
                     (a["x_stride_s"], a["w_stride_e"], ldw, a["N"]),
                     a["x_stride_k"] == 1 and (row_major or a["w_stride_k"] == 1))
        assert workspace_bytes >= self.grouped_mm_sm90_workspace_size(a["E"], a["dtype"], sm_count)
        self._forward(**a)

    def grouped_mm_weight_grad_sm90(self, *, workspace, workspace_bytes, sm_count, **a):
        self.calls.append("grouped_mm_weight_grad_sm90")
        _require_tma(a["dtype"], (a["x"], a["dy"], a["dw"]),
                     (a["x_stride_s"], a["dy_stride_s"], a["N"]),
                     a["x_stride_k"] == 1 and a["dy_stride_n"] == 1)
        assert workspace_bytes >= self.grouped_mm_sm90_workspace_size(a["E"], a["dtype"], sm_count)
        self._weight_grad(**a)

    def gather_rows(self, x, T, K, x_stride_t, x_stride_k, perm, S, top_k, dst, element_bytes,
                    stream):
        word = {2: torch.int16, 4: torch.int32}[element_bytes]
        tokens = _view(perm, torch.int64, (S,), (1,)) // top_k
        rows = _view(x, word, (T, K), (x_stride_t, x_stride_k))[tokens]
        _view(dst, word, (S, K), (K, 1)).copy_(rows)

    def moe_mlp_up_epilogue(self, pre, bias, bias_stride_e, bias_stride_n, offs, S, E, I, gated,
                            activation, keep, h, dtype, stream):
        dt = DTYPES[dtype]
        n1 = 2 * I if gated else I
        pre_rows = _view(pre, dt, (S, n1), (n1, 1))
        h_rows = _view(h, dt, (S, I), (I, 1))
        h_rows.zero_()
        bounds = ref_grouped_mm.group_bounds(_view(offs, torch.int32, (E,), (1,)))
        for e, (start, end) in enumerate(bounds):
            u = pre_rows[start:end].float()
            if bias:
                u = u + _view(bias, dt, (E, n1), (bias_stride_e, bias_stride_n))[e].float()
                if keep:
                    pre_rows[start:end] = u.to(dt)
            h_rows[start:end] = ref_moe_mlp.activate(u, ACTIVATIONS[activation], gated).to(dt)

    def moe_mlp_down_combine(self, out, perm, offs, S, E, N, T, top_k, bias, bias_stride_e,
                             bias_stride_n, gate, slot_row, slot_expert, y, dtype, stream):
        dt = DTYPES[dtype]
        rows = _view(out, dt, (S, N), (N, 1)).float()
        slots = _view(perm, torch.int64, (S,), (1,))
        gates = _view(gate, torch.float32, (S,), (1,))
        by_slot = torch.zeros(S, N)
        bounds = ref_grouped_mm.group_bounds(_view(offs, torch.int32, (E,), (1,)))
        for e, (start, end) in enumerate(bounds):
            o = rows[start:end]
            if bias:
                o = o + _view(bias, dt, (E, N), (bias_stride_e, bias_stride_n))[e].float()
            by_slot[slots[start:end]] = gates[slots[start:end], None] * o
        _view(y, dt, (T, N), (N, 1)).copy_(by_slot.view(T, top_k, N).sum(1))

    def neutral_residue_gate(self, x, T, d, x_stride_t, x_stride_d, w_gate, w_gate_stride,
                             b_gate, gate, g, dtype, stream):
        dt = DTYPES[dtype]
        z = _view(x, dt, (T, d), (x_stride_t, x_stride_d)).float() @ _view(
            w_gate, dt, (d,), (w_gate_stride,)).float()
        if b_gate:
            z = z + _view(b_gate, dt, (), ()).float()
        _view(g, torch.float32, (T,), (1,)).copy_(ref_neutral_residue.apply_gate(z, GATES[gate]))

    def neutral_residue_project_epilogue(self, pre, T, d_a, glu, b_in, b_glu, activation, keep,
                                         skip_gate, h, dtype, stream):
        dt = DTYPES[dtype]
        halves = 2 if glu else 1
        pre_rows = _view(pre, dt, (T, halves * d_a), (halves * d_a, 1))
        biases = [b_in] + ([b_glu] if glu else [])
        parts = []
        for i, b in enumerate(biases):
            part = pre_rows[:, i * d_a:(i + 1) * d_a].float()
            if b:
                part = part + _view(b, dt, (d_a,), (1,)).float()
                if keep:
                    pre_rows[:, i * d_a:(i + 1) * d_a] = part.to(dt)
            parts.append(part)
        h_rows = ref_moe_mlp.activate(torch.cat(parts, 1), ACTIVATIONS[activation], glu)
        if skip_gate:
            h_rows[_view(skip_gate, torch.float32, (T,), (1,)) == 0] = 0
        _view(h, dt, (T, d_a), (d_a, 1)).copy_(h_rows)

    def neutral_residue_output_epilogue(self, a, T, d, b_out, g, residual, residual_stride_t,
                                        residual_stride_d, y, l1, dtype, stream):
        dt = DTYPES[dtype]
        out = _view(a, dt, (T, d), (d, 1)).float()
        if b_out:
            out = out + _view(b_out, dt, (d,), (1,)).float()
        gv = _view(g, torch.float32, (T,), (1,)) if g else torch.ones(T)
        off = (gv == 0)[:, None]
        y_a = torch.where(off, 0.0, gv[:, None] * out)
        result = y_a
        if residual:
            r = _view(residual, dt, (T, d), (residual_stride_t, residual_stride_d)).float()
            result = torch.where(off, r, r + y_a)
        _view(y, dt, (T, d), (d, 1)).copy_(result)
        _view(l1, torch.float32, (T,), (1,)).copy_(y_a.abs().sum(1))

    def neutral_residue_glu_backward(self, pre, pre_stride_t, pre_stride_a, dh, dh_stride_t,
                                     dh_stride_a, g, extra, T, d_a, glu, activation, gate, gh,
                                     dpre, dtype, stream):
        dt = DTYPES[dtype]
        n_pre = 2 * d_a if glu else d_a
        gh_rows, dpre_rows = ref_neutral_residue.glu_backward(
            _view(pre, dt, (T, n_pre), (pre_stride_t, pre_stride_a)),
            _view(dh, dt, (T, d_a), (dh_stride_t, dh_stride_a)),
            _view(g, torch.float32, (T,), (1,)), _view(extra, torch.float32, (T,), (1,)),
            ACTIVATIONS[activation], glu, GATES[gate],
        )
        _view(gh, dt, (T, d_a), (d_a, 1)).copy_(gh_rows)
        columns = dpre_rows.shape[1]
        assert columns == n_pre + (gate != 0)
        _view(dpre, dt, (T, columns), (columns, 1)).copy_(dpre_rows)


@pytest.fixture
def fake_c(monkeypatch):
    """The cuda backend's modules run on CPU tensors over :class:`FakeC` (a Hopper GPU by
    default: ``monkeypatch.setattr(cuda_grouped_mm, "_device_facts", ...)`` to change it)."""
    fake = FakeC()
    for module in (cuda_grouped_mm, cuda_moe_mlp, cuda_neutral_residue):
        monkeypatch.setattr(module, "_C", fake)
    for module in (cuda_moe_mlp, cuda_neutral_residue):
        monkeypatch.setattr(module, "current_stream", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream",
                        lambda device=None: types.SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(cuda_grouped_mm, "_device_facts", lambda index: (90, 132))
    return fake


def _weight(layout: str, E: int, K: int, N: int, dtype: torch.dtype) -> torch.Tensor:
    """(E, K, N): contiguous, the transposed view of (E, N, K), or with no unit stride."""
    if layout == "transposed":
        return torch.randn(E, N, K, dtype=dtype).transpose(1, 2)
    if layout == "strided":
        return torch.randn(E, K, 2 * N, dtype=dtype)[:, :, ::2]
    return torch.randn(E, K, N, dtype=dtype)


OFFS = torch.tensor([3, 3, 9, 11], dtype=torch.int32)  # an empty group; rows 11, 12 in none
S = 13


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("dtype,K,N,sm,hopper", [
    (torch.bfloat16, 16, 24, 90, True),
    (torch.float16, 16, 24, 90, True),
    (torch.bfloat16, 12, 24, 90, False),  # rows of 24 bytes: not TMA aligned
    (torch.bfloat16, 16, 20, 90, False),
    (torch.float32, 16, 24, 90, False),
    (torch.bfloat16, 16, 24, 80, False),
])
def test_grouped_mm_passes_layouts_and_picks_the_kernel(
    fake_c, monkeypatch, poisoned, layout, dtype, K, N, sm, hopper
):
    monkeypatch.setattr(cuda_grouped_mm, "_device_facts", lambda index: (sm, 132))
    x = torch.randn(S, K, dtype=dtype)
    w = _weight(layout, len(OFFS), K, N, dtype)
    y = cuda_grouped_mm.grouped_mm(x, w, OFFS)
    torch.testing.assert_close(y, ref_grouped_mm.grouped_mm(x, w, OFFS), rtol=0, atol=0)
    assert fake_c.calls == ["grouped_mm_sm90" if hopper else "grouped_mm_simt"]


@pytest.mark.parametrize("dtype,K,N,hopper", [
    (torch.bfloat16, 16, 24, True),
    (torch.bfloat16, 16, 20, False),
    (torch.float32, 16, 24, False),
])
@pytest.mark.parametrize("strided", [False, True])
def test_grouped_mm_weight_grad_passes_layouts_and_picks_the_kernel(
    fake_c, poisoned, dtype, K, N, hopper, strided
):
    x = torch.randn(S, K, dtype=dtype)
    dy = torch.randn(2 * S, N, dtype=dtype)[::2] if strided else torch.randn(S, N, dtype=dtype)
    dw = cuda_grouped_mm.grouped_mm_weight_grad(x, dy, OFFS)
    torch.testing.assert_close(
        dw, ref_grouped_mm.grouped_mm_weight_grad(x, dy, OFFS), rtol=0, atol=0
    )
    assert fake_c.calls == [
        "grouped_mm_weight_grad_sm90" if hopper else "grouped_mm_weight_grad_simt"
    ]


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_mlp_stages_match_the_reference(fake_c, poisoned, gated, dtype):
    T, k, E, H, inner = 5, 2, 3, 16, 8
    n1 = 2 * inner if gated else inner
    x = torch.randn(T, 2 * H, dtype=dtype)[:, ::2]  # strided columns
    w1 = torch.randn(E, n1, H, dtype=dtype).transpose(1, 2)  # the nn.Linear layout
    b1 = torch.randn(n1, E, dtype=dtype).t()  # (E, n1), non-contiguous
    w2 = torch.randn(E, inner, H, dtype=dtype)
    b2 = torch.randn(E, H, dtype=dtype)
    gate = torch.rand(T, k, dtype=dtype)
    perm = torch.randperm(T * k)
    offs = torch.tensor([4, 4, 7], dtype=torch.int32)  # an empty expert; slots 7..9 in none
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)

    h, pre = cuda_moe_mlp.moe_mlp_up(x, perm, offs, w1, b1, "silu", gated, k, True)
    h_ref, pre_ref = ref_moe_mlp.moe_mlp_up(x, perm, offs, w1, b1, "silu", gated, k, True)
    torch.testing.assert_close(pre, pre_ref, **tol)
    torch.testing.assert_close(h, h_ref, **tol)
    assert fake_c.calls == ["grouped_mm_simt" if dtype == torch.float32 else "grouped_mm_sm90"]
    y = cuda_moe_mlp.moe_mlp_down(h_ref, perm, offs, w2, b2, gate)
    torch.testing.assert_close(y, ref_moe_mlp.moe_mlp_down(h_ref, perm, offs, w2, b2, gate), **tol)


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("gate", ["relu", "sigmoid", "none"])
@pytest.mark.parametrize("sparse", [False, True])
def test_neutral_residue_forward_and_backward_match_the_reference(fake_c, poisoned, glu, gate,
                                                                  sparse):
    T, d, d_a = 7, 16, 8
    x = torch.randn(T, d)
    w_in, w_glu = torch.randn(d_a, d), (torch.randn(d_a, d) if glu else None)
    w_out = torch.randn(d_a, d).t()  # (d, d_a), non-contiguous
    w_gate = torch.randn(d) if gate != "none" else None
    b_gate = torch.tensor(0.1) if gate != "none" else None
    b_in, b_glu, b_out = torch.randn(d_a), (torch.randn(d_a) if glu else None), torch.randn(d)
    residual = torch.randn(d, T).t()  # (T, d), non-contiguous
    args = (x, w_in, w_glu, w_out, w_gate, b_gate, b_in, b_glu, b_out, residual, "gelu", gate,
            sparse, True)
    outputs = cuda_neutral_residue.neutral_residue(*args)
    expected = ref_neutral_residue.neutral_residue(*args)
    if gate == "relu":
        assert 0 < int((expected[1] == 0).sum()) < T  # rows gated off and on
    for name, actual, wanted in zip(("y", "g", "l1", "pre"), outputs, expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5, msg=name)

    dy, dg, dl1 = torch.randn(T, d), torch.randn(T), torch.randn(T)
    common = (dy, dg, dl1, x, w_in, w_glu, w_out, w_gate, b_out, expected[1], expected[3],
              "gelu", gate)
    grads = cuda_neutral_residue.neutral_residue_backward(*common)
    for actual, wanted in zip(grads, ref_neutral_residue.neutral_residue_backward(*common)):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)
    assert fake_c.calls.count("grouped_mm_simt") == 2


def test_sizes_past_32_bits_take_the_generic_kernel(fake_c):
    """The sm90 kernels' problem shapes are 32-bit: larger operands go to the generic kernel."""
    rows = torch.empty(1, 8, dtype=torch.bfloat16).expand(2**31, 8)  # no memory behind the rows
    assert not cuda_grouped_mm._hopper_kernels_fit(90, torch.bfloat16, (rows,), ())
    assert cuda_grouped_mm._hopper_kernels_fit(90, torch.bfloat16, (rows[: 2**31 - 1],), ())
    assert not cuda_grouped_mm._hopper_kernels_fit(90, torch.bfloat16, (rows[:8],), (2**31,))
