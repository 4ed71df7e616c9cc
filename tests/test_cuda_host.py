"""The host code of the ``cuda`` backend (``modekernels/cuda/*.py``) without a GPU: every
``modekernels._C`` entry is replaced by an emulator that reads and writes the CPU tensors through
the raw pointers, shapes and element strides it is given, with the semantics ``csrc/*.h``
documents. A wrong pointer, stride, layout, size or dtype code on the Python side then shows up
as a result that differs from the reference; the CUTLASS (sm90, sm80) emulators also enforce the
C++ kernels' alignment preconditions, so the Python kernel choice must never pick a call the
kernel would refuse. The
real sm80 and sm90 entry points are also called with arguments they must refuse on the host,
before any launch. The kernels themselves are checked on a GPU by the op tests."""

import contextlib
import ctypes
import types

import pytest
import torch

REAL_C = pytest.importorskip("modekernels._C", reason="the CUDA extension is not built here")

from modekernels.cuda import grouped_mm as cuda_grouped_mm  # noqa: E402
from modekernels.cuda import moe_mlp as cuda_moe_mlp  # noqa: E402
from modekernels.cuda import neutral_residue as cuda_neutral_residue  # noqa: E402
from modekernels.cuda import routing as cuda_routing  # noqa: E402
from modekernels.reference import grouped_mm as ref_grouped_mm  # noqa: E402
from modekernels.reference import moe_mlp as ref_moe_mlp  # noqa: E402
from modekernels.reference import neutral_residue as ref_neutral_residue  # noqa: E402
from modekernels.reference import routing as ref_routing  # noqa: E402

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


def _require_aligned(kernel: str, dtype: int, pointers: tuple, strides: tuple,
                     unit_strides: bool) -> None:
    """The preconditions the CUTLASS entry points check (csrc/grouped_mm_sm90.cuh,
    csrc/grouped_mm_sm80.cuh): 16-bit, unit strides, 16-byte aligned pointers and ``strides``."""
    per_16_bytes = 16 // DTYPES[dtype].itemsize
    if not (dtype != 0 and unit_strides and all(p % 16 == 0 for p in pointers)
            and all(s % per_16_bytes == 0 for s in strides)):
        raise ValueError(f"the {kernel} kernel refuses these arguments")


def _forward_requirements(a: dict) -> tuple:
    """(pointers, strides, unit strides) the CUTLASS forward kernels check."""
    row_major = a["w_stride_n"] == 1
    ldw = a["w_stride_k"] if row_major else a["w_stride_n"]
    return ((a["x"], a["w"], a["y"]), (a["x_stride_s"], a["w_stride_e"], ldw, a["N"]),
            a["x_stride_k"] == 1 and (row_major or a["w_stride_k"] == 1))


def _weight_grad_requirements(a: dict) -> tuple:
    """(pointers, strides, unit strides) the CUTLASS weight-gradient kernels check."""
    return ((a["x"], a["dy"], a["dw"]), (a["x_stride_s"], a["dy_stride_s"], a["N"]),
            a["x_stride_k"] == 1 and a["dy_stride_n"] == 1)


