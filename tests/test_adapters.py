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


def _assert_close_to(actual, expected, tolerance, what):
    """max |actual - expected| within tolerance × max(max |expected|, 1)."""
    scale = max(expected.abs().max().item(), 1.0)
    error = (actual.double() - expected).abs().max().item()
    assert error <= tolerance * scale, f"{what}: error {error}, scale {scale}"


# Half-precision tolerances: the adapter rounds x·W_in, h and the output to 16 bits.
HALF_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 4e-2}


@pytest.mark.parametrize("backend", backend_params("reference", "triton", "cuda"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["adapter", "mixture-train", "mixture-eval"])
def test_half_precision_matches_plain_pytorch(backend, dtype, kind):
    """Adapter and AdapterMixture (both modes) in float16 / bfloat16 through each backend:
    output and gradients in that dtype, close to float64 on the same (rounded) values."""
    if kind == "adapter":
        module = Adapter(24, 6, "gelu")
    else:
        module = AdapterMixture(24, 6, 3, "gelu").train(kind == "mixture-train")
    module = _randomise(module).to(DEVICE, dtype)
    x = torch.randn(2, 5, 24, device=DEVICE).to(dtype).requires_grad_()
    residual = torch.randn(2, 5, 24, device=DEVICE).to(dtype)
    torch.manual_seed(3)  # the mixture's draw in training
    with modekernels.use_backend(backend):
        y = module(x, residual)
    params = [module.w_in, module.b_in, module.w_out, module.b_out]
    exact_x = x.detach().double().requires_grad_()
    exact = [p.detach().double().requires_grad_() for p in params]
    if kind == "mixture-train":
        torch.manual_seed(3)
        i, j = module.sample_copies()
        weights = [exact[0][i], exact[1][i], exact[2][j], exact[3][j]]
    elif kind == "mixture-eval":
        weights = [p.sum(0) / 3 for p in exact]
    else:
        weights = exact
    expected = residual.double() + _bottleneck(exact_x, *weights, "gelu")
    assert y.dtype == dtype
    _assert_close_to(y, expected.detach(), HALF_TOLERANCE[dtype], "y")
    grads = torch.autograd.grad(y.float().square().sum(), [x, *params])
    expected_grads = torch.autograd.grad(expected.square().sum(), [exact_x, *exact])
    for name, a, e in zip(("x", "w_in", "b_in", "w_out", "b_out"), grads, expected_grads):
        assert a.dtype == dtype, name
        _assert_close_to(a, e, 2 * HALF_TOLERANCE[dtype], f"d{name}")


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


def test_merge_draws_no_random_numbers():
    mixture = AdapterMixture(8, 3, 2)
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    mixture.merge()
    assert torch.equal(torch.rand(4), expected)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match=r"w_in.shape\[1\]"):
        Adapter(8, 2)(torch.randn(3, 9))


@pytest.mark.parametrize("build, match", [
    (lambda: AdapterMixture(8, 2, 0), "^num_adapters must be a positive int"),
    (lambda: AdapterMixture(8, 2, 2.0), "^num_adapters must be a positive int"),
    (lambda: AdapterMixture(8, 0, 2), "^d_adapter must be a positive int"),
    (lambda: AdapterMixture(8, 2, 2, "swish"), "^activation must be one of"),
    (lambda: Adapter(0, 2), "^d_model must be a positive int"),
    (lambda: Adapter(8, -2), "^d_adapter must be a positive int"),
    (lambda: Adapter(8, True), "^d_adapter must be a positive int"),
    (lambda: Adapter(8, 2, "swish"), "^activation must be one of"),
], ids=["mixture-no-copies", "mixture-float-copies", "mixture-d_adapter", "mixture-activation",
        "d_model", "d_adapter", "d_adapter-bool", "activation"])
def test_bad_arguments_raise_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


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
