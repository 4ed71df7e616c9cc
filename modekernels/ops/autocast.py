"""The ops under ``torch.autocast``: which floating inputs are cast, and to what.

Each op registers a kernel for the CPU's and CUDA's autocast dispatch keys (:func:`register`)
that casts the inputs its policy names and runs the op with autocast off, so that the op's own
kernel (the reference's torch matmuls included) computes in the dtypes it was given. The casts
are differentiable: gradients reach float32 parameters in float32. The policies follow torch's
own ops (``aten/src/ATen/autocast_mode.cpp``):

- the matmul operands of ``moe_mlp_up``, ``moe_mlp_down`` and ``neutral_residue`` (weights,
  biases, and the residual added in the epilogue, as ``addmm`` casts its input) are cast to the
  autocast dtype of the device type (``torch.get_autocast_dtype``), like ``mm``/``linear``;
  they accumulate in float32 and return that dtype. ``moe_mlp_down``'s gate, a per-row scale
  read in float32, keeps its dtype. The float32 outputs by contract (the neutral residue's gate
  and l1, the routing losses) stay float32.
- ``route_top1``'s logits are cast to float32, like ``softmax`` and ``logsumexp`` on CUDA, so
  its gate is float32.
- ``grouped_mm`` and every backward op cast nothing, like ``torch._grouped_mm``, which autocast
  leaves alone: they run in their inputs' dtypes.

``torch.library.register_autocast`` is not used: it fixes one dtype per device type when it is
registered (the CUDA autocast dtype, float16 or bfloat16, is the caller's choice for each
region) and casts every floating input, the float32-by-contract ones included.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` gives matmuls on ``device_type`` here, None where it is off."""
    if device_type not in AUTOCAST_KEYS or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _cast(value: object, device_type: str, dtype: torch.dtype) -> object:
    """A floating tensor on ``device_type`` cast to ``dtype`` (float64 excepted, as autocast
    does); anything else unchanged."""
    eligible = (
        isinstance(value, torch.Tensor) and value.is_floating_point()
        and value.device.type == device_type and value.dtype != torch.float64
    )
    return value.to(dtype) if eligible else value


def autocast_operands(values: Sequence) -> tuple:
    """``values`` with their floating tensors cast as the matmul policy casts them, for a public
    function whose checks must see the dtypes the op will run in; unchanged where autocast is
    off on the device type of the first value (x), or where that is not a tensor."""
    if not isinstance(values[0], torch.Tensor):
        return tuple(values)
    device_type = values[0].device.type
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return tuple(values)
    return tuple(_cast(value, device_type, dtype) for value in values)


def register(qualname: str, cast: Sequence[int] = (), to: torch.dtype | None = None) -> None:
    """Give the op ``qualname`` ("namespace::name") its autocast rule on the CPU and CUDA: the
    arguments at the positions ``cast`` are cast to ``to`` (None: the autocast dtype of the
    device type), then the op runs with autocast off."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    for device_type, key in AUTOCAST_KEYS.items():
        torch.library.impl(qualname, key, _kernel(op, device_type, key, tuple(cast), to))


def _kernel(
    op: torch._ops.OpOverload, device_type: str, key: str, cast: tuple[int, ...], to
) -> Callable:
    """The kernel of ``op`` for the autocast dispatch key ``key`` of ``device_type``."""
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def run_autocast(*args):
        dtype = to or torch.get_autocast_dtype(device_type)
        args = [_cast(a, device_type, dtype) if i in cast else a for i, a in enumerate(args)]
        with torch._C._ExcludeDispatchKeyGuard(excluded):  # as torch.library.register_autocast
            return op(*args)

    return run_autocast
