"""StackedModules: E identical modules run as one over sequences grouped by module, against
running each module on its own sequences."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, backend_params
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.pytorch_utils import Conv1D

import modekernels
from modekernels.nn import Grouping, StackedModules

D, FF, T = 12, 20, 5
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


class Block(nn.Module):
    """Every supported leaf, a buffer, dropout and a mix along the sequence."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.up = nn.Linear(D, FF)
        self.conv = Conv1D(D, FF)
        self.head_norm = LlamaRMSNorm(D // 3)  # on a (P, T, 3, 4) view, as Qwen3's q_norm
        self.rms = LlamaRMSNorm(D)
        self.out = nn.Linear(D, D, bias=False)
        self.drop = nn.Dropout(0.5)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x, mask):
        h = self.conv(torch.relu(self.up(self.norm(x))))
        h = self.head_norm(h.view(*h.shape[:-1], 3, D // 3)).flatten(-2)
        h = self.rms(h) * mask[..., None]
        return x + self.drop(self.out(h.cumsum(1) * self.scale))


def blocks(n: int, dtype=torch.float32) -> list:
    out = []
    for _ in range(n):
        block = Block()
        with torch.no_grad():
            for p in block.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        out.append(block.to(DEVICE, dtype).eval())
    return out


def grouping(sizes, tail, members):
    """Sequences sorted by group (sizes[g] in group g), then ``tail`` in no group."""
    group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    group = torch.cat([group, torch.zeros(tail, dtype=torch.int64)])
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    return Grouping(tuple(members), group.to(DEVICE), offs.to(DEVICE))


def one_by_one(sources, g, x, mask):
    """The oracle: each routed sequence through its own module."""
    routed = g.group.tolist()[: int(g.offs[-1])]
    rows = [sources[g.members[k]](x[p : p + 1], mask[p : p + 1]) for p, k in enumerate(routed)]
    return torch.cat(rows) if rows else x[:0]


def grads(params):
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


CASES = [  # (name, sizes per group, sequences in no group, members)
    ("mixed with an empty group", [2, 0, 3], 1, (2, 0, 3)),
    ("one group holds every sequence", [4], 0, (1,)),
    ("a single sequence", [0, 1], 2, (0, 3)),
    ("zero sequences", [0, 0], 0, (1, 2)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name, sizes, tail, members", CASES, ids=[c[0] for c in CASES])
def test_stacked_modules_equal_each_module_on_its_own_sequences(name, sizes, tail, members, dtype):
    sources = blocks(4, dtype)
    stacked = StackedModules(sources).eval()
    g = grouping(sizes, tail, members)
    rows = sum(sizes) + tail
    x = torch.randn(rows, T, D, device=DEVICE, dtype=dtype, requires_grad=True)
    mask = (torch.rand(rows, T, device=DEVICE) > 0.2).to(dtype)
    with modekernels.use_backend("reference"):
        out = stacked(g, x, mask)
    routed = sum(sizes)
    expected = one_by_one(sources, g, x, mask)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out[:routed], expected, rtol=tol, atol=tol)
    assert out.shape == x.shape and torch.isfinite(out[routed:]).all()
    if dtype != torch.float32:
        return
    params = [p for s in sources for p in s.parameters()]
    weights = torch.randn_like(expected)
    with modekernels.use_backend("reference"):
        stacked_grads = torch.autograd.grad((out[:routed] * weights).sum(), [x, *params], allow_unused=True)
    oracle_grads = torch.autograd.grad((expected * weights).sum(), [x, *params], allow_unused=True)
    for got, want, p in zip(stacked_grads, oracle_grads, [x, *params]):
        got = torch.zeros_like(p) if got is None else got
        want = torch.zeros_like(p) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params("triton"))
def test_stacked_modules_on_the_triton_grouped_gemm(backend):
    sources = blocks(3)
    stacked = StackedModules(sources).eval()
    g = grouping([1, 2], 1, (2, 0))
    x = torch.randn(4, T, D, device=DEVICE, requires_grad=True)
    mask = torch.ones(4, T, device=DEVICE)
    with modekernels.use_backend(backend):
        out = stacked(g, x, mask)
        (dx,) = torch.autograd.grad(out[:3].sum(), x)
    expected = one_by_one(sources, g, x, mask)
    (dx_expected,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(out[:3], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_expected, rtol=1e-5, atol=1e-5)


def test_the_sources_keep_their_parameters_and_the_template_follows_them():
    sources = blocks(2)
    stacked = StackedModules(sources)
    assert list(stacked.parameters()) == [] and stacked.num_modules == 2
    assert "StackedLinear" in repr(stacked) and "StackedRMSNorm" in repr(stacked)
    g = grouping([1, 1], 0, (0, 1))
    x, mask = torch.randn(2, T, D, device=DEVICE), torch.ones(2, T, device=DEVICE)
    with modekernels.use_backend("reference"):
        with torch.no_grad():
            sources[1].out.weight.mul_(2)  # read at each call: no stale copy
            out = stacked.eval()(g, x, mask)
        torch.testing.assert_close(out, one_by_one(sources, g, x, mask), rtol=1e-5, atol=1e-5)
        stacked.train()  # the template's own training flag: dropout now applies
        assert stacked.template.drop.training and not sources[0].drop.training
        assert not torch.allclose(stacked(g, x, mask), out)
    for s in sources:
        s.to(torch.float64)
    assert stacked.template.scale.dtype == torch.float64  # buffers are shared with the first source


def test_stacking_rejects_what_it_cannot_stack():
    embedding = r"torch\.nn\.modules\.sparse\.Embedding at 1: it holds parameters \['weight'\]"
    with pytest.raises(TypeError, match=embedding):
        StackedModules([nn.Sequential(nn.Linear(2, 2), nn.Embedding(3, 2)) for _ in range(2)])
    with pytest.raises(ValueError, match="cannot stack module 1 at <root>: parameters"):
        StackedModules([nn.Linear(2, 3), nn.Linear(2, 4)])
    with pytest.raises(ValueError, match="cannot stack module 1 at 0: LayerNorm"):
        StackedModules([nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.LayerNorm(2))])
    with pytest.raises(ValueError, match="at least one module"):
        StackedModules([])
    stacked = StackedModules([nn.Linear(2, 3), nn.Linear(2, 3)])
    with pytest.raises(RuntimeError, match="only inside StackedModules.forward"):
        stacked.template(torch.randn(2, 2))
    with pytest.raises(ValueError, match=r"input of shape \(3, 2\) does not start with the 2 sequences"):
        stacked(grouping([1, 1], 0, (0, 1)), torch.randn(3, 2))
