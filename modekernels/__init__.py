"""modekernels: fused kernels for modular domain adaptation of pretrained language models.

Ops (also under ``torch.ops.modekernels``): :func:`grouped_mm`. Backend choice:
:func:`use_backend`, :func:`get_backend`, the ``MODEKERNELS_BACKEND`` environment variable.
"""

from modekernels.backends import BackendUnavailable, get_backend, use_backend
from modekernels.ops.grouped_mm import grouped_mm

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "get_backend",
    "grouped_mm",
    "use_backend",
]