class FakeC:
    """``modekernels._C`` emulated on CPU tensors; ``calls`` lists the entry points run."""

    def __init__(self):
        self.calls: list[str] = []
        self.sm_counts: list[int] = []  # what each CUTLASS call was given

    def has_sm90_kernels(self):
        return True

    def grouped_mm_sm90_workspace_size(self, E, dtype, sm_count):
        return 256 + 128 * E + 64 * sm_count

    def grouped_mm_sm80_workspace_size(self, E, dtype):
        return 384 + 96 * E

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
        pointers, strides, unit = _forward_requirements(a)
        _require_aligned("sm90", a["dtype"], pointers, strides, unit)
        assert workspace_bytes >= self.grouped_mm_sm90_workspace_size(a["E"], a["dtype"], sm_count)
        self.sm_counts.append(sm_count)
        self._forward(**a)

    def grouped_mm_weight_grad_sm90(self, *, workspace, workspace_bytes, sm_count, **a):
        self.calls.append("grouped_mm_weight_grad_sm90")
        _require_aligned("sm90", a["dtype"], *_weight_grad_requirements(a))
        assert workspace_bytes >= self.grouped_mm_sm90_workspace_size(a["E"], a["dtype"], sm_count)
        self.sm_counts.append(sm_count)
        self._weight_grad(**a)

    def grouped_mm_sm80(self, *, workspace, workspace_bytes, sm_count, **a):
        """The sm90 preconditions, and K and N multiples of 16 bytes."""
        self.calls.append("grouped_mm_sm80")
        pointers, strides, unit = _forward_requirements(a)
        _require_aligned("sm80", a["dtype"], pointers, (*strides, a["K"]), unit)
        assert workspace != 0 and workspace_bytes >= self.grouped_mm_sm80_workspace_size(
            a["E"], a["dtype"])
        self.sm_counts.append(sm_count)
        self._forward(**a)

    def grouped_mm_weight_grad_sm80(self, *, workspace, workspace_bytes, sm_count, **a):
        """The sm90 preconditions, and K and N multiples of 16 bytes."""
        self.calls.append("grouped_mm_weight_grad_sm80")
        pointers, strides, unit = _weight_grad_requirements(a)
        _require_aligned("sm80", a["dtype"], pointers, (*strides, a["K"]), unit)
        assert workspace != 0 and workspace_bytes >= self.grouped_mm_sm80_workspace_size(
            a["E"], a["dtype"])
        self.sm_counts.append(sm_count)
        self._weight_grad(**a)

    def gather_rows(self, x, T, K, x_stride_t, x_stride_k, perm, S, top_k, dst, element_bytes,
                    stream):
        word = {2: torch.int16, 4: torch.int32}[element_bytes]
        slots = _view(perm, torch.int64, (S,), (1,))
        tokens = torch.where(slots >= 0, slots // top_k, -1)
        valid = (tokens >= 0) & (tokens < T)  # a slot of no token gives a zero row, as the C++
        rows = _view(x, word, (T, K), (x_stride_t, x_stride_k))[tokens.clamp(0, max(T - 1, 0))]
        _view(dst, word, (S, K), (K, 1)).copy_(torch.where(valid[:, None], rows, 0))

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
        assert GATES[gate] != "none", "the C++ gate kernel refuses gate 'none'"
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
        assert gate == 0 or (g and extra), "a gated block needs g and extra"
        gh_rows, dpre_rows = ref_neutral_residue.glu_backward(
            _view(pre, dt, (T, n_pre), (pre_stride_t, pre_stride_a)),
            _view(dh, dt, (T, d_a), (dh_stride_t, dh_stride_a)),
            _view(g, torch.float32, (T,), (1,)) if g else torch.ones(T),  # null: a unit gate
            _view(extra, torch.float32, (T,), (1,)) if extra else torch.zeros(T),
            ACTIVATIONS[activation], glu, GATES[gate],
        )
        if gh:  # null: not stored
            _view(gh, dt, (T, d_a), (d_a, 1)).copy_(gh_rows)
        columns = dpre_rows.shape[1]
        assert columns == n_pre + (gate != 0)
        _view(dpre, dt, (T, columns), (columns, 1)).copy_(dpre_rows)

    def routing_rows_per_chunk(self, entries):
        return REAL_C.routing_rows_per_chunk(entries)

    def routing_workspace_size(self, entries, E, rows_per_chunk):
        return REAL_C.routing_workspace_size(entries=entries, E=E, rows_per_chunk=rows_per_chunk)

    def route_top1(self, logits, T, E, stride_t, stride_e, dtype, capacity, rows_per_chunk, gate,
                   aux_loss, z_loss, lse, expert_idx, perm, offs, tokens_per_expert, dropped,
                   routed, workspace, workspace_bytes, stream):
        assert workspace != 0 and workspace_bytes >= self.routing_workspace_size(
            T, E, rows_per_chunk)
        dt = DTYPES[dtype]
        results = ref_routing.route_top1(_view(logits, dt, (T, E), (stride_t, stride_e)), capacity)
        # What csrc/routing.h writes: each output contiguous, in these dtypes.
        outputs = [(gate, dt, (T,)), (aux_loss, torch.float32, ()), (z_loss, torch.float32, ()),
                   (lse, torch.float32, (T,)), (expert_idx, torch.int64, (T,)),
                   (perm, torch.int64, (T,)), (offs, torch.int32, (E,)),
                   (tokens_per_expert, torch.int32, (E,)), (dropped, torch.bool, (T,)),
                   (routed, torch.int32, (E,))]
        for (address, dt_out, shape), value in zip(outputs, results):
            _view(address, dt_out, shape, (1,) * len(shape)).copy_(value)

    def sort_by_expert(self, idx, idx_is_int64, n, E, rows_per_chunk, perm, offs, workspace,
                       workspace_bytes, stream):
        assert workspace != 0 and workspace_bytes >= self.routing_workspace_size(
            n, E, rows_per_chunk)
        flat = _view(idx, torch.int64 if idx_is_int64 else torch.int32, (n,), (1,))
        sorted_perm, sorted_offs = ref_routing.sort_by_expert(flat, E)
        _view(perm, torch.int64, (n,), (1,)).copy_(sorted_perm)
        _view(offs, torch.int32, (E,), (1,)).copy_(sorted_offs)

    def route_top1_backward(self, logits, T, E, stride_t, stride_e, dtype, lse, expert_idx,
                            dropped, routed, grad_gate, grad_aux, grad_z, grad, stream):
        dt = DTYPES[dtype]
        result = ref_routing.route_top1_backward(
            _view(logits, dt, (T, E), (stride_t, stride_e)), _view(lse, torch.float32, (T,), (1,)),
            _view(expert_idx, torch.int64, (T,), (1,)), _view(dropped, torch.bool, (T,), (1,)),
            _view(routed, torch.int32, (E,), (1,)), _view(grad_gate, torch.float32, (T,), (1,)),
            _view(grad_aux, torch.float32, (), ()), _view(grad_z, torch.float32, (), ()),
        )
        _view(grad, dt, (T, E), (E, 1)).copy_(result)

    def moe_mlp_gate_backward(self, a, a_stride_s, a_stride_i, h, h_stride_s, h_stride_i, scale,
                              S, I, dh, dot, dtype, stream):
        dt = DTYPES[dtype]
        dh_rows, dots = ref_moe_mlp.gate_backward(
            _view(a, dt, (S, I), (a_stride_s, a_stride_i)),
            _view(h, dt, (S, I), (h_stride_s, h_stride_i)), _view(scale, torch.float32, (S,), (1,)),
        )
        _view(dh, dt, (S, I), (I, 1)).copy_(dh_rows)
        _view(dot, torch.float32, (S,), (1,)).copy_(dots)


@pytest.fixture
def fake_c(monkeypatch):
    """The cuda backend's modules run on CPU tensors over :class:`FakeC` (a Hopper GPU by
    default: ``monkeypatch.setattr(cuda_grouped_mm, "_device_facts", ...)`` to change it)."""
    fake = FakeC()
    for module in (cuda_grouped_mm, cuda_moe_mlp, cuda_neutral_residue, cuda_routing):
        monkeypatch.setattr(module, "_C", fake)
    for module in (cuda_moe_mlp, cuda_neutral_residue, cuda_routing):
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


# (dtype, K, N, compute capability, forced sm80 kernels) -> the kernel family that must run
KERNEL_CHOICES = [
    (torch.bfloat16, 16, 24, 90, False, "sm90"),
    (torch.float16, 16, 24, 90, False, "sm90"),
    (torch.bfloat16, 16, 24, 90, True, "sm80"),
    (torch.float16, 16, 24, 90, True, "sm80"),
    (torch.bfloat16, 12, 24, 90, False, "simt"),  # rows of 24 bytes: not 16-byte aligned
    (torch.bfloat16, 12, 24, 90, True, "simt"),
    (torch.bfloat16, 16, 20, 90, False, "simt"),
    (torch.float32, 16, 24, 90, False, "simt"),
    (torch.float32, 16, 24, 90, True, "simt"),
    (torch.bfloat16, 16, 24, 80, False, "sm80"),
    (torch.float16, 16, 24, 86, False, "sm80"),
    (torch.bfloat16, 24, 8, 89, False, "sm80"),
    (torch.bfloat16, 16, 24, 100, False, "sm80"),
    (torch.float16, 16, 24, 120, False, "sm80"),
    (torch.bfloat16, 12, 24, 80, False, "simt"),
    (torch.bfloat16, 16, 20, 80, False, "simt"),
    (torch.float16, 16, 36, 86, False, "simt"),
    (torch.float32, 16, 24, 80, False, "simt"),
]


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("dtype,K,N,sm,forced,family", KERNEL_CHOICES)
def test_grouped_mm_passes_layouts_and_picks_the_kernel(
    fake_c, monkeypatch, poisoned, layout, dtype, K, N, sm, forced, family
):
    monkeypatch.setattr(cuda_grouped_mm, "_device_facts", lambda index: (sm, 108))
    monkeypatch.setattr(cuda_grouped_mm, "_FORCE_SM80", forced)
    x = torch.randn(S, K, dtype=dtype)
    w = _weight(layout, len(OFFS), K, N, dtype)
    y = cuda_grouped_mm.grouped_mm(x, w, OFFS)
    torch.testing.assert_close(y, ref_grouped_mm.grouped_mm(x, w, OFFS), rtol=0, atol=0)
    assert fake_c.calls == [f"grouped_mm_{family}"]
    assert fake_c.sm_counts == ([] if family == "simt" else [108])


@pytest.mark.parametrize("dtype,K,N,sm,forced,family", KERNEL_CHOICES)
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_mm_weight_grad_passes_layouts_and_picks_the_kernel(
    fake_c, monkeypatch, poisoned, dtype, K, N, sm, forced, family, strided, transposed
):
    """transposed=True: the same kernel, given the operands swapped (dwᵀ = DYᵀ·X, the (E, N, K)
    the kernels write row-major), and its result as the transposed view."""
    monkeypatch.setattr(cuda_grouped_mm, "_device_facts", lambda index: (sm, 108))
    monkeypatch.setattr(cuda_grouped_mm, "_FORCE_SM80", forced)
    x = torch.randn(S, K, dtype=dtype)
    dy = torch.randn(2 * S, N, dtype=dtype)[::2] if strided else torch.randn(S, N, dtype=dtype)
    dw = cuda_grouped_mm.grouped_mm_weight_grad(x, dy, OFFS, transposed=transposed)
    exactly = {} if transposed else {"rtol": 0, "atol": 0}  # swapped: CPU sums may reorder
    torch.testing.assert_close(dw, ref_grouped_mm.grouped_mm_weight_grad(x, dy, OFFS), **exactly)
    layout = torch.empty(len(OFFS), N, K).transpose(1, 2) if transposed else torch.empty(len(OFFS), K, N)
    assert dw.stride() == layout.stride()
    assert fake_c.calls == [f"grouped_mm_weight_grad_{family}"]
    assert fake_c.sm_counts == ([] if family == "simt" else [108])


def test_hopper_gpu_without_the_90a_kernels_takes_the_sm80_ones(fake_c, monkeypatch):
    """A build without 90a still runs Hopper on tensor cores (the sm80 kernels' PTX)."""
    monkeypatch.setattr(fake_c, "has_sm90_kernels", lambda: False)
    x, w = torch.randn(S, 16, dtype=torch.bfloat16), torch.randn(4, 16, 24, dtype=torch.bfloat16)
    y = cuda_grouped_mm.grouped_mm(x, w, OFFS)
    torch.testing.assert_close(y, ref_grouped_mm.grouped_mm(x, w, OFFS), rtol=0, atol=0)
    assert fake_c.calls == ["grouped_mm_sm80"]


def test_sm80_kernels_refuse_what_the_choice_never_sends():
    """The emulated sm80 preconditions hold the C++ ones: K and N multiples of 8 elements."""
    fake = FakeC()
    x, w = torch.randn(S, 12, dtype=torch.bfloat16), torch.randn(1, 12, 24, dtype=torch.bfloat16)
    y = torch.empty(S, 24, dtype=torch.bfloat16)
    offs = torch.tensor([S], dtype=torch.int32)
    with pytest.raises(ValueError, match="sm80 kernel refuses"):
        fake.grouped_mm_sm80(
            x=x.data_ptr(), w=w.data_ptr(), offs=offs.data_ptr(), y=y.data_ptr(), S=S, K=12,
            N=24, E=1, x_stride_s=16, x_stride_k=1, w_stride_e=288, w_stride_k=24, w_stride_n=1,
            dtype=2, workspace=1, workspace_bytes=1 << 10, sm_count=1, stream=0)


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


def test_moe_mlp_identity_stage_skips_the_epilogue(fake_c, poisoned, monkeypatch):
    """The backward's gathered dy·w2ᵀ (identity, no bias, no GLU, pre not kept) is the grouped
    GEMM's output itself: no epilogue pass runs."""
    T, k, E, H, N = 5, 2, 3, 16, 8
    x, w = torch.randn(T, H, dtype=torch.bfloat16), torch.randn(E, H, N, dtype=torch.bfloat16)
    perm, offs = torch.randperm(T * k), torch.tensor([4, 4, 7], dtype=torch.int32)

    def no_epilogue(**kwargs):
        raise AssertionError("the identity stage must not run the epilogue")

    monkeypatch.setattr(fake_c, "moe_mlp_up_epilogue", no_epilogue)
    h, pre = cuda_moe_mlp.moe_mlp_up(x, perm, offs, w, None, "identity", False, k, False)
    h_ref, _ = ref_moe_mlp.moe_mlp_up(x, perm, offs, w, None, "identity", False, k, False)
    torch.testing.assert_close(h, h_ref, rtol=2e-2, atol=2e-2)
    assert pre.shape == (0, N)


def test_moe_mlp_gate_backward_matches_the_reference(fake_c, poisoned):
    S, inner = 9, 12
    dh_unscaled = torch.randn(S, inner + 3)[:, :inner]  # strided rows
    h, gate = torch.randn(inner, S).t(), torch.rand(S)  # h column-major
    got = cuda_moe_mlp.gate_backward(dh_unscaled, h, gate)
    want = ref_moe_mlp.gate_backward(dh_unscaled, h, gate)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
def test_moe_mlp_activation_backward_matches_the_reference(fake_c, poisoned, activation, gated):
    S, inner = 9, 12
    pre = torch.randn(S, 2 * inner + 3)[:, : 2 * inner if gated else inner]  # strided rows
    dh = torch.randn(S, inner)
    got = cuda_moe_mlp.activation_backward(dh, pre, activation, gated)
    want = ref_moe_mlp.activation_backward(dh, pre, activation, gated)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("gate", ["relu", "sigmoid", "none"])
@pytest.mark.parametrize("sparse", [False, True])
def test_neutral_residue_forward_and_backward_match_the_reference(fake_c, poisoned, glu, gate,
                                                                  sparse):
    T, d, d_a = 7, 16, 8
    x = torch.randn(d, T).t()  # (T, d), column-major
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
    on = expected[1] != 0  # gate-sparse mode skips the other rows' GEMMs: their pre is the biases
    for name, actual, wanted in zip(("y", "g", "l1", "pre"), outputs, expected):
        if name == "pre":
            actual, wanted = actual[on], wanted[on]
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5, msg=name)

    dy, dg, dl1 = torch.randn(T, d), torch.randn(T), torch.randn(T)
    common = (dy, dg, dl1, x, w_in, w_glu, w_out, w_gate, b_out, expected[1], expected[3],
              "gelu", gate)
    grads = cuda_neutral_residue.neutral_residue_backward(*common)
    for actual, wanted in zip(grads, ref_neutral_residue.neutral_residue_backward(*common)):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-5)
    assert fake_c.calls.count("grouped_mm_simt") == 2


