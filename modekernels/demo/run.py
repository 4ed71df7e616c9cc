"""``modekernels demo``: pretrain a small model on English prose, adapt it to Python source code
with each method, and report the trade-off between forgetting and new-domain gain.

Offline (both corpora ship with Python), on the CPU by default, deterministic for a seed (every
number but tokens/s). Writes ``results.json`` and ``tradeoff.png`` to the output directory and
caches the pretrained checkpoint there.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional

import torch

from modekernels import backends
from modekernels.demo.corpora import ByteTokenizer, Corpus, build_corpus, code_documents, prose_documents
from modekernels.demo.methods import DEMO_METHODS, MethodOptions, adapt_and_train, base_parameter_count
from modekernels.demo.model import ModelSpec, pretrained_model
from modekernels.demo.report import MethodResult, format_table, plot, write_json
from modekernels.demo.train import TrainSettings, evaluate

__all__ = ["DEMO_METHODS", "DemoConfig", "available_methods", "demo_config", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """Model, training budgets and evaluation size. ``mix``: fraction of each adaptation batch
    drawn from the original domain (the same for every method); ``eval_blocks``: eval blocks
    per domain."""

    spec: ModelSpec
    pretrain: TrainSettings
    adapt: TrainSettings
    mix: float = 0.1
    eval_blocks: int = 96
    eval_batch_size: int = 16
    methods: MethodOptions = MethodOptions()


def demo_config(quick: bool = False, steps: Optional[int] = None, large: bool = False) -> DemoConfig:
    """The default budget (about two minutes of one CPU core), with ``quick`` a tiny model and a
    few steps (seconds, for tests), or with ``large`` a 25M-parameter model trained longer on
    bigger batches (for a GPU). ``steps`` overrides the adaptation steps per method; the
    adaptation learning rate is each method's own (``MethodOptions.lr_for``)."""
    if quick and large:
        raise ValueError("--quick and --large exclude each other")
    if large:
        config = DemoConfig(
            spec=ModelSpec(layers=8, hidden=512, heads=8, context=256),
            pretrain=TrainSettings(steps=1500, batch_size=32, lr=1e-3),
            adapt=TrainSettings(steps=300, batch_size=32, lr=0.0),
        )
    elif quick:
        config = DemoConfig(
            spec=ModelSpec(layers=2, hidden=32, heads=2, context=32),
            pretrain=TrainSettings(steps=30, batch_size=8, lr=3e-3),
            adapt=TrainSettings(steps=10, batch_size=8, lr=0.0),
            eval_blocks=8,
            eval_batch_size=8,
        )
    else:
        config = DemoConfig(
            spec=ModelSpec(layers=4, hidden=128, heads=4, context=128),
            pretrain=TrainSettings(steps=300, batch_size=8, lr=2e-3),
            adapt=TrainSettings(steps=100, batch_size=8, lr=0.0),
        )
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps must be at least 1, got {steps}")
        config = replace(config, adapt=replace(config.adapt, steps=steps))
    return config


def available_methods() -> tuple[list[str], dict[str, str]]:
    """The methods that can run here, and for each one that cannot, why."""
    needs = {
        "lora": "peft",
        "adapter": "modekernels.hf.adapters",
        "neutral-residues": "modekernels.hf.neutral_residues",
        "adamix": "modekernels.hf.adamix",
        "mode": "modekernels.hf.domain_experts",
    }
    runnable, skipped = [], {}
    for method in DEMO_METHODS:
        try:
            if method in needs:
                __import__(needs[method])
        except ImportError as exc:
            skipped[method] = f"{needs[method]} cannot be imported ({exc})"
        else:
            runnable.append(method)
    return runnable, skipped


def backends_used(model: torch.nn.Module, ids: torch.Tensor, inputs: Optional[Callable]) -> str:
    """``op=backend`` for each modekernels op that one forward of ``model`` on ``ids`` runs, or
    ``"torch"`` when it runs none (plain PyTorch modules only)."""
    extra = inputs(torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)) if inputs else {}
    with torch.no_grad(), backends.record_runs() as runs:
        model(input_ids=ids, **extra)
    if not runs:
        return "torch"
    return ", ".join(f"{op}={backend}" for op, backend in sorted(runs.items()))


def _corpora(config: DemoConfig, tokenizer: ByteTokenizer) -> tuple[Corpus, Corpus]:
    block = config.spec.context
    original = build_corpus("prose", prose_documents(), tokenizer.encode, tokenizer.eos_id, block,
                            max_eval_blocks=config.eval_blocks)
    new = build_corpus("code", code_documents(), tokenizer.encode, tokenizer.eos_id, block,
                       max_eval_blocks=config.eval_blocks)
    return original, new


