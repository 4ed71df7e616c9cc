"""Triton top-1 routing and the stable counting sort of tokens by expert.

Semantics are those of :mod:`modekernels.reference.routing`. Three launches, none of which needs
a device value on the host:

1. rows: each program reads ``tiles`` tiles of ``block_t`` rows. For routing it reads the logits
   once and writes each row's expert (first maximum; the first NaN if the row has one, as
   ``torch.argmax``), gate (1 / Σ exp(x − max)) and logsumexp, plus the program's per-expert
   token counts and probability sums and its Σ logsumexp²; for a plain sort it only counts.
   Counts row E holds each program's entries whose index names no expert (outside [0, E): the
   host checks the values of CPU tensors only, so a GPU sort can get them; argmax never does).
2. scan: one program per counts row (E + 1) turns its counts over the row programs into
   exclusive prefixes (in place; the total lands in the last column) and sums its probability
   partials in program order, so every reduction has a fixed order and the result is
   deterministic.
3. scatter: each row program ranks its entries within their expert (prefix of the programs before
   it plus an in-tile cumulative sum), drops ranks at or past the capacity, and writes each entry's
   index to its slot of ``perm``: kept entries at ``start[expert] + rank``, dropped ones after all
   kept ones in position order. An entry that names no expert goes with the dropped ones and
   counts for no expert (the cuda backend's rule), so ``perm`` stays a permutation and
   ``offs[-1]`` counts the valid entries. Program 0 writes ``offs``, the counts and the two
   losses.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from modekernels.triton_kernels.common import on_tensor_device

# Elements of one (rows × experts) tile, the bounds of its row count, and the tile elements per
# warp: 8 per thread keeps every kernel under ~100 registers without spills on sm_90.
_TILE_ELEMENTS = 2048
_MIN_BLOCK_T, _MAX_BLOCK_T = 8, 512
_ELEMENTS_PER_WARP, _MIN_WARPS, _MAX_WARPS = 256, 4, 16
# Row programs above which each program takes several tiles, and the most it takes.
_TARGET_PROGRAMS, _MAX_TILES = 1024, 8
_SCAN_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class Blocking:
    """How the entries are cut: ``block_t`` rows per tile, ``tiles`` tiles per row program,
    ``block_e`` ≥ E expert columns (a power of two), ``scan_chunk`` row programs per step of the
    scan, and ``num_warps`` for the kernels that hold a tile."""

    block_t: int
    block_e: int
    tiles: int
    scan_chunk: int = _SCAN_CHUNK
    num_warps: int = _MIN_WARPS

    @staticmethod
    def for_shape(num_entries: int, num_experts: int) -> "Blocking":
        block_e = triton.next_power_of_2(max(num_experts, 16))
        block_t = min(max(_TILE_ELEMENTS // block_e, _MIN_BLOCK_T), _MAX_BLOCK_T)
        row_tiles = triton.cdiv(num_entries, block_t)
        tiles = min(_MAX_TILES, triton.next_power_of_2(triton.cdiv(row_tiles, _TARGET_PROGRAMS)))
        warps = min(max(block_t * block_e // _ELEMENTS_PER_WARP, _MIN_WARPS), _MAX_WARPS)
        return Blocking(block_t, block_e, tiles, num_warps=warps)

    def programs(self, num_entries: int) -> int:
        return triton.cdiv(num_entries, self.block_t * self.tiles)


@triton.jit
def _names_expert(idx, row_ok, num_experts):
    """(BLOCK_T,) bool: the row is real and its index lies in [0, num_experts)."""
    return row_ok & (idx >= 0) & (idx < num_experts)


@triton.jit
def _one_hot(idx, valid, cols):
    """(BLOCK_T, BLOCK_E) int32: 1 where the row is valid (:func:`_names_expert`) and its index is
    the column (an invalid index may equal a padding column ≥ E)."""
    return ((idx[:, None] == cols[None, :]) & valid[:, None]).to(tl.int32)


@triton.jit
def _first_max(x, cols, BLOCK_E: tl.constexpr):
    """(BLOCK_T,) int32: each row's first maximum of x (BLOCK_T, BLOCK_E), a NaN above every
    number (the first NaN wins, even over +inf), as ``torch.argmax``: ``tl.argmax`` has no NaN
    rule, its pick would depend on the reduction order."""
    is_nan = x != x  # only a NaN differs from itself
    first_nan = tl.min(tl.where(is_nan, cols[None, :], BLOCK_E), 1)
    return tl.where(first_nan < BLOCK_E, first_nan, tl.argmax(x, 1, tie_break_left=True))


@triton.jit
def _route_rows_kernel(
    logits_ptr, stride_t, stride_e, num_tokens, num_experts,
    idx_ptr, gate_ptr, lse_ptr, counts_ptr, probs_ptr, zpart_ptr, ld,
    TILES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < num_experts
    counts = tl.zeros([BLOCK_E], tl.int32)
    prob_sums = tl.zeros([BLOCK_E], tl.float32)
    z_sums = tl.zeros([BLOCK_T], tl.float32)
    for tile in range(TILES):
        rows = (pid * TILES + tile) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < num_tokens
        ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_t + cols.to(tl.int64)[None, :] * stride_e
        x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=float("-inf"))
        x = tl.where(row_ok[:, None], x.to(tl.float32), 0.0)  # no -inf rows, hence no NaN
        row_max = tl.max(x, 1)
        idx = _first_max(x, cols, BLOCK_E)
        exps = tl.exp(x - row_max[:, None])
        sum_exp = tl.sum(exps, 1)
        # torch.logsumexp's rule: an infinite max is the row's logsumexp (-inf for a row of -inf)
        lse = tl.where(tl.abs(row_max) == float("inf"), row_max, row_max + tl.log(sum_exp))
        inv_sum = tl.where(row_ok, 1.0 / sum_exp, 0.0)
        prob_sums += tl.sum(exps * inv_sum[:, None], 0)
        counts += tl.sum(_one_hot(idx, row_ok, cols), 0)
        z_sums += tl.where(row_ok, lse * lse, 0.0)
        tl.store(idx_ptr + rows, idx.to(tl.int64), mask=row_ok)
        tl.store(gate_ptr + rows, inv_sum.to(gate_ptr.dtype.element_ty), mask=row_ok)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(counts_ptr + cols * ld + pid, counts, mask=col_ok)
    tl.store(counts_ptr + num_experts * ld + pid, tl.zeros([], tl.int32))  # argmax names one
    tl.store(probs_ptr + cols * ld + pid, prob_sums, mask=col_ok)
    tl.store(zpart_ptr + pid, tl.sum(z_sums, 0))


@triton.jit
def _count_rows_kernel(
    idx_ptr, num_entries, num_experts, counts_ptr, ld,
    TILES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], tl.int32)
    outside = tl.zeros([], tl.int32)
    for tile in range(TILES):
        rows = (pid * TILES + tile) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < num_entries
        idx = tl.load(idx_ptr + rows, mask=row_ok, other=0)
        valid = _names_expert(idx, row_ok, num_experts)
        counts += tl.sum(_one_hot(idx, valid, cols), 0)
        outside += tl.sum(row_ok.to(tl.int32) - valid.to(tl.int32), 0)
    tl.store(counts_ptr + cols * ld + pid, counts, mask=cols < num_experts)
    tl.store(counts_ptr + num_experts * ld + pid, outside)


@triton.jit
def _scan_kernel(counts_ptr, probs_ptr, num_experts, num_programs, ld, ROUTING: tl.constexpr,
                 CHUNK: tl.constexpr):
    """Program r of E + 1 scans counts row r; probabilities exist for the experts (r < E) only."""
    expert = tl.program_id(0)
    row = expert * ld
    has_probs = expert < num_experts
    prob_programs = tl.where(has_probs, num_programs, 0)
    seen = tl.zeros([], tl.int32)
    prob_total = tl.zeros([], tl.float32)
    for start in range(0, num_programs, CHUNK):
        block = start + tl.arange(0, CHUNK)
        ok = block < num_programs
        counts = tl.load(counts_ptr + row + block, mask=ok, other=0)
        tl.store(counts_ptr + row + block, seen + tl.cumsum(counts, 0) - counts, mask=ok)
        seen += tl.sum(counts, 0)
        if ROUTING:
            prob_total += tl.sum(
                tl.load(probs_ptr + row + block, mask=block < prob_programs, other=0.0), 0)
    tl.store(counts_ptr + row + num_programs, seen)
    if ROUTING:
        tl.store(probs_ptr + row + num_programs, prob_total, mask=has_probs)


@triton.jit
def _scatter_kernel(
    idx_ptr, num_entries, num_experts, capacity, counts_ptr, ld, num_programs,
    perm_ptr, offs_ptr,
    tokens_ptr, routed_ptr, gate_ptr, dropped_ptr, probs_ptr, zpart_ptr, aux_ptr, z_ptr,
    ROUTING: tl.constexpr, TILES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < num_experts
    routed = tl.load(counts_ptr + cols * ld + num_programs, mask=col_ok, other=0)
    kept = tl.minimum(routed, capacity)
    kept_end = tl.cumsum(kept, 0)
    kept_start = kept_end - kept
    num_kept = tl.sum(kept, 0)
    # Entries of each expert in the programs before this one, and how many entries those
    # programs sent after the kept ones: dropped, or naming no expert.
    seen = tl.load(counts_ptr + cols * ld + pid, mask=col_ok, other=0)
    outside_seen = tl.load(counts_ptr + num_experts * ld + pid)
    dropped_seen = tl.sum(tl.maximum(seen - capacity, 0), 0) + outside_seen
    for tile in range(TILES):
        rows = (pid * TILES + tile) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < num_entries
        idx = tl.load(idx_ptr + rows, mask=row_ok, other=0)
        valid = _names_expert(idx, row_ok, num_experts)
        hot = _one_hot(idx, valid, cols)
        rank = tl.sum(hot * (seen[None, :] + tl.cumsum(hot, 0) - 1), 1)
        kept_dest = tl.sum(hot * kept_start[None, :], 1) + rank
        drop = row_ok & (~valid | (rank >= capacity))
        drops = drop.to(tl.int32)
        drop_rank = dropped_seen + tl.cumsum(drops, 0) - drops
        dest = tl.where(drop, num_kept + drop_rank, kept_dest)
        tl.store(perm_ptr + dest, rows.to(tl.int64), mask=row_ok)
        if ROUTING:
            tl.store(dropped_ptr + rows, drop, mask=row_ok)
            tl.store(gate_ptr + rows, tl.zeros([BLOCK_T], gate_ptr.dtype.element_ty), mask=drop)
        seen += tl.sum(hot, 0)
        dropped_seen += tl.sum(drops, 0)
    if pid == 0:
        tl.store(offs_ptr + cols, kept_end, mask=col_ok)
        if ROUTING:
            tl.store(tokens_ptr + cols, kept, mask=col_ok)
            tl.store(routed_ptr + cols, routed, mask=col_ok)
            inv_tokens = 1.0 / num_entries
            prob_total = tl.load(probs_ptr + cols * ld + num_programs, mask=col_ok, other=0.0)
            balance = tl.sum((routed.to(tl.float32) * inv_tokens) * (prob_total * inv_tokens), 0)
            tl.store(aux_ptr, num_experts * balance)
            z_total = tl.zeros([], tl.float32)
            for first in range(0, num_programs, CHUNK):
                block = first + tl.arange(0, CHUNK)
                z_part = tl.load(zpart_ptr + block, mask=block < num_programs, other=0.0)
                z_total += tl.sum(z_part, 0)
            tl.store(z_ptr, z_total * inv_tokens)


@triton.jit
def _route_backward_kernel(
    logits_ptr, stride_t, stride_e, lse_ptr, idx_ptr, dropped_ptr, routed_ptr,
    grad_gate_ptr, grad_gate_stride, grad_aux_ptr, grad_z_ptr, grad_ptr,
    num_tokens, num_experts, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(logits_ptr + rows64[:, None] * stride_t + cols.to(tl.int64)[None, :] * stride_e, mask=mask,
                other=float("-inf")).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    probs = tl.exp(x - lse[:, None])
    idx = tl.load(idx_ptr + rows, mask=row_ok, other=0)
    dropped = tl.load(dropped_ptr + rows, mask=row_ok, other=1).to(tl.int1)
    chosen = idx[:, None] == cols[None, :]
    gate = tl.where(dropped, 0.0, tl.sum(tl.where(chosen, probs, 0.0), 1))
    grad_gate = tl.load(grad_gate_ptr + rows64 * grad_gate_stride, mask=row_ok, other=0.0)
    gate_term = grad_gate.to(tl.float32) * gate
    inv_tokens = 1.0 / num_tokens
    fraction = tl.load(routed_ptr + cols, mask=col_ok, other=0).to(tl.float32) * inv_tokens
    balance = fraction[None, :] - tl.sum(probs * fraction[None, :], 1)[:, None]
    grad_aux = tl.load(grad_aux_ptr).to(tl.float32)
    grad_z = tl.load(grad_z_ptr).to(tl.float32)
    row_term = 2.0 * inv_tokens * grad_z * lse - gate_term
    grad = probs * (num_experts * inv_tokens * grad_aux * balance + row_term[:, None])
    grad += tl.where(chosen, gate_term[:, None], 0.0)
    out = grad_ptr + rows64[:, None] * num_experts + cols[None, :]
    tl.store(out, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@on_tensor_device
def route_top1(
    logits: torch.Tensor, capacity: int, blocking: Blocking | None = None
) -> tuple[torch.Tensor, ...]:
    """Fused top-1 routing; same inputs and outputs as the reference ``route_top1``."""
    num_tokens, num_experts = logits.shape
    device = logits.device
    expert_idx = torch.empty(num_tokens, dtype=torch.int64, device=device)
    gate = torch.empty(num_tokens, dtype=logits.dtype, device=device)
    perm = torch.empty(num_tokens, dtype=torch.int64, device=device)
    offs = torch.empty(num_experts, dtype=torch.int32, device=device)
    tokens_per_expert = torch.empty(num_experts, dtype=torch.int32, device=device)
    aux_loss = torch.empty((), dtype=torch.float32, device=device)
    z_loss = torch.empty((), dtype=torch.float32, device=device)
    dropped = torch.empty(num_tokens, dtype=torch.bool, device=device)
    lse = torch.empty(num_tokens, dtype=torch.float32, device=device)
    routed = torch.empty(num_experts, dtype=torch.int32, device=device)
    outputs = (gate, aux_loss, z_loss, lse, expert_idx, perm, offs, tokens_per_expert, dropped,
               routed)
    if num_tokens == 0:
        for t in (offs, tokens_per_expert, aux_loss, z_loss, routed):
            t.zero_()
        return outputs

    b = blocking or Blocking.for_shape(num_tokens, num_experts)
    programs = b.programs(num_tokens)
    ld = programs + 1
    counts = torch.empty(num_experts + 1, ld, dtype=torch.int32, device=device)
    prob_sums = torch.empty(num_experts, ld, dtype=torch.float32, device=device)
    z_sums = torch.empty(programs, dtype=torch.float32, device=device)
    _route_rows_kernel[(programs,)](
        logits, logits.stride(0), logits.stride(1), num_tokens, num_experts,
        expert_idx, gate, lse, counts, prob_sums, z_sums, ld,
        TILES=b.tiles, BLOCK_T=b.block_t, BLOCK_E=b.block_e, num_warps=b.num_warps,
    )
    _scan_kernel[(num_experts + 1,)](counts, prob_sums, num_experts, programs, ld, ROUTING=True,
                                     CHUNK=b.scan_chunk)
    _scatter_kernel[(programs,)](
        expert_idx, num_tokens, num_experts, capacity, counts, ld, programs, perm, offs,
        tokens_per_expert, routed, gate, dropped, prob_sums, z_sums, aux_loss, z_loss,
        ROUTING=True, TILES=b.tiles, BLOCK_T=b.block_t, BLOCK_E=b.block_e, CHUNK=b.scan_chunk,
        num_warps=b.num_warps,
    )
    return outputs


@on_tensor_device
def sort_by_expert(
    expert_idx: torch.Tensor, num_experts: int, blocking: Blocking | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counting sort of the flattened slots by expert; same result as the reference. Slots whose
    index lies outside [0, num_experts) (unchecked on a GPU) go after all others in position order
    and count for no expert in ``offs``, as in the cuda backend."""
    flat = expert_idx.reshape(-1).contiguous()
    num_entries = flat.numel()
    perm = torch.empty(num_entries, dtype=torch.int64, device=flat.device)
    offs = torch.empty(num_experts, dtype=torch.int32, device=flat.device)
    if num_entries == 0:
        return perm, offs.zero_()

    b = blocking or Blocking.for_shape(num_entries, num_experts)
    programs = b.programs(num_entries)
    ld = programs + 1
    counts = torch.empty(num_experts + 1, ld, dtype=torch.int32, device=flat.device)
    _count_rows_kernel[(programs,)](
        flat, num_entries, num_experts, counts, ld,
        TILES=b.tiles, BLOCK_T=b.block_t, BLOCK_E=b.block_e, num_warps=b.num_warps,
    )
    _scan_kernel[(num_experts + 1,)](counts, None, num_experts, programs, ld, ROUTING=False,
                                     CHUNK=b.scan_chunk)
    _scatter_kernel[(programs,)](
        flat, num_entries, num_experts, num_entries, counts, ld, programs, perm, offs,
        None, None, None, None, None, None, None, None,
        ROUTING=False, TILES=b.tiles, BLOCK_T=b.block_t, BLOCK_E=b.block_e, CHUNK=b.scan_chunk,
        num_warps=b.num_warps,
    )
    return perm, offs


@on_tensor_device
def route_top1_backward(
    logits: torch.Tensor,
    lse: torch.Tensor,
    expert_idx: torch.Tensor,
    dropped: torch.Tensor,
    routed: torch.Tensor,
    grad_gate: torch.Tensor,
    grad_aux: torch.Tensor,
    grad_z: torch.Tensor,
    blocking: Blocking | None = None,
) -> torch.Tensor:
    """d(loss)/d(logits) in one pass over the logits; the formula of the reference backward."""
    num_tokens, num_experts = logits.shape
    grad = torch.empty(num_tokens, num_experts, dtype=logits.dtype, device=logits.device)
    if num_tokens == 0:
        return grad
    b = blocking or Blocking.for_shape(num_tokens, num_experts)
    _route_backward_kernel[(triton.cdiv(num_tokens, b.block_t),)](
        logits, logits.stride(0), logits.stride(1), lse, expert_idx, dropped, routed,
        grad_gate, grad_gate.stride(0), grad_aux, grad_z, grad,
        num_tokens, num_experts, BLOCK_T=b.block_t, BLOCK_E=b.block_e, num_warps=b.num_warps,
    )
    return grad
