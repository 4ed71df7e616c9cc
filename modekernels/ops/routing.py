"""Top-1 routing, hash routing and the stable sort of tokens by expert, as torch ops.

Registered as ``torch.ops.modekernels.route_top1`` (with an autograd formula for the gate and the
two losses), ``torch.ops.modekernels.route_top1_backward`` and
``torch.ops.modekernels.sort_by_expert``, each with a fake kernel. :func:`hash_route` is composed
of torch ops and ``sort_by_expert``.

Conventions fixed here (DESIGN.md leaves them open):

- Capacity: ``capacity_factor=None`` keeps every token; otherwise each expert keeps its first
  ``⌈capacity_factor·T/E⌉`` tokens in position order (:func:`expert_capacity`) and drops the rest.
  A dropped token keeps its ``expert_idx`` (the expert it chose), has gate 0 and ``dropped`` true.
- ``perm`` lists the kept tokens sorted by expert (stable: position order within an expert), then
  every dropped token in position order. ``offs`` and ``tokens_per_expert`` count kept tokens
  only, so ``offs[-1]`` is the number kept and :func:`modekernels.grouped_mm` over ``x[perm]``
  gives zero rows for the dropped tail.
- ``tokens_per_expert`` is int32, like ``offs`` (``offs = cumsum(tokens_per_expert)``).
- ``aux_loss = E·Σ_e f_e·P_e`` with f_e the fraction of tokens that chose e *before* capacity
  dropping (the Switch Transformer convention) and P_e the mean softmax probability of e; f_e
  carries no gradient. ``z_loss = mean_t logsumexp(logits_t)²``. Both are float32 scalars, and 0
  when T = 0.
- ``gate`` is in the logits' dtype, computed in float32; a dropped token's gate is the constant 0
  and sends no gradient to its logits.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from modekernels import backends
from modekernels._checks import (
    FLOAT_DTYPES,
    check_dim,
    check_index_range,
    check_positive_int,
    check_tensor,
    number_visible,
)
from modekernels.ops import autocast

# The Triton kernels hold one (rows × next_power_of_2(E)) tile in registers; the CUDA kernels
# keep per-warp sums of E floats in shared memory (csrc/routing.cu: routing_max_experts()).
TRITON_MAX_EXPERTS = 1024
CUDA_MAX_EXPERTS = 4096
INDEX_DTYPES = (torch.int64, torch.int32)


def _expert_count_supported(backend: str, limit: int):
    """A ``supports`` predicate of ``backend``: None for at most ``limit`` experts, else why not."""

    def supported(num_experts: int) -> str | None:
        if num_experts > limit:
            return f"the {backend} kernels take at most {limit} experts, got {num_experts}"
        return None

    return supported


_triton_experts = _expert_count_supported("triton", TRITON_MAX_EXPERTS)
_cuda_experts = _expert_count_supported("cuda", CUDA_MAX_EXPERTS)

_route = backends.Dispatch(
    "route_top1",
    reference="modekernels.reference.routing:route_top1",
    triton="modekernels.triton_kernels.routing:route_top1",
    cuda="modekernels.cuda.routing:route_top1",
    supports={
        "triton": lambda logits, capacity: _triton_experts(logits.shape[1]),
        "cuda": lambda logits, capacity: _cuda_experts(logits.shape[1]),
    },
)
_route_backward = backends.Dispatch(
    "route_top1_backward",
    reference="modekernels.reference.routing:route_top1_backward",
    triton="modekernels.triton_kernels.routing:route_top1_backward",
    cuda="modekernels.cuda.routing:route_top1_backward",
    supports={
        "triton": lambda logits, *_: _triton_experts(logits.shape[1]),
        "cuda": lambda logits, *_: _cuda_experts(logits.shape[1]),
    },
)
_sort = backends.Dispatch(
    "sort_by_expert",
    reference="modekernels.reference.routing:sort_by_expert",
    triton="modekernels.triton_kernels.routing:sort_by_expert",
    cuda="modekernels.cuda.routing:sort_by_expert",
    supports={
        "triton": lambda expert_idx, num_experts: _triton_experts(num_experts),
        "cuda": lambda expert_idx, num_experts: _cuda_experts(num_experts),
    },
)


class Routing(NamedTuple):
    """The result of :func:`route_top1` and :func:`hash_route`, for T tokens and E experts."""

    expert_idx: torch.Tensor
    """(T,) int64: the chosen expert (the first maximum of the logits)."""
    gate: torch.Tensor
    """(T,): softmax(logits)[expert] (1 for hash routing); 0 for dropped tokens."""
    perm: torch.Tensor
    """(T,) int64: kept tokens stably sorted by expert, then dropped tokens in position order."""
    offs: torch.Tensor
    """(E,) int32: cumulative ends of each expert's kept tokens in ``perm``."""
    tokens_per_expert: torch.Tensor
    """(E,) int32: kept tokens per expert."""
    aux_loss: torch.Tensor
    """() float32: the load-balancing loss E·Σ_e f_e·P_e (0 for hash routing)."""
    z_loss: torch.Tensor
    """() float32: mean over tokens of logsumexp(logits)² (0 for hash routing)."""
    dropped: torch.Tensor
    """(T,) bool: tokens past their expert's capacity."""


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float | None) -> int:
    """Tokens each expert keeps: ⌈capacity_factor·T/E⌉ (at most T, which keeps every token), or
    T when ``capacity_factor`` is None.

    The quotient is rounded to 9 decimals before the ceiling so that floating error does not add
    a slot (1.1·100/10 gives 11, not 12).
    """
    if capacity_factor is None:
        return num_tokens
    return min(num_tokens, math.ceil(round(capacity_factor * num_tokens / num_experts, 9)))


