"""The loss of each task `fit` trains (`TrainConfig.task`), all in fp32 and all divided by a count the
caller passes, so that gradient accumulation divides by the whole optimizer step's count.

| task | logits | targets | mean over |
|---|---|---|---|
| "causal_lm" | (B, T, V) | `labels` (B, T), shifted inside | scored tokens (`labels[:, 1:] != -100`) |
| "classification" | (B, C) | `label` (B,) | examples |
| "token_classification" | (B, T, C) | `labels` (B, T), not shifted | scored tokens (`labels != -100`) |
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.encoding import IGNORE as IGNORE_INDEX  # -100: labels that are not scored

TASKS = ("causal_lm", "classification", "token_classification")


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


def num_scored(task: str, batch: dict) -> int:
    """How many targets `batch` holds for `task`: what one step's loss is averaged over."""
    if task == "classification":
        return int(batch["label"].shape[0])
    labels = batch["labels"][:, 1:] if task == "causal_lm" else batch["labels"]
    return int((labels != IGNORE_INDEX).sum())


def task_loss(task: str, logits: torch.Tensor, batch: dict, count: int) -> torch.Tensor:
    """The summed loss of `batch` for `task` divided by `count` (see the table in the module docstring)."""
    if task == "classification":
        return classification_loss(logits, batch["label"], count)
    if task == "token_classification":
        return token_classification_loss(logits, batch["labels"], count)
    return causal_lm_loss(logits, batch["labels"], count)


def logits_shape(task: str, batch: dict) -> tuple[tuple[int, ...], str]:
    """The leading logits dims `task` needs for `batch`, and how to name them in an error."""
    B, T = batch["input_ids"].shape
    if task == "classification":
        return (B,), f"(batch, num_labels) = ({B}, C)"
    what = "vocab" if task == "causal_lm" else "num_labels"
    return (B, T), f"(batch, seq, {what}) = ({B}, {T}, {what[0].upper()})"
