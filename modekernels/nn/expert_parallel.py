"""Expert parallelism for :class:`~modekernels.nn.GroupedExperts`: each rank of a process group
holds a contiguous slice of the experts, and tokens travel to their experts' rank and back over
``torch.distributed`` all-to-all."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from modekernels._checks import FLOAT_DTYPES, check_tensor
from modekernels.nn.moe import GroupedExperts
from modekernels.ops.moe_mlp import moe_mlp_sorted, slot_order_sum
from modekernels.ops.routing import INDEX_DTYPES, sort_by_expert


def _resolve_group(group: dist.ProcessGroup | DeviceMesh | None) -> dist.ProcessGroup:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "ExpertParallelExperts needs torch.distributed: call "
            "torch.distributed.init_process_group first"
        )
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"group must be a 1-D DeviceMesh, got {group.ndim} dimensions")
        return group.get_group()
    return dist.group.WORLD if group is None else group


def _slice(param: nn.Parameter | None, first: int, count: int) -> nn.Parameter | None:
    if param is None:
        return None
    return nn.Parameter(param.detach()[first:first + count].clone(), param.requires_grad)


class ExpertParallelExperts(nn.Module):
    """This rank's slice of a :class:`GroupedExperts`, computing what the full module computes.

    ``ExpertParallelExperts(experts, group=None)``: of W ranks in ``group`` (a process group, a
    1-D ``DeviceMesh`` or None for the default group), rank r keeps experts
    [r·E/W, (r+1)·E/W) of ``experts`` (E experts; E % W must be 0) as its own ``w1``, ``w2``,
    ``b1``, ``b2`` parameters (copies; ``experts`` is left as it was). Every rank builds it from
    the same ``experts``.

    ``forward(x (T, H), expert_idx, gate, sorted_slots=None)`` takes this rank's own tokens and
    returns what ``experts(x, expert_idx, gate, sorted_slots)`` returns for them (T, H), so it
    drops in as ``MoEMLP.experts`` under data + expert parallelism. expert_idx and gate are (T,)
    or (T, k) with global expert indices; ``sorted_slots`` is a :class:`~modekernels.Routing`'s
    (perm, offs), whose dropped slots (past offs[-1]) are not sent and contribute zero.

    Steps: sort the slots by expert (so by destination rank); exchange the per-expert counts
    with ``all_to_all_single``; send the token rows there with the differentiable functional
    all-to-all; run the local experts with :func:`modekernels.moe_mlp_sorted` (unit gates) on the
    received rows, regrouped by local expert (stable, so in source-rank then slot order); send
    the results back; scale each slot by its gate at home and sum each token's k slots in slot
    order (deterministic). Gradients reach x, gate and the local parameters; a local parameter's
    gradient sums the contributions of every rank's tokens, as the all-to-all backward delivers
    them. Under ``torch.autocast`` the result comes in the dtype the experts compute in, as
    ``experts``' does.

    The split sizes of a variable-size all-to-all must be known on the host, so each forward
    reads the counts once (one small device-to-host synchronisation, inherent to this exchange).
    Every rank of the group must run forward and backward together: they are collectives. So
    gradients must flow back through the same all-to-alls on every rank: under grad mode, x
    requires grad on every rank or on none, and so do the local experts' parameters where x does
    not. The ranks share that, and how many expert_idx entries each has outside [0, E), with
    the counts, so that a mismatch or a bad index raises the same ValueError on every rank
    instead of leaving the others waiting in a collective.
    """

    def __init__(
        self, experts: GroupedExperts, group: dist.ProcessGroup | DeviceMesh | None = None
    ):
        super().__init__()
        self.group = _resolve_group(group)
        self.world_size = dist.get_world_size(self.group)
        rank = dist.get_rank(self.group)
        self.num_experts = experts.w1.shape[0]
        if self.num_experts % self.world_size:
            raise ValueError(
                f"the number of experts E = {self.num_experts} must be divisible by the "
                f"group's world size W = {self.world_size}"
            )
        self.num_local_experts = self.num_experts // self.world_size
        self.first_expert = rank * self.num_local_experts
        self.activation, self.gated = experts.activation, experts.gated
        first, count = self.first_expert, self.num_local_experts
        self.w1 = _slice(experts.w1, first, count)
        self.w2 = _slice(experts.w2, first, count)
        self.b1 = _slice(experts.b1, first, count)
        self.b2 = _slice(experts.b2, first, count)

    def _exchange_counts(
        self, per_expert: torch.Tensor, status: torch.Tensor
    ) -> tuple[list[int], list[int], torch.Tensor, list[list[int]]]:
        """per_expert (E,) int64 counts of this rank's slots and status (S,) int64 values every
        rank must see -> the rows sent to and received from each rank (host lists), the received
        counts (W, E/W) on the device and each rank's status (W lists of S ints), in one
        all-to-all and one read to the host."""
        local = self.num_local_experts
        sent = torch.cat([per_expert.view(self.world_size, local),
                          status.expand(self.world_size, -1)], 1)
        received = torch.empty_like(sent)
        dist.all_to_all_single(received, sent, group=self.group)
        table = torch.cat([sent[:, :local].sum(1, keepdim=True),
                           received[:, :local].sum(1, keepdim=True), received[:, local:]], 1)
        rows = table.tolist()  # by rank r: rows sent to r, rows received from r, r's status
        return ([row[0] for row in rows], [row[1] for row in rows], received[:, :local],
                [row[2:] for row in rows])

    def _all_to_alls_in_graph(self, x: torch.Tensor) -> int:
        """How many of forward's two all-to-alls gradients flow back through here: the tokens'
        where x needs grad, the results' also where only the local experts' parameters do."""
        if not torch.is_grad_enabled():
            return 0
        if x.requires_grad:
            return 2
        return int(any(p.requires_grad for p in self.parameters()))

    def _check_status(self, status: list[list[int]]) -> None:
        """Raise on every rank alike from every rank's status [out-of-range expert_idx entries,
        all-to-alls in the autograd graph]."""
        out_of_range = {rank: bad for rank, (bad, _) in enumerate(status) if bad}
        if out_of_range:
            raise ValueError(
                f"expert_idx must be in [0, {self.num_experts}), got entries outside it on "
                f"rank(s) {sorted(out_of_range)} of the group (count by rank: {out_of_range})"
            )
        in_graph = [graph for _, graph in status]
        if len(set(in_graph)) > 1:
            raise ValueError(
                "x.requires_grad (and the local experts' requires_grad where x does not require "
                "grad, under grad mode) must agree across ranks: the all-to-alls' backward is a "
                "collective, so gradients must flow through the same ones on every rank; got "
                f"{in_graph} of the 2 all-to-alls by rank"
            )

    def _local_experts(self, rows: torch.Tensor, counts: torch.Tensor, total: int) -> torch.Tensor:
        """The local experts on received rows (R, H), ordered by source rank then local expert
        with counts (W, E/W): each row's expert output (R, H), gate 1, in the same order."""
        local = torch.arange(self.num_local_experts, device=rows.device).repeat(self.world_size)
        expert = torch.repeat_interleave(local, counts.reshape(-1), output_size=total)
        perm, offs = sort_by_expert(expert, self.num_local_experts)
        return moe_mlp_sorted(rows, perm, offs, rows.new_ones(total, 1), self.w1, self.w2,
                              activation=self.activation, gated=self.gated, b1=self.b1, b2=self.b2)

    def forward(
        self,
        x: torch.Tensor,
        expert_idx: torch.Tensor,
        gate: torch.Tensor,
        sorted_slots: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        check_tensor("x", x, rank=2, dtypes=FLOAT_DTYPES)
        check_tensor("expert_idx", expert_idx, dtypes=INDEX_DTYPES, device=x.device)
        check_tensor("gate", gate, dtypes=FLOAT_DTYPES, device=x.device)
        if gate.shape != expert_idx.shape or expert_idx.shape[0] != x.shape[0]:
            raise ValueError(
                f"expert_idx and gate must both be (T,) or (T, k) with T = {x.shape[0]}, got "
                f"{tuple(expert_idx.shape)} and {tuple(gate.shape)}"
            )
        num_tokens = x.shape[0]
        top_k = expert_idx.shape[1] if expert_idx.dim() == 2 else 1
        out_of_range = ((expert_idx < 0) | (expert_idx >= self.num_experts)).sum()
        if sorted_slots is None:  # clamped: a bad index raises after the exchange, on every rank
            perm, offs = sort_by_expert(expert_idx.clamp(0, self.num_experts - 1),
                                        self.num_experts)
        else:
            perm, offs = sorted_slots
        ends = offs.to(torch.int64)
        per_expert = torch.diff(ends, prepend=ends.new_zeros(1))
        status = torch.stack([out_of_range, torch.full_like(out_of_range,
                                                            self._all_to_alls_in_graph(x))])
        send, receive, received_counts, statuses = self._exchange_counts(per_expert, status)
        if not torch.compiler.is_compiling():  # the statuses are unbacked SymInts while tracing
            self._check_status(statuses)
        kept = perm[:sum(send)]  # slots past offs[-1] were dropped by capacity
        received = funcol.all_to_all_single_autograd(x[kept // top_k], receive, send, self.group)
        outputs = self._local_experts(received, received_counts, sum(receive))
        returned = funcol.all_to_all_single_autograd(outputs, send, receive, self.group)
        scaled = returned.float() * gate.reshape(-1)[kept].float().unsqueeze(1)
        dropped = scaled.new_zeros(perm.shape[0] - kept.shape[0], x.shape[1])
        summed = slot_order_sum(torch.cat([scaled, dropped]), perm, num_tokens, top_k)
        return summed.to(outputs.dtype)  # the experts' dtype: x's, or autocast's

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, local_experts=[{self.first_expert}, "
                f"{self.first_expert + self.num_local_experts}), world_size={self.world_size}, "
                f"activation={self.activation}, gated={self.gated}, bias={self.b1 is not None}")