def _check_num_experts(num_experts: object) -> None:
    """A positive int, checked where it is concrete (a SymInt such as ``w.shape[0]`` under
    dynamic shapes is checked by the op's real kernel)."""
    if not number_visible(num_experts):
        return
    check_positive_int("num_experts", num_experts)


def _check_capacity_factor(capacity_factor: object) -> None:
    """None or a positive finite number, checked where it is concrete (a factor that varies
    between compiled calls is traced as a SymFloat and checked by the op's real kernel)."""
    if capacity_factor is None or not number_visible(capacity_factor):
        return
    if not (
        isinstance(capacity_factor, (int, float)) and not isinstance(capacity_factor, bool)
        and math.isfinite(capacity_factor)
        and capacity_factor > 0
    ):
        raise ValueError(f"capacity_factor must be a positive finite number or None, got "
                         f"{capacity_factor!r}")


_MAX_ENTRIES = 2**31 - 1  # offs and tokens_per_expert are int32 counts of the entries


def _check_entry_count(name: str, entries: object) -> None:
    """At most 2³¹ - 1 routed entries (T, or T·k), checked where the count is concrete."""
    if number_visible(entries) and entries > _MAX_ENTRIES:
        raise ValueError(f"{name} holds {entries} entries to route; the int32 offsets count at "
                         f"most {_MAX_ENTRIES}: route fewer tokens per call")


def _check_logits(logits: object, capacity_factor: object) -> None:
    check_tensor("logits", logits, rank=2, dtypes=FLOAT_DTYPES)
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one expert column, got shape "
                         f"{tuple(logits.shape)}")
    _check_entry_count("logits", logits.shape[0])
    _check_capacity_factor(capacity_factor)


def _check_expert_idx(expert_idx: object, num_experts: object) -> None:
    check_tensor("expert_idx", expert_idx, dtypes=INDEX_DTYPES)
    if expert_idx.dim() not in (1, 2):
        raise ValueError(f"expert_idx must be (T,) or (T, k), got shape {tuple(expert_idx.shape)}")
    _check_entry_count("expert_idx", expert_idx.numel())
    _check_num_experts(num_experts)
    if expert_idx.dim() == 2 and expert_idx.shape[1] > num_experts:
        raise ValueError(f"expert_idx.shape[1] = k must be at most num_experts = {num_experts}, "
                         f"got {expert_idx.shape[1]}")


def _check_backward(logits, lse, expert_idx, dropped, routed, grad_gate, grad_aux, grad_z):
    check_tensor("logits", logits, rank=2, dtypes=FLOAT_DTYPES)
    num_tokens, num_experts = logits.shape
    for name, t, dtypes, shape in (
        ("lse", lse, (torch.float32,), (num_tokens,)),
        ("expert_idx", expert_idx, (torch.int64,), (num_tokens,)),
        ("dropped", dropped, (torch.bool,), (num_tokens,)),
        ("routed", routed, (torch.int32,), (num_experts,)),
        ("grad_gate", grad_gate, FLOAT_DTYPES, (num_tokens,)),
        ("grad_aux", grad_aux, FLOAT_DTYPES, ()),
        ("grad_z", grad_z, FLOAT_DTYPES, ()),
    ):
        check_tensor(name, t, rank=len(shape), dtypes=dtypes, device=logits.device)
        for dim, (actual, expected) in enumerate(zip(t.shape, shape)):
            check_dim(f"{name}.shape[{dim}]", actual, expected, "from logits (T, E)")


