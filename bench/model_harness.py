"""What the model-level benchmarks (``bench/test_models_*.py``) share on top of ``harness.py``.

A model benchmark times a *step* of a Hugging Face model built from a config (nothing is
downloaded; real widths, few layers): a training step (forward with labels, backward, AdamW step
over the trainable parameters, gradients set to None) or an inference forward (no grad). It
reports tokens/s, the peak device memory of one step (CUDA only; None on the CPU) and model
TFLOP/s from an approximate FLOP count (2 per multiply-add of the weights a token uses, times 3
for training; attention's score and value products ignored) as a fraction of the measured
matmul rate.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from harness import DEVICE, QUICK, report, synchronize

__all__ = [
    "DTYPE",
    "build_model",
    "inference_step",
    "matmul_flops",
    "missing",
    "peak_memory_bytes",
    "report_model",
    "token_batch",
    "training_step",
]

DTYPE = torch.bfloat16


def missing(module: str, *names: str) -> str | None:
    """Why ``module`` and its attributes ``names`` cannot be used (None when they can): a
    provider whose code is not there yet is skipped with this reason."""
    try:
        found = importlib.import_module(module)
    except Exception as exc:  # an import error inside a module being written counts as absent
        return f"{module} cannot be imported: {type(exc).__name__}: {exc}"
    absent = [n for n in names if not hasattr(found, n)]
    return f"{module} has no {', '.join(absent)} yet" if absent else None


def build_model(model_cls, config) -> torch.nn.Module:
    """``model_cls(config)`` initialised from seed 0 directly on DEVICE (a GPU initialises
    billions of parameters in a second, a CPU in minutes), then cast to DTYPE."""
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = model_cls(config)
    return model.to(dtype=DTYPE)


def token_batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Random token ids (batch, seq) on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=g).to(DEVICE)


def training_step(model: torch.nn.Module, input_ids: torch.Tensor, **forward_kwargs) -> Callable[[], None]:
    """One causal-LM (or masked-LM) training step on ``input_ids`` as its own labels: forward,
    backward, AdamW (foreach) over the trainable parameters, gradients set to None."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=True)

    def step() -> None:
        loss = model(input_ids=input_ids, labels=input_ids, **forward_kwargs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def inference_step(model: torch.nn.Module, input_ids: torch.Tensor, **forward_kwargs) -> Callable[[], object]:
    """One forward without gradients (eval mode); returns the logits."""
    model.eval()

    def step():
        with torch.no_grad():
            return model(input_ids=input_ids, **forward_kwargs).logits

    return step


def peak_memory_bytes(step: Callable[[], object]) -> int | None:
    """Peak allocated device memory during one ``step()`` (including what was allocated before
    it: weights, optimizer state); None on the CPU."""
    if DEVICE.type != "cuda":
        return None
    synchronize()
    torch.cuda.reset_peak_memory_stats(DEVICE)
    step()
    synchronize()
    return torch.cuda.max_memory_allocated(DEVICE)


def report_model(
    benchmark,
    *,
    provider: str,
    baseline: str,
    ceilings,
    tokens: int,
    flops: float,
    peak_bytes: int | None,
) -> None:
    """:func:`harness.report` plus ``tokens_per_s`` and ``peak_memory_gib`` in extra_info."""
    report(benchmark, provider=provider, baseline=baseline, ceilings=ceilings, flops=flops)
    stats = benchmark.stats
    mean_s = stats.stats.mean if stats is not None else None
    benchmark.extra_info["tokens_per_s"] = tokens / mean_s if mean_s else None
    benchmark.extra_info["peak_memory_gib"] = None if peak_bytes is None else peak_bytes / 2**30
    benchmark.extra_info["quick"] = QUICK


def matmul_flops(model: torch.nn.Module, tokens: int, training: bool, skip: Callable[[str], bool] = lambda n: False) -> float:
    """2 · tokens · (weights of every ``nn.Linear`` a token passes through), x3 for training;
    ``skip(name)`` leaves modules out (e.g. experts counted separately)."""
    weights = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not skip(name)
    )
    return (3 if training else 1) * 2 * tokens * weights
