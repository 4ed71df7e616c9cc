"""The KV cache of MoDE's domain experts while a model generates.

The model's cache (``past_key_values``: a transformers ``Cache`` with one layer per block) holds
the backbone's keys and values. The expert layers beside block b keep theirs beside it: one
single-layer cache per expert layer depth, of the same kind as the model cache's layer b
(dynamic, or dynamic with b's sliding window), attached to the model cache object on the first
forward that hands it to the experts and dropped with it. So each decoding step runs the experts
on its new tokens only, as the backbone.

The caches hold the *expert batch* (:class:`~modekernels.hf.domain_experts.DomainExperts`: the
sequences each active expert runs on), which must stay the same while the cache lives: the same
active experts and the same ``domain_ids`` at every step, as ``generate`` passes them. A changed
expert batch, a cache filled before the experts took part, or a cache layer of another kind
(static, quantized, offloaded) raises ValueError. The model cache's ``reorder_cache`` (beam
search) and ``crop`` (assisted decoding) reach the experts' caches too (the cache instance's own
methods are chained; its class is untouched).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

__all__ = ["expert_layer_caches"]

_ATTRIBUTE = "_modekernels_domain_expert_caches"


class _OneLayerCache(Cache):
    """A cache of one layer, whatever ``layer_idx`` the attention passes (an expert layer keeps
    the index of the block it sits beside)."""

    def __init__(self, layer):
        super().__init__(layers=[layer])

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(key_states, value_states, 0, *args, **kwargs)


@dataclass
class _BlockCaches:
    """The caches of the experts beside one block and the expert batch they hold: sequence p of
    it is batch sequence ``src[p]`` run through expert group ``group[p]`` (of ``members``)."""

    layers: list
    members: tuple
    src: torch.Tensor
    group: torch.Tensor
    batch: int

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """After the model cache took batch sequence ``beam_idx[b]`` into row b: each expert-batch
        sequence takes the one of its group that ran the sequence its batch sequence now
        continues (beams of one prompt share their domain, so that one exists)."""
        rows = torch.full((len(self.members), self.batch), -1, dtype=torch.int64, device=self.src.device)
        rows[self.group, self.src] = torch.arange(self.src.shape[0], device=self.src.device)
        taken = rows[self.group, beam_idx.to(self.src.device).index_select(0, self.src)]
        for cache in self.layers:
            cache.reorder_cache(taken)


def _empty_like(layer, block: int):
    """An empty cache layer of the kind of the model cache's ``layer`` (at ``block``)."""
    if type(layer) is DynamicLayer:
        return DynamicLayer()
    if type(layer) is DynamicSlidingWindowLayer:
        return DynamicSlidingWindowLayer(sliding_window=layer.sliding_window)
    raise ValueError(
        f"MoDE: the domain experts keep their keys and values in dynamic cache layers, but the "
        f"model's cache has a {type(layer).__name__} at block {block}; generate with the default "
        "dynamic cache (no static, quantized or offloaded cache) or with use_cache=False"
    )


def _attached(cache) -> dict:
    """The model cache's {experts module: _BlockCaches}, attached (with ``reorder_cache`` and
    ``crop`` chained to the experts' caches) on first use."""
    attached = getattr(cache, _ATTRIBUTE, None)
    if attached is not None:
        return attached
    attached = {}
    setattr(cache, _ATTRIBUTE, attached)
    reorder, crop = cache.reorder_cache, cache.crop

    def reorder_cache(beam_idx, *args, **kwargs):
        result = reorder(beam_idx, *args, **kwargs)
        for caches in attached.values():
            caches.reorder(beam_idx)
        return result

    def crop_cache(*args, **kwargs):
        result = crop(*args, **kwargs)
        for caches in attached.values():
            for layer in caches.layers:
                layer.crop(*args, **kwargs)
        return result

    cache.reorder_cache, cache.crop = reorder_cache, crop_cache
    return attached


def expert_layer_caches(
    cache,
    experts: nn.Module,
    block: int,
    depth: int,
    tokens: int,
    members: tuple,
    src: torch.Tensor,
    group: torch.Tensor,
    batch: int,
) -> list:
    """The ``depth`` single-layer caches of ``experts`` (the domain experts beside ``block``) in
    the model cache ``cache``, after the block stored this step's ``tokens`` tokens there. The
    expert batch: ``src`` (P,) batch sequences, ``group`` (P,) their groups in ``members``, of a
    batch of ``batch`` sequences. Raises ValueError as the module docstring says."""
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, Cache) or layers is None or block >= len(layers):
        raise ValueError(
            "MoDE: the domain experts keep their KV cache beside a transformers Cache with one "
            f"layer per block; got {type(cache).__name__}. Generate with the default cache or with "
            "use_cache=False"
        )
    held = layers[block].get_seq_length() - tokens  # tokens the block held before this step
    attached = _attached(cache)
    caches = attached.get(experts)
    if caches is None:
        if held != 0:
            raise ValueError(
                f"MoDE: the KV cache already holds {held} tokens at block {block} that the domain "
                "experts did not see (they became active after it was filled); start from a fresh "
                "cache or generate with use_cache=False"
            )
        layers = [_OneLayerCache(_empty_like(layers[block], block)) for _ in range(depth)]
        attached[experts] = _BlockCaches(layers, members, src, group, batch)
        return layers
    same_batch = (caches.members == members and caches.batch == batch and caches.src.shape == src.shape
                  and (src.is_cuda or caches.src.is_cuda or torch.equal(caches.src, src)))
    if not same_batch:
        raise ValueError(
            "MoDE: the domain experts' KV cache holds another expert batch: the active experts or "
            "domain_ids changed while one cache was in use; keep them for a whole generation"
        )
    if caches.layers[0].get_seq_length() != held:
        raise ValueError(
            f"MoDE: the domain experts' KV cache holds {caches.layers[0].get_seq_length()} tokens "
            f"at block {block} but the model's cache {held}"
        )
    return caches.layers