def _dyadic(*shape, dtype=torch.float32) -> torch.Tensor:
    """Random multiples of 1/4 in [-1, 1]: every product and sum below is exact in float32, so
    results do not depend on the emulated GEMM's summation order."""
    return (torch.randint(-4, 5, shape) / 4).to(dtype)


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize(
    "dtype, x_offset", [(torch.float32, 0), (torch.bfloat16, 0), (torch.bfloat16, 1)],
    ids=["fp32", "bf16", "bf16-unaligned"],
)
def test_neutral_residue_gate_sparse_gemms_run_over_the_active_rows_only(
    fake_c, poisoned, monkeypatch, glu, dtype, x_offset
):
    """Gate-sparse mode: both GEMMs get one group ending at the count of rows with g != 0, their
    rows first; y, g, l1 and those rows' pre equal the dense path's bit for bit, and both modes
    run the same GEMM kernel (an unaligned x included: a 2-byte offset)."""
    T, d, d_a = 11, 16, 8
    x = _dyadic(T * d + x_offset, dtype=dtype)[x_offset:].view(T, d)
    w_in, w_glu = _dyadic(d_a, d, dtype=dtype), (_dyadic(d_a, d, dtype=dtype) if glu else None)
    w_out, w_gate = _dyadic(d_a, d, dtype=dtype).t(), _dyadic(d, dtype=dtype)
    b_in, b_glu = _dyadic(d_a, dtype=dtype), (_dyadic(d_a, dtype=dtype) if glu else None)
    b_out, residual = _dyadic(d, dtype=dtype), _dyadic(T, d, dtype=dtype)
    gemm_rows = []
    real_grouped_mm = cuda_neutral_residue.grouped_mm

    def counting_grouped_mm(rows, w, offs):
        gemm_rows.append(offs.tolist())
        return real_grouped_mm(rows, w, offs)

    monkeypatch.setattr(cuda_neutral_residue, "grouped_mm", counting_grouped_mm)
    results, kernels = [], []
    for sparse in (False, True):
        fake_c.calls.clear()
        results.append(cuda_neutral_residue.neutral_residue(
            x, w_in, w_glu, w_out, w_gate, torch.tensor(0.25, dtype=dtype), b_in, b_glu, b_out,
            residual, "relu", "relu", sparse, True))
        kernels.append([name for name in fake_c.calls if name.startswith("grouped_mm")])
    (y, g, l1, pre), (y_s, g_s, l1_s, pre_s) = results
    on = g != 0
    active = int(on.sum())
    assert 0 < active < T, "the test needs rows gated off and on"
    assert gemm_rows == [[T], [T], [active], [active]]
    assert kernels[0] == kernels[1] == ["grouped_mm_simt" if dtype == torch.float32
                                        else "grouped_mm_sm90"] * 2
    for dense, sparse in ((y, y_s), (g, g_s), (l1, l1_s), (pre[on], pre_s[on])):
        assert torch.equal(dense.view(torch.uint8), sparse.view(torch.uint8))
    want = ref_neutral_residue.neutral_residue(
        x, w_in, w_glu, w_out, w_gate, torch.tensor(0.25, dtype=dtype), b_in, b_glu, b_out,
        residual, "relu", "relu", False, False)
    torch.testing.assert_close(y_s, want[0], rtol=2e-2, atol=2e-2)  # pre, a rounded to dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routing_matches_the_reference(fake_c, poisoned, dtype):
    T, E = 11, 4
    logits = torch.randn(E, T, dtype=dtype).t()  # column-major
    got = cuda_routing.route_top1(logits, 2, rows_per_chunk=3)  # capacity 2: tokens dropped
    want = ref_routing.route_top1(logits, 2)
    assert bool(want[8].any())
    for actual, wanted in zip(got, want):
        assert actual.dtype == wanted.dtype and torch.equal(actual, wanted)
    grads = (torch.randn(2 * T, dtype=dtype)[::2], torch.tensor(0.3, dtype=dtype),
             torch.tensor(-0.7))
    args = (logits, want[3], want[4], want[8], want[9], *grads)
    torch.testing.assert_close(cuda_routing.route_top1_backward(*args),
                               ref_routing.route_top1_backward(*args), rtol=0, atol=0)
    for empty, wanted in zip(cuda_routing.route_top1(logits[:0], 2),
                             ref_routing.route_top1(logits[:0], 2)):
        assert torch.equal(empty, wanted)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_sort_by_expert_matches_the_reference(fake_c, poisoned, index_dtype):
    expert_idx = torch.randint(0, 5, (7, 2), dtype=index_dtype)
    for rows_per_chunk in (3, None):
        got = cuda_routing.sort_by_expert(expert_idx, 5, rows_per_chunk)
        assert all(torch.equal(a, b) for a, b in zip(got, ref_routing.sort_by_expert(expert_idx, 5)))
    perm, offs = cuda_routing.sort_by_expert(expert_idx[:0], 5)
    assert perm.shape == (0,) and offs.tolist() == [0] * 5


