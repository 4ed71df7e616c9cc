"""The training loop shared by pretraining and every adaptation method: AdamW, a fixed number of
steps, linear warm-up then cosine decay, gradient clipping, a tqdm progress bar and tokens/s."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from modekernels.demo.corpora import Corpus

__all__ = ["TrainResult", "TrainSettings", "batches", "evaluate", "train"]

# A batch: token ids (B, T) int64 and a (B, T) bool mask of the tokens from the original domain.
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    clip_norm: float = 1.0


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    final_loss: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def batches(
    corpus: Corpus,
    original: Corpus | None,
    batch_size: int,
    mix: float,
    generator: torch.Generator,
) -> Iterator[Batch]:
    """Endless batches of ``batch_size`` train blocks drawn at random (with ``generator``) from
    ``corpus``; when ``original`` is given, ``round(mix * batch_size)`` rows (at least one if
    ``mix > 0``) come from its train blocks instead, flagged in the mask."""
    from_original = 0
    if original is not None and mix > 0:
        from_original = min(batch_size - 1, max(1, round(mix * batch_size)))
    while True:
        rows = corpus.train[torch.randint(len(corpus.train), (batch_size - from_original,), generator=generator)]
        mask = torch.zeros(rows.shape, dtype=torch.bool)
        if from_original:
            extra = original.train[torch.randint(len(original.train), (from_original,), generator=generator)]
            rows = torch.cat([extra, rows])
            mask = torch.cat([torch.ones(extra.shape, dtype=torch.bool), mask])
        yield rows, mask


def _schedule(settings: TrainSettings) -> Callable[[int], float]:
    warmup = max(1, int(settings.warmup_fraction * settings.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, settings.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def train(
    model: torch.nn.Module,
    parameters: Sequence[torch.nn.Parameter],
    data: Iterator[Batch],
    settings: TrainSettings,
    *,
    device: torch.device,
    desc: str,
    extra_loss: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
    inputs: Callable[[torch.Tensor], dict] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``parameters`` of ``model`` for ``settings.steps`` steps on ``data`` with the
    language-modelling loss plus ``extra_loss(model, original_mask)`` when given (called right
    after the forward, so it can read what the forward recorded); ``inputs(original_mask)`` gives
    extra keyword arguments of the forward. Leaves the model in eval mode."""
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings))
    model.train()
    tokens = 0
    loss_value = float("nan")
    start = time.perf_counter()
    bar = tqdm(range(settings.steps), desc=desc, disable=not progress, leave=False, unit="step")
    for step in bar:
        ids, original_mask = next(data)
        ids, original_mask = ids.to(device), original_mask.to(device)
        loss = model(input_ids=ids, labels=ids, **(inputs(original_mask) if inputs else {})).loss
        if extra_loss is not None:
            loss = loss + extra_loss(model, original_mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, settings.clip_norm)
        optimizer.step()
        scheduler.step()
        tokens += ids.numel()
        if step % 10 == 0 or step == settings.steps - 1:
            loss_value = loss.item()
            bar.set_postfix(loss=f"{loss_value:.3f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    bar.close()
    model.eval()
    return TrainResult(settings.steps, tokens, seconds, loss_value)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    original: bool = False,
    inputs: Callable[[torch.Tensor], dict] | None = None,
) -> float:
    """Mean next-token cross-entropy (nats per token) of ``model`` over ``blocks`` (N, T);
    ``inputs(original_mask)`` as in :func:`train`, with the mask all ``original``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size].to(device)
        extra = inputs(torch.full(ids.shape, original, device=device)) if inputs else {}
        logits = model(input_ids=ids, **extra).logits[:, :-1].float()
        targets = ids[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        ).item()
        count += targets.numel()
    model.train(was_training)
    return total / count
