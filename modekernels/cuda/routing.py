"""``cuda`` backend of ``route_top1``, its backward and ``sort_by_expert``: allocation and
launches over the kernels of ``csrc/routing.cu``.

Same inputs, outputs and conventions as :mod:`modekernels.reference.routing` (and the triton
path): ``expert_idx`` the first maximum, ``gate`` = 1 / Σ exp(x − max) in the logits' dtype and 0
for a dropped token, ``perm`` the kept tokens stably sorted by expert then the dropped ones in
position order, ``offs``/``tokens_per_expert`` counting kept tokens, ``routed`` counting before
dropping, float32 losses. Passes (see ``csrc/routing.h``): a chunk pass over the rows, a scan
per expert over the chunks, one block for offs and the losses, a scatter pass. Every reduction
has a fixed order, so equal inputs give equal bits, and nothing is read back to the host.

``rows_per_chunk`` (None: the kernels' default, at most ~1024 chunks) exists for tests that
exercise the prefixes across chunks at small sizes.
"""

from __future__ import annotations

import torch

from modekernels import _C
from modekernels.cuda import current_stream
from modekernels.cuda.grouped_mm import _DTYPE_CODES


def _workspace(entries: int, num_experts: int, rows_per_chunk: int, device) -> torch.Tensor:
    """The kernels' scratch memory, as int32 words (the kernels write every word they read)."""
    size = _C.routing_workspace_size(entries=entries, E=num_experts, rows_per_chunk=rows_per_chunk)
    return torch.empty(-(-size // 4), dtype=torch.int32, device=device)


def route_top1(
    logits: torch.Tensor, capacity: int, rows_per_chunk: int | None = None
) -> tuple[torch.Tensor, ...]:
    """Top-1 routing of logits (T, E) keeping at most ``capacity`` tokens per expert; the
    outputs of the reference ``route_top1`` (gate, aux_loss, z_loss, lse, expert_idx, perm, offs,
    tokens_per_expert, dropped, routed)."""
    num_tokens, num_experts = logits.shape
    device = logits.device
    gate = torch.empty(num_tokens, dtype=logits.dtype, device=device)
    aux_loss = torch.empty((), dtype=torch.float32, device=device)
    z_loss = torch.empty((), dtype=torch.float32, device=device)
    lse = torch.empty(num_tokens, dtype=torch.float32, device=device)
    expert_idx = torch.empty(num_tokens, dtype=torch.int64, device=device)
    perm = torch.empty(num_tokens, dtype=torch.int64, device=device)
    offs = torch.empty(num_experts, dtype=torch.int32, device=device)
    tokens_per_expert = torch.empty(num_experts, dtype=torch.int32, device=device)
    dropped = torch.empty(num_tokens, dtype=torch.bool, device=device)
    routed = torch.empty(num_experts, dtype=torch.int32, device=device)
    outputs = (gate, aux_loss, z_loss, lse, expert_idx, perm, offs, tokens_per_expert, dropped,
               routed)
    if num_tokens == 0:
        for t in (offs, tokens_per_expert, aux_loss, z_loss, routed):
            t.zero_()
        return outputs
    rows = rows_per_chunk or _C.routing_rows_per_chunk(num_tokens)
    with torch.cuda.device(device):
        workspace = _workspace(num_tokens, num_experts, rows, device)
        _C.route_top1(
            logits=logits.data_ptr(), T=num_tokens, E=num_experts,
            stride_t=logits.stride(0), stride_e=logits.stride(1),
            dtype=_DTYPE_CODES[logits.dtype], capacity=capacity, rows_per_chunk=rows,
            gate=gate.data_ptr(), aux_loss=aux_loss.data_ptr(), z_loss=z_loss.data_ptr(),
            lse=lse.data_ptr(), expert_idx=expert_idx.data_ptr(), perm=perm.data_ptr(),
            offs=offs.data_ptr(), tokens_per_expert=tokens_per_expert.data_ptr(),
            dropped=dropped.data_ptr(), routed=routed.data_ptr(),
            workspace=workspace.data_ptr(), workspace_bytes=workspace.numel() * 4,
            stream=current_stream(device),
        )
    return outputs


def sort_by_expert(
    expert_idx: torch.Tensor, num_experts: int, rows_per_chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable counting sort of the row-major flattened slots of ``expert_idx`` ((T,) or (T, k),
    int64 or int32) by expert -> perm (T·k,) int64, offs (E,) int32."""
    flat = expert_idx.reshape(-1).contiguous()
    entries = flat.numel()
    device = flat.device
    perm = torch.empty(entries, dtype=torch.int64, device=device)
    offs = torch.empty(num_experts, dtype=torch.int32, device=device)
    if entries == 0:
        return perm, offs.zero_()
    rows = rows_per_chunk or _C.routing_rows_per_chunk(entries)
    with torch.cuda.device(device):
        workspace = _workspace(entries, num_experts, rows, device)
        _C.sort_by_expert(
            idx=flat.data_ptr(), idx_is_int64=flat.dtype == torch.int64, n=entries,
            E=num_experts, rows_per_chunk=rows, perm=perm.data_ptr(), offs=offs.data_ptr(),
            workspace=workspace.data_ptr(), workspace_bytes=workspace.numel() * 4,
            stream=current_stream(device),
        )
    return perm, offs


def route_top1_backward(
    logits: torch.Tensor,
    lse: torch.Tensor,
    expert_idx: torch.Tensor,
    dropped: torch.Tensor,
    routed: torch.Tensor,
    grad_gate: torch.Tensor,
    grad_aux: torch.Tensor,
    grad_z: torch.Tensor,
) -> torch.Tensor:
    """d(loss)/d(logits) (T, E) in the logits' dtype: the reference backward's formula, one warp
    per row."""
    num_tokens, num_experts = logits.shape
    device = logits.device
    grad = torch.empty(num_tokens, num_experts, dtype=logits.dtype, device=device)
    if num_tokens == 0:
        return grad
    lse, expert_idx = lse.contiguous(), expert_idx.contiguous()
    dropped, routed = dropped.contiguous(), routed.contiguous()
    grad_gate = grad_gate.to(torch.float32).contiguous()
    grad_aux, grad_z = grad_aux.to(torch.float32), grad_z.to(torch.float32)
    with torch.cuda.device(device):
        _C.route_top1_backward(
            logits=logits.data_ptr(), T=num_tokens, E=num_experts,
            stride_t=logits.stride(0), stride_e=logits.stride(1),
            dtype=_DTYPE_CODES[logits.dtype], lse=lse.data_ptr(),
            expert_idx=expert_idx.data_ptr(), dropped=dropped.data_ptr(),
            routed=routed.data_ptr(), grad_gate=grad_gate.data_ptr(),
            grad_aux=grad_aux.data_ptr(), grad_z=grad_z.data_ptr(), grad=grad.data_ptr(),
            stream=current_stream(device),
        )
    return grad