def test_sizes_past_32_bits_take_the_generic_kernel(fake_c):
    """The sm90 kernels' problem shapes are 32-bit: larger operands go to the generic kernel."""
    rows = torch.empty(1, 8, dtype=torch.bfloat16).expand(2**31, 8)  # no memory behind the rows
    assert not cuda_grouped_mm._hopper_kernels_fit(90, torch.bfloat16, (rows,), ())
    assert cuda_grouped_mm._hopper_kernels_fit(90, torch.bfloat16, (rows[: 2**31 - 1],), ())
    assert not cuda_grouped_mm._hopper_kernels_fit(90, torch.bfloat16, (rows[:8],), (2**31,))
    assert not cuda_grouped_mm._ampere_kernels_fit(80, torch.bfloat16, (rows,), (), 8, 8)
    assert cuda_grouped_mm._ampere_kernels_fit(80, torch.bfloat16, (rows[: 2**31 - 1],), (), 8, 8)
    assert not cuda_grouped_mm._ampere_kernels_fit(80, torch.bfloat16, (rows[:8],), (), 2**31, 8)


# Valid sm80 arguments for S=8, K=16, N=24, E=2 (bfloat16) at made-up 16-byte aligned addresses:
# every call below changes one into something the kernel must refuse, so nothing is launched.
SM80_COMMON = dict(offs=16, S=8, K=16, N=24, E=2, x=1024, x_stride_s=16, x_stride_k=1, dtype=2,
                   workspace=4096, workspace_bytes=1 << 16, sm_count=4, stream=0)
