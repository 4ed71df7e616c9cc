"""modekernels: fused kernels for modular domain adaptation of pretrained language models.

Ops (also under ``torch.ops.modekernels``): :func:`grouped_mm`, :func:`moe_mlp`,
:func:`neutral_residue`, :func:`route_top1`, :func:`hash_route`, :func:`sort_by_expert`. Backend
choice: :func:`use_backend`, :func:`get_backend`, the ``MODEKERNELS_BACKEND`` environment variable.
"""

from modekernels.backends import BackendUnavailable, get_backend, use_backend
from modekernels.ops.grouped_mm import grouped_mm
from modekernels.ops.moe_mlp import moe_mlp
from modekernels.ops.neutral_residue import neutral_residue
from modekernels.ops.routing import (
    Routing,
    hash_route,
    make_hash_table,
    route_top1,
    sort_by_expert,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "Routing",
    "get_backend",
    "grouped_mm",
    "hash_route",
    "make_hash_table",
    "moe_mlp",
    "neutral_residue",
    "route_top1",
    "sort_by_expert",
    "use_backend",
]
