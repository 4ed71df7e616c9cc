"""``modekernels adapt``: adapt a local Hugging Face causal LM to a text corpus with one method.

The model comes from a local checkpoint directory (``from_pretrained(local_files_only=True)``)
or is built from a config JSON. Text is tokenized with the checkpoint's own tokenizer when the
directory has one, else with the byte tokenizer. Both domains are evaluated before and after
training; what the method added is saved to the output directory (the whole model for full
fine-tuning, the PEFT adapter for LoRA, ``save_modules`` for the others) with
``adapt_report.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional

import torch

from modekernels.demo.corpora import ByteTokenizer, Corpus, text_file_corpus
from modekernels.demo.methods import METHODS, MethodOptions, adapt_and_train, base_parameter_count
from modekernels.demo.train import TrainSettings, evaluate

__all__ = ["AdaptArgs", "load_model", "load_tokenizer", "run_adapt"]

REPORT_NAME = "adapt_report.json"
# Files of which one marks a checkpoint directory that carries its tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class AdaptArgs:
    """The ``modekernels adapt`` arguments (see ``modekernels adapt --help``)."""

    new_domain: str
    method: str
    out: str
    model: Optional[str] = None
    config: Optional[str] = None
    original_domain: Optional[str] = None
    steps: int = 200
    batch_size: int = 8
    block_size: int = 128
    lr: Optional[float] = None
    ratio: float = MethodOptions.ratio
    alpha: float = MethodOptions.alpha
    mix: float = 0.1
    eval_blocks: int = 32
    device: str = "cpu"
    seed: int = 0


def _check_file(path: Optional[str], flag: str) -> None:
    if path is not None and not os.path.isfile(path):
        raise ValueError(f"{flag}: no such file: {path}")


def validate(args: AdaptArgs) -> None:
    """Raise ValueError naming the offending argument."""
    if args.method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}; got {args.method!r}")
    if (args.model is None) == (args.config is None):
        raise ValueError("give exactly one of --model DIR (a local checkpoint) or --config FILE (a config JSON)")
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        raise ValueError(f"--model: {args.model} is not a checkpoint directory (no config.json in it)")
    _check_file(args.config, "--config")
    _check_file(args.new_domain, "--new-domain")
    _check_file(args.original_domain, "--original-domain")
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--block-size", args.block_size), ("--eval-blocks", args.eval_blocks)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if not 0 <= args.mix < 1:
        raise ValueError(f"--mix must be in [0, 1), got {args.mix}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: torch sees no CUDA device")


def load_model(args: AdaptArgs, seed: int):
    """The causal LM of ``--model`` (local files only) or built from ``--config``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.model is not None:
        return AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True)
    with open(args.config) as file:
        fields = json.load(file)
    if "model_type" not in fields:
        raise ValueError(f"--config: {args.config} has no \"model_type\" (for example \"gpt2\" or \"llama\")")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields))


def load_tokenizer(model_dir: Optional[str], vocab_size: int) -> tuple[Callable[[str], list], Optional[int], str]:
    """``(encode, eos_id, description)``: the checkpoint's tokenizer when ``model_dir`` has one,
    else the byte tokenizer (which needs a vocabulary of at least its 258 ids)."""
    if model_dir is not None and any(os.path.isfile(os.path.join(model_dir, name)) for name in TOKENIZER_FILES):
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError, TypeError):
            tokenizer = None
        if tokenizer is not None:
            encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
            return encode, tokenizer.eos_token_id, f"{type(tokenizer).__name__} from {model_dir}"
    byte = ByteTokenizer()
    if vocab_size < byte.vocab_size:
        raise ValueError(
            f"--model: no tokenizer files in the checkpoint and its vocabulary ({vocab_size}) is "
            f"smaller than the byte tokenizer's {byte.vocab_size} ids"
        )
    return byte.encode, byte.eos_id, "byte tokenizer (the checkpoint has none)"


def _context_length(config) -> Optional[int]:
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def run_adapt(args: AdaptArgs, *, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Adapt, evaluate before and after, save to ``args.out``; returns the report written there."""
    validate(args)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = load_model(args, args.seed).to(device).eval()
    model.requires_grad_(False)
    encode, eos_id, tokenizer_name = load_tokenizer(args.model, model.config.vocab_size)
    block = min(args.block_size, _context_length(model.config) or args.block_size)
    new = text_file_corpus(args.new_domain, encode, eos_id, block, max_eval_blocks=args.eval_blocks)
    original: Optional[Corpus] = None
    if args.original_domain is not None:
        original = text_file_corpus(args.original_domain, encode, eos_id, block, max_eval_blocks=args.eval_blocks)
    log(f"model: {type(model).__name__}, {base_parameter_count(model):,} parameters; tokenizer: {tokenizer_name}; "
        f"blocks of {block} tokens; new domain {new.train.numel():,} train tokens"
        + (f"; original domain {original.train.numel():,}" if original is not None else ""))

    options = MethodOptions(ratio=args.ratio, alpha=args.alpha)
    if args.lr is not None:
        options = replace(options, lr={args.method: args.lr})

    def losses(m, inputs=None) -> dict:
        kwargs = dict(batch_size=args.batch_size, device=device, inputs=inputs)
        out = {"new": evaluate(m, new.eval, original=False, **kwargs)}
        if original is not None:
            out["original"] = evaluate(m, original.eval, original=True, **kwargs)
        return out

    before = losses(model)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, lr=0.0)  # lr: the method's
    adapted, run = adapt_and_train(
        args.method, model, options, new, original, settings, args.mix,
        torch.Generator().manual_seed(args.seed), device=device, progress=progress,
    )
    after = losses(adapted.model, adapted.inputs)
    os.makedirs(args.out, exist_ok=True)
    adapted.save(args.out)
    report = {
        "method": args.method, "note": adapted.note, "losses_before": before, "losses_after": after,
        "added_parameters": adapted.added_parameters,
        "trainable_parameters": sum(p.numel() for p in adapted.parameters),
        "train_tokens_per_s": run.tokens_per_s, "train_seconds": run.seconds,
        "tokenizer": tokenizer_name, "block_size": block, "settings": asdict(replace(settings, lr=adapted.lr)),
        "args": asdict(args),
    }
    with open(os.path.join(args.out, REPORT_NAME), "w") as file:
        json.dump(report, file, indent=2)
        file.write("\n")
    for domain in before:
        log(f"{domain} domain loss: {before[domain]:.4f} -> {after[domain]:.4f} ({after[domain] - before[domain]:+.4f})")
    log(f"{args.method}: {adapted.note}; {adapted.added_parameters:,} parameters added; "
        f"{run.tokens_per_s:,.0f} train tokens/s; saved to {args.out}")
    return report