SM80_FORWARD = dict(SM80_COMMON, w=2048, y=3072, w_stride_e=384, w_stride_k=24, w_stride_n=1)
SM80_WEIGHT_GRAD = dict(SM80_COMMON, dy=2048, dw=3072, dy_stride_s=24, dy_stride_n=1)


@pytest.mark.parametrize("change, match", [
    ({"x": 1026}, "16-byte aligned"),
    ({"w_stride_n": 2}, "unit stride in its K or N"),
    ({"w_stride_e": 380}, "multiples of 16 bytes"),
    ({"K": 12, "w_stride_e": 288}, "multiples of 16 bytes"),
    ({"N": 20, "w_stride_k": 20, "w_stride_e": 320}, "multiples of 16 bytes"),
    ({"workspace_bytes": 64}, "workspace too small"),
    ({"workspace": 4096 + 64}, "128-byte aligned"),
    ({"sm_count": 0}, "sm_count"),
    ({"dtype": 0}, "no float32 version"),
], ids=["x_misaligned", "w_no_unit_stride", "w_batch_stride", "K_odd", "N_odd",
        "small_workspace", "workspace_misaligned", "no_sms", "float32"])
def test_sm80_forward_refuses_bad_arguments_before_launching(change, match):
    with pytest.raises(ValueError, match=match):
        REAL_C.grouped_mm_sm80(**{**SM80_FORWARD, **change})


