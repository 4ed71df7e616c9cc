"""``cuda`` backend of ``grouped_mm``: allocation, layout handling and kernel choice over ``_C``.

Kernels (``csrc/``):

- Hopper (compute capability 9.0, built for ``90a``), float16/bfloat16: CUTLASS ptr-array grouped
  GEMMs (TMA + WGMMA, fp32 accumulation) reading device-side group shapes, as
  ``torch._grouped_mm`` does. TMA needs 16-byte aligned data pointers and strides: the row
  strides of x and dy, w's batch and leading strides and N must be multiples of 8 elements, so in
  practice K and N multiples of 8.
- Other GPUs of compute capability 8.0 or newer (Ampere, Ada, Blackwell), float16/bfloat16:
  CUTLASS 2.x grouped GEMMs on mma.sync tensor cores (fp32 accumulation), which also read
  device-side group shapes. Their 128-bit accesses need what TMA needs and also K and N multiples
  of 8 elements. They are built for every listed arch, so they run on Hopper too:
  ``_FORCE_SM80 = True`` (a private switch the GPU tests monkeypatch) picks them there instead of
  the Hopper kernels.
- Everything else: a tiled CUDA-core kernel that takes any strides and alignment, with fp32
  accumulation. It runs float32 (IEEE fp32 products whatever the TF32 setting) and unaligned
  float16/bfloat16 (correct, but far slower than the tensor-core kernels).

So every validated call runs; only the speed depends on the dtype, alignment and GPU. w is used
in place when it is (E, K, N) with unit stride along N or the transposed view of an (E, N, K)
tensor (unit stride along K); any other layout is copied once. x and dy are made contiguous.
"""

from __future__ import annotations

import functools

import torch

from modekernels import _C
from modekernels.reference.grouped_mm import gathered_operands

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ALIGNMENT_BYTES = 16  # TMA (sm90), 128-bit cp.async loads (sm80)
_FORCE_SM80 = False  # True: the sm80 kernels wherever they fit, Hopper included (for tests)


@functools.cache
def _device_facts(index: int) -> tuple[int, int]:
    """(compute capability as e.g. 90, number of SMs) of a CUDA device."""
    props = torch.cuda.get_device_properties(index)
    return props.major * 10 + props.minor, props.multi_processor_count


def _weight_in_place_or_copy(w: torch.Tensor) -> torch.Tensor:
    """w itself when its K or N dimension has unit stride (the two layouts the kernels read),
    else a contiguous copy."""
    if w.stride(2) == 1 or w.stride(1) == 1:
        return w
    return w.contiguous()


def _weight_leading_stride(w: torch.Tensor) -> int:
    return w.stride(1) if w.stride(2) == 1 else w.stride(2)


def _tensor_core_operands_fit(
    dtype: torch.dtype, tensors: tuple[torch.Tensor, ...], strides: tuple[int, ...]
) -> bool:
    """What both CUTLASS families need: 16-bit, each 2-D operand in ``tensors`` with unit column
    stride, 16-byte aligned pointers and ``strides``, and every size and stride below 2³¹ (the
    kernels' 32-bit problem shapes)."""
    if dtype == torch.float32:
        return False
    per_16_bytes = _ALIGNMENT_BYTES // dtype.itemsize
    extents = [n for t in tensors for n in (*t.shape, *t.stride())] + list(strides)
    return (
        max(extents, default=0) < 2**31
        and all(t.data_ptr() % _ALIGNMENT_BYTES == 0 for t in tensors)
        and all(t.stride(1) == 1 for t in tensors if t.dim() == 2)
        and all(s % per_16_bytes == 0 for s in strides)
    )


def _hopper_kernels_fit(
    sm: int, dtype: torch.dtype, tensors: tuple[torch.Tensor, ...], strides: tuple[int, ...]
) -> bool:
    """Whether the sm90 CUTLASS kernels can run: Hopper, built for 90a, and
    :func:`_tensor_core_operands_fit`."""
    return sm == 90 and _C.has_sm90_kernels() and _tensor_core_operands_fit(dtype, tensors, strides)


def _ampere_kernels_fit(
    sm: int, dtype: torch.dtype, tensors: tuple[torch.Tensor, ...], strides: tuple[int, ...],
    K: int, N: int,
) -> bool:
    """Whether the sm80 CUTLASS kernels can run: compute capability 8.0 or newer,
    :func:`_tensor_core_operands_fit`, and K and N multiples of 8 elements too (their 128-bit
    accesses are predicated per access, so a partial one would read past the row)."""
    return sm >= 80 and _tensor_core_operands_fit(dtype, tensors, (*strides, K, N))


def _kernel_family(
    sm: int, dtype: torch.dtype, tensors: tuple[torch.Tensor, ...], strides: tuple[int, ...],
    K: int, N: int,
) -> str:
    """"sm90", "sm80" or "simt": the fastest kernels that take these operands (see the module
    docstring; ``_FORCE_SM80`` passes over the Hopper ones)."""
    if not _FORCE_SM80 and _hopper_kernels_fit(sm, dtype, tensors, strides):
        return "sm90"
    if _ampere_kernels_fit(sm, dtype, tensors, strides, K, N):
        return "sm80"
    return "simt"


