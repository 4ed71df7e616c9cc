"""A dispatch mode that records the copies made of given tensors (weights) and, optionally, of
any tensor of their size (their gradients), for the tests that weights and weight gradients in
the ``nn.Linear`` layout are never copied."""

from __future__ import annotations

import torch
from conftest import DEVICE
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

_DEVICE_KEYS = torch._C.DispatchKeySet(
    torch._C.DispatchKey.CUDA if DEVICE.type == "cuda" else torch._C.DispatchKey.CPU
)


class CopiesOf(TorchDispatchMode):
    """Records, as ``copies``, each op that copies a tracked tensor into other memory (clone,
    _to_copy, copy_ into other memory, cat, index). Tracked: the memory of each of ``sources``
    and, with ``of_their_size``, any tensor with as many elements as one of them (a gradient of
    a weight, such as the copy autograd makes of one into the weight's layout when it
    accumulates .grad in a backward run under this mode). It also looks inside the modekernels
    ops, by running their kernels under itself instead of as one opaque call, and inside
    composite ops (``contiguous``, ``to``, ``reshape``, ``matmul``) by decomposing them. (The
    Triton interpreter's copy of an argument's storage back onto itself is not a copy
    elsewhere.)"""

    COPYING_OPS = {"clone", "_to_copy", "copy_", "cat", "index"}

    def __init__(self, *sources: torch.Tensor, of_their_size: bool = False):
        super().__init__()
        self.storages = {t.untyped_storage().data_ptr() for t in sources}
        self.sizes = {t.numel() for t in sources} if of_their_size else set()
        self.copies: list[str] = []

    def _is_tracked(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self.storages or t.numel() in self.sizes

    def _copied(self, name: str, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The tensors whose values the op copies into other memory."""
        if name == "copy_":
            destination, source = args[0], args[1]
            same_memory = destination.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
            return [] if same_memory else [source]
        return [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in self.COPYING_OPS:
            copied = self._copied(name, args, kwargs)
            if any(map(self._is_tracked, copied)):
                self.copies.append(f"{func} of {[tuple(t.shape) for t in copied]}")
        with self:
            if func.namespace == "modekernels":
                return func.redispatch(_DEVICE_KEYS, *args, **kwargs)
            out = func.decompose(*args, **kwargs)
        return func(*args, **kwargs) if out is NotImplemented else out
