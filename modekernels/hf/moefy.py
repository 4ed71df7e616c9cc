"""MoEBERT's ``moefy``: each dense FFN split into experts that share its weights.

The FFN's d_ff neurons are ranked (by :func:`~modekernels.hf.compute_ffn_importance` scores, or
by index); the top ``shared_neurons`` go to every expert, the rest are dealt round-robin in rank
order (the r-th remaining neuron to expert r mod E), and each expert keeps the first
``expert_dim - shared_neurons`` of its deal. Expert e's weights are the dense FFN's rows and
columns of its neurons, so with no shared neurons and E·expert_dim = d_ff the experts partition
the FFN and, all active with gate 1, reproduce it exactly. The output bias b2 belongs to no
neuron: it is added once after the experts.
"""

from __future__ import annotations

import functools
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from modekernels._checks import check_positive_int
from modekernels.hf import surgery

__all__ = ["ExpertFFN", "deal_neurons", "expert_weights", "moe_losses", "moefy"]


def deal_neurons(
    d_ff: int,
    num_experts: int,
    expert_dim: Optional[int] = None,
    shared_neurons: int = 0,
    importance: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The neurons of each expert: int64 (num_experts, expert_dim), row e lists expert e's
    neurons (the shared ones first, then its deal in rank order).

    ``importance`` (d_ff,) ranks the neurons, highest first (ties by index); None ranks by index.
    ``expert_dim`` defaults to shared + ⌊(d_ff − shared) / E⌋.
    """
    check_positive_int("num_experts", num_experts)
    if not isinstance(shared_neurons, int) or not 0 <= shared_neurons < d_ff:
        raise ValueError(f"shared_neurons must be an int in [0, {d_ff}), got {shared_neurons!r}")
    dealt = d_ff - shared_neurons
    if expert_dim is None:
        expert_dim = shared_neurons + dealt // num_experts
    own = expert_dim - shared_neurons if isinstance(expert_dim, int) else 0
    if not 1 <= own <= dealt // num_experts:
        raise ValueError(
            f"expert_dim must be an int in ({shared_neurons}, {shared_neurons + dealt // num_experts}] "
            f"for d_ff={d_ff}, {num_experts} experts and {shared_neurons} shared neurons "
            f"(each expert needs its own neurons), got {expert_dim!r}"
        )
    if importance is None:
        order = torch.arange(d_ff)
    else:
        if importance.shape != (d_ff,):
            raise ValueError(f"importance must have shape ({d_ff},), got {tuple(importance.shape)}")
        order = torch.sort(-importance.detach().float().cpu(), stable=True).indices
    shared, rest = order[:shared_neurons], order[shared_neurons:]
    rows = [torch.cat([shared, rest[e::num_experts][:own]]) for e in range(num_experts)]
    return torch.stack(rows)


def expert_weights(ffn, neurons: torch.Tensor) -> dict:
    """The experts' stacked weights cut from a :class:`~modekernels.hf.surgery.DenseFFN` for
    ``neurons`` (E, I): ``w1`` (E, H, I), or (E, H, 2·I) for a gated FFN (gate half first, as
    :func:`modekernels.moe_mlp` expects), ``w2`` (E, I, H), ``b1`` (E, I or 2·I) or None, and the
    shared output bias ``b2`` (H,) or None. Copies, detached from the dense FFN."""
    idx = neurons.to(ffn.w_in.device)
    w1 = ffn.w_in.detach()[idx].transpose(1, 2)  # (E, H, I)
    b1 = None if ffn.b_in is None else ffn.b_in.detach()[idx]
    if ffn.gated:
        w1 = torch.cat([w1, ffn.w_up.detach()[idx].transpose(1, 2)], dim=2)
        if b1 is not None or ffn.b_up is not None:
            zeros = torch.zeros_like(idx, dtype=ffn.w_in.dtype)
            b1 = torch.cat([zeros if b1 is None else b1, zeros if ffn.b_up is None else ffn.b_up.detach()[idx]], dim=1)
    w2 = ffn.w_out.detach()[:, idx].permute(1, 2, 0)  # (E, I, H)
    b2 = None if ffn.b_out is None else ffn.b_out.detach().clone()
    return {"w1": w1.contiguous(), "w2": w2.contiguous(), "b1": b1, "b2": b2}


class ExpertFFN(nn.Module):
    """Stands in for a block's dense FFN: ``forward(x) -> moe(x).output + bias``.

    ``moe`` is a :class:`modekernels.nn.MoEMLP` (top-1 routing, grouped experts); ``bias`` the
    dense FFN's output bias, shared by all experts (None when the FFN has none). After a forward,
    ``last_aux_loss`` / ``last_z_loss`` hold the router's losses; ``token_ids`` (the
    ``input_ids`` of the model call that runs the block, set as the block starts) feed hash
    routing.
    """

    replaces_ffn = True

    def __init__(self, moe: nn.Module, bias: Optional[torch.Tensor]):
        super().__init__()
        self.moe = moe
        self.bias = None if bias is None else nn.Parameter(bias)
        self.token_ids: Optional[torch.Tensor] = None
        self.last_aux_loss: Optional[torch.Tensor] = None
        self.last_z_loss: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.token_ids if self.moe.router.mode == "hash" else None
        y, self.last_aux_loss, self.last_z_loss = self.moe(x, ids)
        return y if self.bias is None else y + self.bias


def _build(model: nn.Module, layer: int, options: dict) -> nn.Module:
    from modekernels.nn import MoEMLP

    family = surgery.detect_family(model)
    _, block_list = surgery.blocks(model)
    ffn = family.dense_ffn(block_list[layer])
    has_bias = ffn.b_in is not None or ffn.b_up is not None
    moe = MoEMLP(
        surgery.hidden_size(model), options["expert_dim"], options["num_experts"],
        activation=ffn.activation, gated=ffn.gated, bias=has_bias, router=options["routing"],
        vocab_size=getattr(model.config, "vocab_size", None) if options["routing"] == "hash" else None,
        seed=layer,
    )
    bias = None if ffn.b_out is None else torch.zeros_like(ffn.b_out, device="cpu")
    experts = ExpertFFN(moe, bias)
    if options["routing"] == "hash":
        surgery.ensure_forward_pre_hook(model, _pass_token_ids)
        attention = getattr(surgery.unwrap(block_list[layer]), family.attention_attr)
        surgery.ensure_forward_pre_hook(model, functools.partial(_take_token_ids, experts),
                                        module=attention, key=(_take_token_ids, layer))
    return experts


METHOD = surgery.register_method(surgery.Method("moefy", "ffn", _build))

# The keyword argument that carries the model call's input_ids to its blocks.
TOKEN_IDS_KWARG = "modekernels_token_ids"


def _pass_token_ids(model: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """Model forward pre-hook: the model's ``input_ids`` join the keyword arguments, which the
    supported families hand on to every block and each block to its attention, which runs
    before the FFN (so transformers' activation checkpointing, which reruns a block's forward
    during ``backward()`` with the arguments of its call, routes the rerun by the ids of its own
    forward). The experts also keep them directly, for a block called in a way that the keyword
    arguments do not reach."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    for module in surgery.added_modules(model, METHOD.name).values():
        module.token_ids = ids
    return args, {**kwargs, TOKEN_IDS_KWARG: ids}