def _launch(op: str, family: str, args: dict, sm_count: int, device: torch.device) -> None:
    """Run ``_C.<op>_<family>``; the CUTLASS ones also take a workspace (per-group shapes and
    pointers, written on the device) and the SM count."""
    kernel = getattr(_C, f"{op}_{family}")
    if family == "simt":
        kernel(**args)
        return
    E, dtype = args["E"], args["dtype"]
    if family == "sm90":
        size = _C.grouped_mm_sm90_workspace_size(E=E, dtype=dtype, sm_count=sm_count)
    else:
        size = _C.grouped_mm_sm80_workspace_size(E=E, dtype=dtype)
    workspace = torch.empty(size, dtype=torch.uint8, device=device)
    kernel(**args, workspace=workspace.data_ptr(), workspace_bytes=size, sm_count=sm_count)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """y[r] = x[r] @ w[e] for the rows r of group e; rows at or past offs[-1] are zero.

    x (S, K), w (E, K, N) (or the transposed view of (E, N, K)), offs (E,) int32 cumulative end
    rows, all on one CUDA device -> y (S, N) in x's dtype, accumulated in fp32.
    """
    S, K = x.shape
    E, _, N = w.shape
    y = torch.empty((S, N), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if K == 0 or E == 0:
        return y.zero_()
    x = x.contiguous()
    w = _weight_in_place_or_copy(w)
    offs = offs.contiguous()
    with torch.cuda.device(x.device):
        sm, sm_count = _device_facts(x.device.index)
        args = dict(
            x=x.data_ptr(), w=w.data_ptr(), offs=offs.data_ptr(), y=y.data_ptr(),
            S=S, K=K, N=N, E=E,
            x_stride_s=x.stride(0), x_stride_k=x.stride(1),
            w_stride_e=w.stride(0), w_stride_k=w.stride(1), w_stride_n=w.stride(2),
            dtype=_DTYPE_CODES[x.dtype],
            stream=torch.cuda.current_stream(x.device).cuda_stream,
        )
        strides = (x.stride(0), w.stride(0), _weight_leading_stride(w), N)
        family = _kernel_family(sm, x.dtype, (x, w, y), strides, K, N)
        _launch("grouped_mm", family, args, sm_count, x.device)
    return y


def grouped_mm_weight_grad(
    x: torch.Tensor,
    dy: torch.Tensor,
    offs: torch.Tensor,
    x_rows: torch.Tensor | None = None,
    dy_rows: torch.Tensor | None = None,
    dy_scale: torch.Tensor | None = None,
    transposed: bool = False,
) -> torch.Tensor:
    """dw[e] = X[rows of e]^T @ DY[rows of e]; zero for an empty group.

    X (S, K), DY (S, N): x and dy, gathered through x_rows / dy_rows and DY scaled by dy_scale
    where given, into copies first (the CUTLASS kernels read contiguous rows); offs (E,) int32
    cumulative end rows, all on one CUDA device -> dw (E, K, N) in x's dtype, accumulated in
    fp32: contiguous, or when ``transposed`` the transposed view of a contiguous (E, N, K). The
    kernels write row-major results only, so that one is dwᵀ = DYᵀ·X, the same kernels with the
    operands swapped.
    """
    x, dy = gathered_operands(x, dy, x_rows, dy_rows, dy_scale)
    if transposed:
        return _contiguous_weight_grad(dy, x, offs).transpose(1, 2)
    return _contiguous_weight_grad(x, dy, offs)


def _contiguous_weight_grad(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """dw[e] = x[rows of e]^T @ dy[rows of e] for x (S, K), dy (S, N), offs (E,) -> dw (E, K, N)
    contiguous in x's dtype; zero for an empty group."""
    S, K = x.shape
    N = dy.shape[1]
    E = offs.shape[0]
    dw = torch.empty((E, K, N), dtype=x.dtype, device=x.device)
    if dw.numel() == 0:
        return dw
    if S == 0:
        return dw.zero_()
    x = x.contiguous()
    dy = dy.contiguous()
    offs = offs.contiguous()
    with torch.cuda.device(x.device):
        sm, sm_count = _device_facts(x.device.index)
        args = dict(
            x=x.data_ptr(), dy=dy.data_ptr(), offs=offs.data_ptr(), dw=dw.data_ptr(),
            S=S, K=K, N=N, E=E,
            x_stride_s=x.stride(0), x_stride_k=x.stride(1),
            dy_stride_s=dy.stride(0), dy_stride_n=dy.stride(1),
            dtype=_DTYPE_CODES[x.dtype],
            stream=torch.cuda.current_stream(x.device).cuda_stream,
        )
        strides = (x.stride(0), dy.stride(0), N)
        family = _kernel_family(sm, x.dtype, (x, dy, dw), strides, K, N)
        _launch("grouped_mm_weight_grad", family, args, sm_count, x.device)
    return dw
