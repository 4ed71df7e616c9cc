"""Adapter and AdapterMixture (AdaMix): the bottleneck formula on every backend, zero output at
init, uniform random draws (χ²), zero gradient for the copies not drawn, and an exact merge."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, backend_params

import modekernels
from modekernels.nn import Adapter, AdapterMixture

BACKENDS = backend_params("reference", "triton")
# χ² critical values at p = 0.001, by degrees of freedom.
CHI2_CRITICAL = {3: 16.27, 15: 37.70}


def _bottleneck(x, w_in, b_in, w_out, b_out, activation):
    """The adapter in plain PyTorch."""
    act = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu}[activation]
    return F.linear(act(F.linear(x, w_in, b_in)), w_out, b_out)


def _randomise(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "silu", "relu"])
@pytest.mark.parametrize("lead", [(2, 9), (1,), (0,)], ids=str)
def test_adapter_matches_plain_pytorch(backend, activation, lead):
    adapter = _randomise(Adapter(33, 7, activation)).to(DEVICE).double()
    x = torch.randn(*lead, 33, dtype=torch.float64, device=DEVICE, requires_grad=True)
    residual = torch.randn(*lead, 33, dtype=torch.float64, device=DEVICE)
    expected = residual + _bottleneck(
        x, adapter.w_in, adapter.b_in, adapter.w_out, adapter.b_out, activation
    )
    params = [x, *adapter.parameters()]
    expected_grads = torch.autograd.grad((expected * expected).sum(), params)
    test = Adapter(33, 7, activation).to(DEVICE)
    test.load_state_dict({k: v.float() for k, v in adapter.state_dict().items()})
    xf = x.detach().float().requires_grad_()
    with modekernels.use_backend(backend):
        y = test(xf, residual.float())
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad((y * y).sum(), [xf, *test.parameters()])
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("module", [Adapter(16, 4), AdapterMixture(16, 4, 3)], ids=type)
def test_output_is_zero_at_init(module):
    x = torch.randn(5, 16)
    assert torch.equal(module(x), torch.zeros_like(x))
    assert torch.equal(module.eval()(x), torch.zeros_like(x))


def test_draws_are_uniform_and_independent():
    torch.manual_seed(1234)
    m, n = 4, 4000
    mixture = AdapterMixture(8, 2, m)
    draws = torch.stack([mixture.sample_copies() for _ in range(n)])
    for column in (0, 1):
        counts = torch.bincount(draws[:, column], minlength=m).double()
        chi2 = ((counts - n / m) ** 2 / (n / m)).sum().item()
        assert chi2 < CHI2_CRITICAL[m - 1], (column, counts)
    joint = torch.bincount(draws[:, 0] * m + draws[:, 1], minlength=m * m).double()
    chi2 = ((joint - n / m**2) ** 2 / (n / m**2)).sum().item()
    assert chi2 < CHI2_CRITICAL[m * m - 1], joint


def test_chi2_check_rejects_a_biased_draw():
    """The uniformity statistic above does detect a skewed draw."""
    counts = torch.tensor([1300.0, 1000.0, 900.0, 800.0])
    chi2 = ((counts - 1000) ** 2 / 1000).sum().item()
    assert chi2 > CHI2_CRITICAL[3]


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_forward_uses_the_drawn_copies_only(backend):
    mixture = _randomise(AdapterMixture(12, 5, 4, activation="gelu")).to(DEVICE)
    x = torch.randn(3, 6, 12, device=DEVICE)
    torch.manual_seed(7)
    i, j = mixture.sample_copies()
    torch.manual_seed(7)
    with modekernels.use_backend(backend):
        y = mixture.train()(x)
    expected = _bottleneck(
        x, mixture.w_in[i], mixture.b_in[i], mixture.w_out[j], mixture.b_out[j], "gelu"
    )
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    for name, drawn in (("w_in", i), ("b_in", i), ("w_out", j), ("b_out", j)):
        grad = getattr(mixture, name).grad
        for copy in range(4):
            assert bool(grad[copy].any()) == (copy == drawn), (name, copy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_uses_the_average_and_merge_is_exact(backend):
    mixture = _randomise(AdapterMixture(20, 6, 3, activation="silu")).to(DEVICE).eval()
    x = torch.randn(11, 20, device=DEVICE)
    merged = mixture.merge()
    assert isinstance(merged, Adapter)
    for name in ("w_in", "b_in", "w_out", "b_out"):
        stacked = getattr(mixture, name)
        assert torch.equal(getattr(merged, name), stacked.sum(0) / 3), name
    with modekernels.use_backend(backend):
        y_mix = mixture(x)
        y_merged = merged(x)
    assert torch.equal(y_mix, y_merged)
    expected = _bottleneck(
        x, *(getattr(merged, n) for n in ("w_in", "b_in", "w_out", "b_out")), "silu"
    )
    torch.testing.assert_close(y_mix, expected, rtol=1e-5, atol=1e-5)


def test_merge_keeps_device_and_dtype():
    merged = AdapterMixture(8, 3, 2).to(torch.bfloat16).merge()
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="num_adapters"):
        AdapterMixture(8, 2, 0)
    with pytest.raises(ValueError, match=r"w_in.shape\[1\]"):
        Adapter(8, 2)(torch.randn(3, 9))


def test_adapter_compiles_fullgraph():
    adapter = _randomise(Adapter(16, 4)).to(DEVICE)
    x = torch.randn(7, 16, device=DEVICE)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(adapter, fullgraph=True)(x), adapter(x))


def _drawn_copy(grad: torch.Tensor) -> int:
    """The one copy of a stacked parameter whose gradient is not all zero."""
    touched = [copy for copy in range(grad.shape[0]) if bool(grad[copy].any())]
    assert len(touched) == 1, touched
    return touched[0]


def test_mixture_trains_under_compile_fullgraph():
    """The training forward (random copies included) compiles into one graph; each call runs
    the drawn copies only, and the draws change from call to call."""
    mixture = _randomise(AdapterMixture(16, 4, 3, activation="gelu")).to(DEVICE).train()
    x = torch.randn(2, 5, 16, device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(mixture, fullgraph=True)
    pairs = set()
    for _ in range(12):
        mixture.zero_grad()
        y = compiled(x)
        y.square().sum().backward()
        i, j = _drawn_copy(mixture.w_in.grad), _drawn_copy(mixture.w_out.grad)
        assert (_drawn_copy(mixture.b_in.grad), _drawn_copy(mixture.b_out.grad)) == (i, j)
        expected = _bottleneck(
            x, mixture.w_in[i], mixture.b_in[i], mixture.w_out[j], mixture.b_out[j], "gelu"
        )
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
        pairs.add((i, j))
    assert len(pairs) > 1, "the compiled forward draws new copies on every call"
