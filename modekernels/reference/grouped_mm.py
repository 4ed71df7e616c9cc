"""Reference grouped GEMM: a readable loop over the groups, accumulating in float32 or wider."""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_bounds(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    return list(zip(starts, ends))


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """y[r] = x[r] @ w[e] for the rows r of group e; rows at or past offs[-1] are zero.

    x (S, K), w (E, K, N), offs (E,) cumulative end rows -> y (S, N) in x's dtype.
    """
    acc = accumulation_dtype(x.dtype)
    y = x.new_zeros(x.shape[0], w.shape[2])
    for e, (start, end) in enumerate(group_bounds(offs)):
        y[start:end] = (x[start:end].to(acc) @ w[e].to(acc)).to(x.dtype)
    return y


def grouped_mm_weight_grad(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """dw[e] = x[rows of e]^T @ dy[rows of e]; zero for an empty group.

    x (S, K), dy (S, N), offs (E,) -> dw (E, K, N) in x's dtype.
    """
    acc = accumulation_dtype(x.dtype)
    dw = x.new_zeros(offs.shape[0], x.shape[1], dy.shape[1])
    for e, (start, end) in enumerate(group_bounds(offs)):
        dw[e] = (x[start:end].to(acc).T @ dy[start:end].to(acc)).to(x.dtype)
    return dw
