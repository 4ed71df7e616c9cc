"""MoEBERT's FFN neuron importance and layer-wise distillation loss.

Importance of neuron j of one FFN (Zuo et al., MoEBERT, eq. 4):
I_j = Σ_examples |Σ_i W1[j,i]·∂L/∂W1[j,i] + Σ_i W2[i,j]·∂L/∂W2[i,j]|, a first-order estimate of
how much each example's loss changes when the neuron is removed (for a gated FFN the gate and up
rows both count as W1).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from modekernels.hf import surgery

__all__ = ["compute_ffn_importance", "layerwise_distillation_loss", "per_example_loss"]


def per_example_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The default per-example loss (B,) of :func:`compute_ffn_importance`: cross-entropy of the
    model's logits against ``batch["labels"]`` (sequence classification: one label per example;
    token labels, -100 ignored, averaged per example and shifted by one for causal LMs), or the
    next-token loss on ``input_ids`` when there are no labels (positions where
    ``batch["attention_mask"]`` is 0, padding, ignored)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    labels = batch.get("labels")
    causal = surgery.detect_family(model).name != "bert"
    if labels is None:
        labels = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, -100)
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    losses = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none", ignore_index=-100)
    counts = (labels != -100).sum(dim=1).clamp_min(1)
    return losses.sum(dim=1) / counts


def compute_ffn_importance(
    model: nn.Module,
    batches: Iterable[dict],
    loss_fn: Optional[Callable[[nn.Module, dict], torch.Tensor]] = None,
) -> list:
    """MoEBERT neuron importance of every block's FFN: a list with one float32 tensor (d_ff,)
    per block.

    ``batches``: dicts of model inputs (tensors with the batch first). ``loss_fn(model, batch)``
    returns the per-example losses (B,) (default :func:`per_example_loss`). Each example's
    gradient is taken separately (one backward per example), also when called under
    ``torch.no_grad`` or ``torch.inference_mode``. The model's parameters and their ``.grad``
    are left unchanged; the model runs in eval mode (no dropout). The FFNs must be dense: call
    it before :func:`~modekernels.hf.moefy` (ValueError after).
    """
    if "moefy" in surgery.patch_records(model):
        raise ValueError(
            "compute_ffn_importance scores the dense FFNs, which moefy's experts replace in this "
            "model: compute the importance before moefy (or unpatch the model first)"
        )
    with torch.inference_mode(False), torch.enable_grad():
        return _importance(model, batches, loss_fn or per_example_loss)


def _inference_tensors_cloned(batch: dict) -> dict:
    """``batch`` with tensors made under ``torch.inference_mode`` cloned into ordinary ones
    (autograd cannot save inference tensors for backward)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v for k, v in batch.items()}


def _importance(model: nn.Module, batches: Iterable[dict], loss_fn: Callable) -> list:
    family = surgery.detect_family(model)
    _, block_list = surgery.blocks(model)
    ffns = [family.dense_ffn(block) for block in block_list]
    params = [p for ffn in ffns for p, _ in ffn.neuron_params]
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    scores = [torch.zeros(ffn.d_ff, dtype=torch.float32, device=ffn.w_in.device) for ffn in ffns]
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in batches:
            losses = loss_fn(model, _inference_tensors_cloned(batch))
            for b in range(losses.shape[0]):
                grads = iter(torch.autograd.grad(losses[b], params, retain_graph=b + 1 < losses.shape[0]))
                for score, ffn in zip(scores, ffns):
                    contribution = torch.zeros_like(score)
                    for p, dim in ffn.neuron_params:
                        g = next(grads)
                        other = 1 - dim
                        contribution += (p.detach() * g).float().sum(dim=other)
                    score += contribution.abs()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return scores


def layerwise_distillation_loss(student_out, teacher_out, *, temperature: float = 1.0) -> torch.Tensor:
    """MoEBERT's layer-wise distillation loss: MSE between the student's and teacher's hidden
    states (every layer, embeddings included) plus the symmetric KL divergence between their
    output distributions, KL(p_t‖p_s) + KL(p_s‖p_t) at ``temperature``, averaged over positions.

    Both outputs come from forwards with ``output_hidden_states=True`` (model outputs with
    ``hidden_states`` and ``logits``). Gradients flow into both; detach the teacher's outputs
    (or run it under ``torch.no_grad``) to train only the student.
    """
    hs, ht = student_out.hidden_states, teacher_out.hidden_states
    if hs is None or ht is None:
        raise ValueError("run both models with output_hidden_states=True")
    if len(hs) != len(ht):
        raise ValueError(f"student has {len(hs)} hidden states, teacher {len(ht)}")
    mse = torch.stack([F.mse_loss(s.float(), t.float()) for s, t in zip(hs, ht)]).sum()
    log_s = F.log_softmax(student_out.logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_out.logits.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1) + (log_s.exp() * (log_s - log_t)).sum(-1)
    return mse + kl.mean()
