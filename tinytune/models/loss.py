"""The losses a model computes from `labels` (`forward(..., labels=)`), all in fp32, each divided by a count
the caller may pass (`num_items_in_batch`: what gradient accumulation divides by) or by the batch's own.

| loss | inputs | targets | mean over |
|---|---|---|---|
| `causal_lm_loss` | logits (B, T, V) | `labels` (B, T), shifted inside | scored tokens (`labels[:, 1:] != -100`) |
| `causal_lm_loss_from_hidden` | hidden (B, T, d) + head weight (V, d) | as above | as above, never holding (B, T, V) |
| `classification_loss` | logits (B, C) | `label` (B,) | examples |
| `token_classification_loss` | logits (B, T, C) | `labels` (B, T), not shifted | scored tokens (`labels != -100`) |
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.cross_entropy import linear_cross_entropy

IGNORE_INDEX = -100  # labels that are not scored (PyTorch's and Hugging Face's convention)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_scored: int | None = None) -> torch.Tensor:
    """Token-level cross-entropy with the shift inside: `labels[:, i]` scores `logits[:, i - 1]`.

    Args:
        logits: (B, T, V), any float dtype (the loss is computed in fp32).
        labels: (B, T), IGNORE_INDEX (-100) where not scored.
        num_scored: divide the summed loss by this (the scored tokens of the whole accumulated batch);
            None: by this batch's own count.

    Returns:
        A scalar: summed token cross-entropy / num_scored.
    """
    logits, labels = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    return token_classification_loss(logits, labels, num_scored)


def causal_lm_loss_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               num_scored: int | None = None) -> torch.Tensor:
    """`causal_lm_loss(hidden @ weight.T, labels, num_scored)` without materialising the logits.

    The shift moves to the labels (`labels[:, 1:]` plus one ignored last column), so `hidden` is used
    whole, not copied into a `hidden[:, :-1]` slice.

    Args:
        hidden: (B, T, d) final-norm hidden states (`model(ids, return_hidden=True)`).
        weight: (V, d) the head weight (`fused_lm_head(model)`).
        labels: (B, T), IGNORE_INDEX (-100) where not scored.
        num_scored: divide the summed loss by this; None: by this batch's own count.

    Returns:
        A scalar: summed token cross-entropy / num_scored.
    """
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T): position i scores label i + 1
    total = linear_cross_entropy(hidden, weight, shifted, ignore_index=IGNORE_INDEX, reduction="sum")
    if num_scored is None:
        num_scored = int((shifted != IGNORE_INDEX).sum())
    return total / num_scored


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor,
                              num_scored: int | None = None) -> torch.Tensor:
    """Cross-entropy of every scored position, no shift: `labels[:, i]` scores `logits[:, i]` (NER).

    Args:
        logits: (B, T, C), any float dtype (the loss is computed in fp32).
        labels: (B, T) tag ids, IGNORE_INDEX (-100) where not scored.
        num_scored: divide the summed loss by this; None: by this batch's own scored count.

    Returns:
        A scalar: summed cross-entropy / num_scored.
    """
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    if num_scored is None:
        num_scored = int((labels != IGNORE_INDEX).sum())
    return total / num_scored


def classification_loss(logits: torch.Tensor, label: torch.Tensor, num_examples: int | None = None) -> torch.Tensor:
    """Cross-entropy of one class per example.

    Args:
        logits: (B, C), any float dtype (the loss is computed in fp32).
        label: (B,) class ids.
        num_examples: divide the summed loss by this (the examples of the whole accumulated batch);
            None: by B.

    Returns:
        A scalar: summed cross-entropy / num_examples.
    """
    total = F.cross_entropy(logits.float(), label, reduction="sum")
    return total / (label.shape[0] if num_examples is None else num_examples)