@pytest.mark.parametrize("change, match", [
    ({"dw": 3080}, "16-byte aligned"),
    ({"dy_stride_n": 2}, "unit column strides"),
    ({"K": 12, "x_stride_s": 16}, "multiples of 16 bytes"),
    ({"dy_stride_s": 28}, "multiples of 16 bytes"),
    ({"workspace_bytes": 64}, "workspace too small"),
], ids=["dw_misaligned", "dy_no_unit_stride", "K_odd", "dy_row_stride", "small_workspace"])
def test_sm80_weight_grad_refuses_bad_arguments_before_launching(change, match):
    with pytest.raises(ValueError, match=match):
        REAL_C.grouped_mm_weight_grad_sm80(**{**SM80_WEIGHT_GRAD, **change})


def test_sm80_workspace_grows_with_the_groups():
    sizes = [REAL_C.grouped_mm_sm80_workspace_size(E=E, dtype=2) for E in (0, 1, 100)]
    assert sizes[0] == 0 and 0 < sizes[1] < sizes[2]
    assert REAL_C.grouped_mm_sm80_workspace_size(E=100, dtype=1) == sizes[2]
    with pytest.raises(ValueError, match="no float32 version"):
        REAL_C.grouped_mm_sm80_workspace_size(E=1, dtype=0)


