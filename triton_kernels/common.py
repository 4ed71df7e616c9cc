"""Pieces shared by the Triton kernels: the interpreter switch, autotune configurations and their
shared-memory pruning, tl.dot settings, the persistent grid size, the launch device guard, the
strided tile product and the activations.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from modekernels.backends import triton_interpreting

INTERPRETING = triton_interpreting()
# Programs of the persistent forward under the interpreter: several, so that the tile walk's
# stride is exercised, yet few, because each program runs in turn on the host.
INTERPRETER_PROGRAMS = 4
# MODEKERNELS_AUTOTUNE=0: every kernel runs its first configuration, untuned. The GPU test run
# sets it (tests check results at many odd shapes, each of which would be a new autotune key);
# the benchmarks tune, and check each result before timing it.
AUTOTUNE = os.environ.get("MODEKERNELS_AUTOTUNE", "1") != "0"


class FmaConfig(triton.Config):
    """An autotune configuration for ``tl.dot`` on FMAs: float32 operands with input precision
    "ieee" (PyTorch's default float32 matmul precision), which the tensor cores cannot take.
    There every thread holds its share of the operand tiles as well as the accumulator, so the
    tensor-core tiles spill, some to kilobytes of local memory per thread; these smaller tiles
    spill a few registers at most (tests/test_triton_compile.py checks it for sm_90).
    :class:`SharedMemoryPrune` keeps only these for "ieee" launches, and never these for the
    others."""


def tile_configs(
    tiles: list[tuple[int, ...]],
    names: tuple[str, ...] = ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    fma_tiles: list[tuple[int, ...]] = (),
) -> list[triton.Config]:
    """Autotune configurations: each tile gives the block sizes ``names`` then num_warps and
    num_stages; ``fma_tiles`` likewise for :class:`FmaConfig`. When interpreting, one small
    configuration (blocks of 32, 4 warps, 1 stage), since autotuning there would only cost
    time; with ``MODEKERNELS_AUTOTUNE=0``, the first tile of each kind."""
    if INTERPRETING:
        tiles, fma_tiles = [(*([32] * len(names)), 4, 1)], []
    elif not AUTOTUNE:
        tiles, fma_tiles = tiles[:1], fma_tiles[:1]

    def config(kind: type, tile: tuple[int, ...]) -> triton.Config:
        return kind(dict(zip(names, tile[:-2])), num_warps=tile[-2], num_stages=tile[-1])

    return [config(triton.Config, tile) for tile in tiles] + [config(FmaConfig, tile) for tile in fma_tiles]


class SharedMemoryPrune:
    """The ``early_config_prune`` of ``triton.autotune``: drops, before any is compiled, the
    configurations whose pipelined operand tiles overflow the device's shared memory per block
    (227 KB on Hopper), which would otherwise each cost a compilation to fail at load time.

    Triton's software pipeliner buffers num_stages copies of the tiles a loop loads on Hopper
    and later, num_stages - 1 before; ``stage_elements(meta)`` gives the elements of one copy
    of all of them (meta: the launch arguments and the configuration's block sizes), in the
    dtype of the tensor argument ``operand``. An upper bound of what a compiled kernel allocates
    (its epilogue reuses the buffers; tests/test_triton_compile.py checks it). First it keeps the
    configurations made for the launch's dot: :class:`FmaConfig` ones for input precision
    "ieee", the others otherwise (all, where a kernel has none of that kind). Outside CUDA (the
    interpreter) nothing is pruned; when nothing fits, the smallest configuration is kept.
    """

    def __init__(self, operand: str, stage_elements):
        self.operand = operand
        self.stage_elements = stage_elements

    def shared_bytes(self, config: triton.Config, args: dict, capability: int) -> int:
        """Bytes of shared memory the pipelined tiles of ``config`` need on sm_``capability``."""
        copies = config.num_stages if capability >= 90 else config.num_stages - 1
        elements = self.stage_elements({**args, **config.kwargs})
        return max(copies, 1) * elements * args[self.operand].element_size()

    def kept(self, configs: list, args: dict, capability: int, limit: int) -> list:
        """The configurations for the launch's dot that fit ``limit`` bytes, or the smallest."""
        fma = args.get("INPUT_PRECISION") == "ieee"
        configs = [c for c in configs if isinstance(c, FmaConfig) == fma] or configs
        need = {id(c): self.shared_bytes(c, args, capability) for c in configs}
        return [c for c in configs if need[id(c)] <= limit] or [min(configs, key=lambda c: need[id(c)])]

    def __call__(self, configs: list, named_args: dict, **kwargs) -> list:
        args = {**named_args, **kwargs}
        device = args[self.operand].device
        if device.type != "cuda":
            return configs
        major, minor = torch.cuda.get_device_capability(device)
        return self.kept(configs, args, 10 * major + minor, _max_shared_memory(device.index))


@functools.cache
def _max_shared_memory(device_index: int) -> int:
    """Shared memory per block (opt-in maximum) of a CUDA device, as Triton checks at load."""
    from triton.runtime import driver

    return driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


@triton.jit
def accumulate_product(
    acc,
    a_ptr,
    a_rows,
    a_row_mask,
    stride_a_row,
    stride_a_red,
    b_ptr,
    b_cols,
    b_col_mask,
    stride_b_red,
    stride_b_col,
    red_start,
    red_end,
    BLOCK_RED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """acc += A[a_rows, red_start:red_end] @ B[red_start:red_end, b_cols], BLOCK_RED at a time.

    A and B are strided matrices; rows and columns outside their masks read as zero, and an
    empty reduction range leaves acc unchanged.
    """
    red = red_start + tl.arange(0, BLOCK_RED)
    a_ptrs = (
        a_ptr
        + a_rows.to(tl.int64)[:, None] * stride_a_row
        + red.to(tl.int64)[None, :] * stride_a_red
    )
    b_ptrs = (
        b_ptr
        + red.to(tl.int64)[:, None] * stride_b_red
        + b_cols.to(tl.int64)[None, :] * stride_b_col
    )
    for _ in range(red_start, red_end, BLOCK_RED):
        red_mask = red < red_end
        a = tl.load(a_ptrs, mask=a_row_mask[:, None] & red_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=red_mask[:, None] & b_col_mask[None, :], other=0.0)
        if DOT_IN_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_RED * stride_a_red
        b_ptrs += BLOCK_RED * stride_b_red
        red += BLOCK_RED
    return acc


def _tf32_allowed() -> bool:
    """Whether PyTorch lets float32 matmuls use TF32. Its ``fp32_precision`` setting where it has
    one (torch >= 2.9; it also reflects the legacy setters), since reading the legacy
    ``allow_tf32`` raises once the new API has set TF32; else ``allow_tf32``."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    return matmul.allow_tf32 if precision is None else precision == "tf32"


def dot_options(dtype: torch.dtype) -> dict:
    """tl.dot settings: TF32 for float32 only when PyTorch allows it; half-precision tiles
    widened to float32 under the interpreter."""
    tf32 = dtype != torch.float32 or _tf32_allowed()
    return {
        "INPUT_PRECISION": "tf32" if tf32 else "ieee",
        "DOT_IN_FP32": INTERPRETING and dtype != torch.float32,
    }


def persistent_grid(rows: int, groups: int, out_cols: int, device: torch.device, gated: bool = False):
    """The grid of a persistent grouped-GEMM walk: one program per SM, but no more than the
    output tiles, which number at most (cdiv(rows, BLOCK_M) + groups) row tiles (one partial
    tile per group) times the column tiles; ``gated`` tiles cover BLOCK_N / 2 output columns."""
    programs = max_programs(device)

    def grid(meta):
        block_n = meta["BLOCK_N"] // 2 if gated else meta["BLOCK_N"]
        tiles = (triton.cdiv(rows, meta["BLOCK_M"]) + groups) * triton.cdiv(out_cols, block_n)
        return (min(programs, tiles),)

    return grid


def rows_bucket(rows: int, groups: int) -> int:
    """The autotune key argument ``rows_bucket`` of the grouped GEMM kernels: the mean rows per
    group rounded up to a power of two, at most 4096. A decode step (a few rows per expert) and
    a training step (thousands) then tune apart, while batch sizes in one bucket share a tuning.
    The kernels never read it."""
    return min(triton.next_power_of_2(max(triton.cdiv(rows, max(groups, 1)), 1)), 4096)


@functools.cache
def max_programs(device: torch.device) -> int:
    """Programs of the persistent forward: one per SM on a GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_PROGRAMS


def on_tensor_device(host):
    """Decorates a host function whose first argument is a tensor so that its launches run with
    that tensor's CUDA device current: Triton launches on the current device and its current
    stream, so without it a tensor on cuda:1 would be handed to a kernel running on cuda:0."""

    @functools.wraps(host)
    def launch(first: torch.Tensor, *args, **kwargs):
        if first.device.type != "cuda":
            return host(first, *args, **kwargs)
        with torch.cuda.device(first.device):
            return host(first, *args, **kwargs)

    return launch


@triton.jit
def group_end(offs_ptr, group, E, start, S):
    """The end row of group ``group`` whose rows start at ``start``: offs[group] of the cumulative
    end offsets offs (E,), or S for the tail group E (the rows past offs[E - 1]), clamped to
    [start, S]. Offsets the host has checked pass unchanged; those only a device-side caller can
    pass unchecked (decreasing, negative, past S) give empty or short groups, never an address
    outside the S rows (as csrc/group_rows.cuh clamps them)."""
    end = tl.load(offs_ptr + group, mask=group < E, other=S)
    return tl.minimum(tl.maximum(end, start), S)


@triton.jit
def activate(z, ACTIVATION: tl.constexpr):
    """The activation of code ACTIVATION (see modekernels.kernel_codes.ACTIVATION_CODES) applied to a float32 tile;
    gelu is the exact erf form."""
    if ACTIVATION == 1:
        z = z / (1.0 + tl.exp(-z))
    elif ACTIVATION == 2:
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == 3:
        z = tl.maximum(z, 0.0)
    return z