# Outputs: gate, aux_loss, z_loss, lse, expert_idx, perm, offs, tokens_per_expert, dropped, routed
# (the floating ones first, see modekernels.reference.routing.route_top1).
@torch.library.custom_op("modekernels::route_top1", mutates_args=())
def _route_top1_op(
    logits: torch.Tensor, capacity_factor: Optional[float] = None, backend: Optional[str] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_logits(logits, capacity_factor)
    num_tokens, num_experts = logits.shape
    capacity = expert_capacity(num_tokens, num_experts, capacity_factor)
    return _route(backend, logits.device, logits, capacity)


@_route_top1_op.register_fake
def _(logits, capacity_factor=None, backend=None):
    _check_logits(logits, capacity_factor)
    num_tokens, num_experts = logits.shape

    def new(size, dtype):
        return logits.new_empty(size, dtype=dtype)

    return (new(num_tokens, logits.dtype), new((), torch.float32), new((), torch.float32),
            new(num_tokens, torch.float32), new(num_tokens, torch.int64),
            new(num_tokens, torch.int64), new(num_experts, torch.int32),
            new(num_experts, torch.int32), new(num_tokens, torch.bool),
            new(num_experts, torch.int32))


@torch.library.custom_op("modekernels::route_top1_backward", mutates_args=())
def _route_top1_backward_op(
    logits: torch.Tensor,
    lse: torch.Tensor,
    expert_idx: torch.Tensor,
    dropped: torch.Tensor,
    routed: torch.Tensor,
    grad_gate: torch.Tensor,
    grad_aux: torch.Tensor,
    grad_z: torch.Tensor,
    backend: Optional[str] = None,
) -> torch.Tensor:
    args = (logits, lse, expert_idx, dropped, routed, grad_gate, grad_aux, grad_z)
    _check_backward(*args)
    return _route_backward(backend, logits.device, *args)


@_route_top1_backward_op.register_fake
def _(logits, lse, expert_idx, dropped, routed, grad_gate, grad_aux, grad_z, backend=None):
    _check_backward(logits, lse, expert_idx, dropped, routed, grad_gate, grad_aux, grad_z)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, _, backend = inputs
    _, _, _, lse, expert_idx, _, _, _, dropped, routed = output
    ctx.backend = backends.backward_request(backend, output[0])
    ctx.save_for_backward(logits, lse, expert_idx, dropped, routed)


def _backward(ctx, grad_gate, grad_aux, grad_z, *_integer_and_lse_grads):
    logits, lse, expert_idx, dropped, routed = ctx.saved_tensors
    grad = _route_top1_backward_op(logits, lse, expert_idx, dropped, routed, grad_gate,
                                   grad_aux, grad_z, ctx.backend)
    return grad, None, None


_route_top1_op.register_autograd(_backward, setup_context=_setup_context)
# The logits in float32, as autocast gives softmax and logsumexp on CUDA.
autocast.register("modekernels::route_top1", cast=(0,), to=torch.float32)
autocast.register("modekernels::route_top1_backward")


@torch.library.custom_op("modekernels::sort_by_expert", mutates_args=())
def _sort_by_expert_op(
    expert_idx: torch.Tensor, num_experts: int, backend: Optional[str] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_expert_idx(expert_idx, num_experts)
    check_index_range("expert_idx", expert_idx, num_experts, "num_experts")
    return _sort(backend, expert_idx.device, expert_idx, num_experts)


@_sort_by_expert_op.register_fake
def _(expert_idx, num_experts, backend=None):
    _check_expert_idx(expert_idx, num_experts)
    return (expert_idx.new_empty(expert_idx.numel(), dtype=torch.int64),
            expert_idx.new_empty(num_experts, dtype=torch.int32))


def route_top1(
    logits: torch.Tensor, *, capacity_factor: float | None = None, backend: str | None = None
) -> Routing:
    """Switch-style top-1 routing of T tokens over E experts, fused into one pass over the logits.

    Args:
        logits: (T, E) float32, float16 or bfloat16 router logits; any strides.
        capacity_factor: None keeps every token; else each expert keeps its first
            ⌈capacity_factor·T/E⌉ tokens in position order and the rest are dropped.
        backend: ``"reference"``, ``"triton"``, ``"cuda"`` or None (see
            :mod:`modekernels.backends`).

    Returns:
        :class:`Routing`: ``expert_idx`` (T,) int64 (ties go to the lowest index, as ``argmax``),
        ``gate`` (T,) softmax(logits)[expert] in the logits' dtype, 0 where dropped; ``perm`` (T,)
        int64 kept tokens stably sorted by expert then dropped tokens in position order; ``offs``
        (E,) int32 cumulative ends of the kept tokens; ``tokens_per_expert`` (E,) int32 kept
        counts; ``aux_loss`` () float32 E·Σ_e f_e·P_e (f_e counted before dropping);
        ``z_loss`` () float32 mean logsumexp²; ``dropped`` (T,) bool.

    ``gate``, ``aux_loss`` and ``z_loss`` are differentiable to the logits; a dropped token's gate
    sends no gradient. On CUDA nothing is read back to the host. Under ``torch.autocast`` the
    logits are cast to float32 (as autocast does for ``softmax`` on CUDA), so the gate is float32.
    """
    _check_logits(logits, capacity_factor)  # before the schema's less specific type errors
    gate, aux_loss, z_loss, _, expert_idx, perm, offs, tokens_per_expert, dropped, _ = (
        _route_top1_op(logits, capacity_factor, backend))
    return Routing(expert_idx, gate, perm, offs, tokens_per_expert, aux_loss, z_loss, dropped)


def sort_by_expert(
    expert_idx: torch.Tensor, num_experts: int, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of tokens (or token slots) by expert: a counting sort on the device.

    Args:
        expert_idx: (T,) or (T, k) int64 or int32, values in [0, num_experts); k ≤ num_experts.
        num_experts: E.
        backend: ``"reference"``, ``"triton"``, ``"cuda"`` or None.

    Returns:
        perm (T·k,) int64: the row-major flattened slots ``t·k + j`` sorted by expert, position
        order within an expert (token = ``perm // k``); offs (E,) int32 cumulative ends of each
        expert's run in perm (``offs[-1] = T·k``).

    Index values are checked for CPU tensors in eager mode only.
    """
    _check_expert_idx(expert_idx, num_experts)  # before the schema's less specific type errors
    return _sort_by_expert_op(expert_idx, num_experts, backend)


# A universal hash ((a·id + b) mod p) mod E: p = 2³¹ − 1, and a, b < p keep a·id + b below 2⁶³
# for token ids below 2³¹.
_HASH_PRIME, _HASH_A, _HASH_B = 2**31 - 1, 1_103_515_245, 12_345


def make_hash_table(
    vocab_size: int, num_experts: int, *, seed: int = 0, balanced: bool = True
) -> torch.Tensor:
    """MoEBERT's fixed random vocabulary → expert table, reproducible from ``seed``.

    Balanced: a seeded random permutation of the vocabulary dealt round-robin to the experts, so
    expert loads over the vocabulary differ by at most one. Otherwise each entry is drawn
    uniformly at random. Returns (vocab_size,) int64 on the CPU (move it with ``.to(device)``).
    """
    _check_num_experts(num_experts)
    check_positive_int("vocab_size", vocab_size)
    generator = torch.Generator().manual_seed(seed)
    if not balanced:
        return torch.randint(num_experts, (vocab_size,), generator=generator)
    table = torch.empty(vocab_size, dtype=torch.int64)
    table[torch.randperm(vocab_size, generator=generator)] = (
        torch.arange(vocab_size) % num_experts)
    return table


def hash_route(
    token_ids: torch.Tensor,
    num_experts: int,
    table: torch.Tensor | None = None,
    *,
    gate_dtype: torch.dtype = torch.float32,
    backend: str | None = None,
) -> Routing:
    """Hash routing (MoEBERT, Hash Layers): each token goes to a fixed expert chosen by its id.

    Args:
        token_ids: (T,) int64 or int32 (flatten (B, S) ids with ``reshape(-1)``).
        num_experts: E.
        table: (V,) int64 or int32 vocabulary → expert table with values in [0, E), as
            :func:`make_hash_table` builds; None hashes the id instead,
            ``((1103515245·id + 12345) mod (2³¹ − 1)) mod E`` (ids below 2³¹).
        gate_dtype: dtype of the all-ones gate.
        backend: backend of the sort (``"reference"``, ``"triton"``, ``"cuda"`` or None).

    Returns:
        :class:`Routing` with gate 1, no token dropped, and zero (constant) losses.
    """
    check_tensor("token_ids", token_ids, rank=1, dtypes=INDEX_DTYPES)
    _check_num_experts(num_experts)
    if table is None:
        check_index_range("token_ids", token_ids, _HASH_PRIME, "ids hashed without a table")
        expert_idx = (token_ids.long() * _HASH_A + _HASH_B) % _HASH_PRIME % num_experts
    else:
        check_tensor("table", table, rank=1, dtypes=INDEX_DTYPES, device=token_ids.device)
        check_index_range("table", table, num_experts, "num_experts")
        check_index_range("token_ids", token_ids, table.shape[0], "the table's vocabulary size")
        expert_idx = table[token_ids].long()
    perm, offs = sort_by_expert(expert_idx, num_experts, backend=backend)
    num_tokens = token_ids.shape[0]
    return Routing(
        expert_idx=expert_idx,
        gate=torch.ones(num_tokens, dtype=gate_dtype, device=token_ids.device),
        perm=perm,
        offs=offs,
        tokens_per_expert=torch.diff(offs, prepend=offs.new_zeros(1)),
        aux_loss=torch.zeros((), dtype=torch.float32, device=token_ids.device),
        z_loss=torch.zeros((), dtype=torch.float32, device=token_ids.device),
        dropped=torch.zeros(num_tokens, dtype=torch.bool, device=token_ids.device),
    )