# The same for the sm90 kernels (whose K needs no alignment). Without a GPU, a check that came
# after a launch would raise the launch's RuntimeError instead.
SM90_FORWARD = dict(SM80_FORWARD, workspace_bytes=1 << 20)
SM90_WEIGHT_GRAD = dict(SM80_WEIGHT_GRAD, workspace_bytes=1 << 20)
needs_sm90 = pytest.mark.skipif(not REAL_C.has_sm90_kernels(), reason="built without 90a")


@needs_sm90
@pytest.mark.parametrize("change, match", [
    ({"x": 1026}, "16-byte aligned"),
    ({"w_stride_n": 2}, "unit stride in its K or N"),
    ({"x_stride_s": 20}, "multiples of 16 bytes"),
    ({"N": 20, "w_stride_k": 20, "w_stride_e": 320}, "multiples of 16 bytes"),
    ({"workspace_bytes": 64}, "workspace too small"),
    ({"workspace": 4096 + 64}, "128-byte aligned"),
    ({"dtype": 0}, "no float32 version"),
], ids=["x_misaligned", "w_no_unit_stride", "x_row_stride", "N_odd", "small_workspace",
        "workspace_misaligned", "float32"])
def test_sm90_forward_refuses_bad_arguments_before_launching(change, match):
    with pytest.raises(ValueError, match=match):
        REAL_C.grouped_mm_sm90(**{**SM90_FORWARD, **change})


@needs_sm90
@pytest.mark.parametrize("change, match", [
    ({"dw": 3080}, "16-byte aligned"),
    ({"dy_stride_n": 2}, "unit column strides"),
    ({"dy_stride_s": 28}, "multiples of 16 bytes"),
    ({"workspace_bytes": 64}, "workspace too small"),
], ids=["dw_misaligned", "dy_no_unit_stride", "dy_row_stride", "small_workspace"])
def test_sm90_weight_grad_refuses_bad_arguments_before_launching(change, match):
    with pytest.raises(ValueError, match=match):
        REAL_C.grouped_mm_weight_grad_sm90(**{**SM90_WEIGHT_GRAD, **change})
