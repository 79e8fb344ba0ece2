"""The loss of each task `fit` trains (`TrainConfig.task`), all in fp32 and all divided by a count the
caller passes, so that gradient accumulation divides by the whole optimizer step's count.

| task | logits | targets | mean over |
|---|---|---|---|
| "causal_lm" | (B, T, V) | `labels` (B, T), shifted inside | scored tokens (`labels[:, 1:] != -100`) |
| "classification" | (B, C) | `label` (B,) | examples |
| "token_classification" | (B, T, C) | `labels` (B, T), not shifted | scored tokens (`labels != -100`) |

The loss functions live with the models that compute them from `labels` (`tinytune.models.loss`). For
"causal_lm", `fit` hands `labels` to any model whose forward takes them (a tinytune `CausalLM` computes the
chunked `causal_lm_loss_from_hidden` then, never holding the (B, T, V) logits; a transformers model its own
loss) and otherwise computes `causal_lm_loss` from the logits. Same loss.
"""
from __future__ import annotations

import torch

from ..models.loss import (IGNORE_INDEX, causal_lm_loss, causal_lm_loss_from_hidden,  # noqa: F401 (re-exported)
                           classification_loss, token_classification_loss)

TASKS = ("causal_lm", "classification", "token_classification")


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
