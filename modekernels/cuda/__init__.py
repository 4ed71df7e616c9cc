"""The ``cuda`` backend: host code over the compiled kernels of :mod:`modekernels._C` (``csrc/``).

Its modules import ``modekernels._C`` and are loaded only when the backend runs an op.
"""

from __future__ import annotations

import torch


def current_stream(device: torch.device) -> int:
    """The handle of the current CUDA stream of ``device``, as the kernels' ``stream`` argument."""
    return torch.cuda.current_stream(device).cuda_stream
