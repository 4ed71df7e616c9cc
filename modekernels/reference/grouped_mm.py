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


def gathered_operands(
    x: torch.Tensor,
    dy: torch.Tensor,
    x_rows: torch.Tensor | None,
    dy_rows: torch.Tensor | None,
    dy_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The row operands of :func:`grouped_mm_weight_grad` made explicit (copies where gathered):
    X[r] = x[x_rows[r]] and DY[r] = dy_scale[r]·dy[dy_rows[r]] rounded to dy's dtype, each index
    or scale the identity when None."""
    if x_rows is not None:
        x = x[x_rows]
    if dy_rows is not None:
        dy = dy[dy_rows]
    if dy_scale is not None:
        dy = (dy.to(accumulation_dtype(dy.dtype)) * dy_scale[:, None]).to(dy.dtype)
    return x, dy


def empty_weight_grad(x: torch.Tensor, E: int, K: int, N: int, transposed: bool) -> torch.Tensor:
    """An uninitialised dw (E, K, N) in x's dtype and on x's device: contiguous, or when
    ``transposed`` with the strides of a contiguous (E, N, K) tensor (the ``nn.Linear`` layout
    of the weight), i.e. ``x.new_empty(E, N, K).transpose(1, 2)``."""
    if transposed:
        return x.new_empty(E, N, K).transpose(1, 2)
    return x.new_empty(E, K, N)


def grouped_mm_weight_grad(
    x: torch.Tensor,
    dy: torch.Tensor,
    offs: torch.Tensor,
    x_rows: torch.Tensor | None = None,
    dy_rows: torch.Tensor | None = None,
    dy_scale: torch.Tensor | None = None,
    transposed: bool = False,
) -> torch.Tensor:
    """dw[e] = X[rows of e]^T @ DY[rows of e]; zero for an empty group.

    X, DY (S, K), (S, N): x and dy, or their rows gathered through x_rows / dy_rows (S,) and
    DY scaled by dy_scale (S,) (:func:`gathered_operands`); offs (E,) -> dw (E, K, N) in x's
    dtype, laid out as :func:`empty_weight_grad` says (the same values either way).
    """
    x, dy = gathered_operands(x, dy, x_rows, dy_rows, dy_scale)
    acc = accumulation_dtype(x.dtype)
    dw = empty_weight_grad(x, offs.shape[0], x.shape[1], dy.shape[1], transposed).zero_()
    for e, (start, end) in enumerate(group_bounds(offs)):
        dw[e] = (x[start:end].to(acc).T @ dy[start:end].to(acc)).to(x.dtype)
    return dw