def run_demo(
    *,
    device: str = "cpu",
    seed: int = 0,
    out: str = "demo_out",
    steps: Optional[int] = None,
    quick: bool = False,
    methods: Optional[list[str]] = None,
    threads: Optional[int] = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    large: bool = False,
) -> list[MethodResult]:
    """Run the demo and write ``results.json`` and ``tradeoff.png`` under ``out``; returns the
    rows of the table (also printed through ``log``). ``methods`` picks a subset of
    :data:`DEMO_METHODS`; ``threads`` sets torch's CPU threads for the run (the model's small
    matrices gain little from more, and one thread stays fast on a busy machine)."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(device, seed, out, steps, quick, methods, progress, log, large)
    finally:
        torch.set_num_threads(previous_threads)


def _run(device, seed, out, steps, quick, methods, progress, log, large) -> list[MethodResult]:
    started = time.perf_counter()
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch sees no CUDA device")
    config = demo_config(quick, steps, large)
    runnable, skipped = available_methods()
    if methods is not None:
        unknown = sorted(set(methods) - set(DEMO_METHODS))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {list(DEMO_METHODS)}")
        runnable = [m for m in runnable if m in methods]
    os.makedirs(out, exist_ok=True)

    tokenizer = ByteTokenizer()
    original, new = _corpora(config, tokenizer)
    log(f"original domain: {original.name} ({original.train.numel():,} train tokens); "
        f"new domain: {new.name} ({new.train.numel():,} train tokens); byte tokenizer; device {device}")
    base, cached = pretrained_model(config.spec, original, config.pretrain, seed=seed, device=device,
                                    cache_dir=out, progress=progress)
    base.requires_grad_(False)
    base_parameters = base_parameter_count(base)
    log(f"model: {config.spec.family}, {config.spec.layers} layers, hidden {config.spec.hidden}, "
        f"{base_parameters:,} parameters, pretrained {config.pretrain.steps} steps"
        + (" (cached)" if cached else ""))

    def losses(model, inputs=None) -> tuple[float, float]:
        kwargs = dict(batch_size=config.eval_batch_size, device=device, inputs=inputs)
        return (evaluate(model, original.eval, original=True, **kwargs),
                evaluate(model, new.eval, original=False, **kwargs))

    original_before, new_before = losses(base)
    results = []
    for method in runnable:
        torch.manual_seed(seed)
        adapted, run = adapt_and_train(
            method, copy.deepcopy(base), config.methods, new, original, config.adapt, config.mix,
            torch.Generator().manual_seed(seed + 1), device=device, progress=progress,
        )
        original_after, new_after = losses(adapted.model, adapted.inputs)
        results.append(MethodResult(
            method=method, note=adapted.note,
            original_before=original_before, original_after=original_after,
            new_before=new_before, new_after=new_after,
            added_parameters=adapted.added_parameters, base_parameters=base_parameters,
            trainable_parameters=sum(p.numel() for p in adapted.parameters), lr=adapted.lr,
            train_tokens_per_s=run.tokens_per_s, train_seconds=run.seconds,
            backend=backends_used(adapted.model, new.eval[:1].to(device), adapted.inputs),
        ))
        log(f"  {method}: {adapted.note}; {run.seconds:.1f} s")

    wall = time.perf_counter() - started
    log("")
    log(format_table(results))
    log("")
    log("losses: next-token cross-entropy in nats per byte on held-out text; forgetting = original "
        f"after - before; every method sees the same batches ({config.adapt.steps} steps of "
        f"{config.adapt.batch_size}x{config.spec.context} tokens, {config.mix:.0%} of rows from the original domain)")
    for method, reason in skipped.items():
        log(f"skipped {method}: {reason}")
    settings = {
        "seed": seed, "device": str(device), "quick": quick, "large": large, "model": asdict(config.spec),
        "parameters": base_parameters, "pretrain": asdict(config.pretrain),
        "pretrained_from_cache": cached,
        "adapt": {k: v for k, v in asdict(config.adapt).items() if k != "lr"}, "mix": config.mix,
        "method_options": asdict(config.methods),
        "corpora": {c.name: {"train_tokens": c.train.numel(), "eval_tokens": c.eval.numel()} for c in (original, new)},
        "skipped": skipped, "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
        "wall_seconds": wall,
    }
    json_path, png_path = os.path.join(out, "results.json"), os.path.join(out, "tradeoff.png")
    write_json(json_path, results, settings)
    plot(png_path, results, f"Adapting a {base_parameters:,}-parameter byte-level {config.spec.family} "
         f"from English prose to Python code (seed {seed})")
    log(f"wrote {json_path} and {png_path} ({wall:.0f} s)")
    return results