def _take_token_ids(experts: ExpertFFN, attention: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """Forward pre-hook of a block's attention: hand the ids of this call to the block's
    hash-routed experts and take them out of the arguments the attention sees."""
    if TOKEN_IDS_KWARG in kwargs:
        kwargs = dict(kwargs)
        experts.token_ids = kwargs.pop(TOKEN_IDS_KWARG)
    return args, kwargs


def moefy(
    model: nn.Module,
    num_experts: int,
    *,
    expert_dim: Optional[int] = None,
    shared_neurons: int = 0,
    importance: Optional[Sequence[torch.Tensor]] = None,
    routing: str = "learned",
    layers: Optional[Iterable[int]] = None,
    freeze_base: bool = True,
) -> surgery.SurgeryReport:
    """MoEBERT: turn the dense FFN of each chosen block (all when ``layers`` is None) of
    ``model`` into a :class:`modekernels.nn.MoEMLP` of ``num_experts`` experts, in place.

    Each expert holds ``expert_dim`` neurons of the dense FFN (default: shared +
    ⌊(d_ff − shared)/E⌋): the ``shared_neurons`` most important, then its round-robin deal of the
    rest (:func:`deal_neurons`), ranked by ``importance`` (one (d_ff,) tensor per block of the
    model, from :func:`~modekernels.hf.compute_ffn_importance`) or by index. ``routing``:
    ``"learned"`` (top-1 with the balance loss) or ``"hash"`` (MoEBERT's fixed vocabulary →
    expert table, from the model's ``input_ids``, handed to each block with its call's
    arguments, so that activation checkpointing reruns a block with the ids of its own
    forward). Add :func:`moe_losses`'s balance loss to the training loss. With ``freeze_base``
    only the experts and routers train. Undo with :func:`unpatch`.

    The dense FFN weights stay in the model under their names (frozen when ``freeze_base``,
    unused by the forward, still holding their memory): the state dict and ``save_pretrained``
    checkpoints keep every backbone key, :func:`unpatch` restores the dense FFN, also after
    ``from_pretrained`` plus ``load_modules``, and :func:`~modekernels.hf.add_domain_experts`
    copies them into its expert layers.
    """
    if routing not in ("learned", "hash"):
        raise ValueError(f"routing must be 'learned' or 'hash', got {routing!r}")
    family = surgery.detect_family(model)
    chosen = surgery.resolve_layers(model, layers)
    _, block_list = surgery.blocks(model)
    if importance is not None and len(importance) != len(block_list):
        raise ValueError(f"importance must hold one tensor per block ({len(block_list)}), got {len(importance)}")
    dense = {layer: family.dense_ffn(block_list[layer]) for layer in chosen}
    from modekernels.reference.moe_mlp import ACTIVATIONS

    neurons = {}
    for layer, ffn in dense.items():
        if ffn.activation not in ACTIVATIONS:
            raise ValueError(
                f"block {layer}: the FFN's activation {ffn.activation!r} has no fused expert kernel "
                f"(supported: {ACTIVATIONS})"
            )
        scores = None if importance is None else importance[layer]
        neurons[layer] = deal_neurons(ffn.d_ff, num_experts, expert_dim, shared_neurons, scores)
    dims = {n.shape[1] for n in neurons.values()}
    if len(dims) != 1:
        raise ValueError(f"the chosen blocks' FFNs differ in size; give expert_dim explicitly (got {sorted(dims)})")
    options = {"num_experts": num_experts, "expert_dim": dims.pop(), "shared_neurons": shared_neurons, "routing": routing}
    report = surgery.apply(model, METHOD, chosen, options, freeze_base)
    with torch.no_grad():
        for layer in chosen:
            module = surgery.module_at(model, METHOD, layer)
            weights = expert_weights(dense[layer], neurons[layer])
            experts = module.moe.experts
            experts.w1.copy_(weights["w1"])
            experts.w2.copy_(weights["w2"])
            if experts.b1 is not None:
                experts.b1.copy_(weights["b1"])
                experts.b2.zero_()
            if module.bias is not None:
                module.bias.copy_(weights["b2"])
    return report


def moe_losses(model: nn.Module) -> tuple:
    """(balance loss, z loss) of the last forward: each summed over the moefied blocks."""
    terms = surgery.last_forward_terms(model, METHOD.name, ("last_aux_loss", "last_z_loss"), "experts")
    aux, z = zip(*terms)
    return torch.stack(aux).sum(), torch.stack(z).sum()
