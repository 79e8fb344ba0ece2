"""The loss of each task `fit` trains (`TrainConfig.task`), all in fp32 and all divided by a count the
caller passes, so that gradient accumulation divides by the whole optimizer step's count.

| task | logits | targets | mean over |
|---|---|---|---|
| "causal_lm" | (B, T, V) | `labels` (B, T), shifted inside | scored tokens (`labels[:, 1:] != -100`) |
| "classification" | (B, C) | `label` (B,) | examples |
| "token_classification" | (B, T, C) | `labels` (B, T), not shifted | scored tokens (`labels != -100`) |

For "causal_lm" on a tinytune `CausalLM` whose `lm_head` is a plain bias-free `nn.Linear` (no adapter on
the head), `fit` skips the logits: `causal_lm_loss_from_hidden` takes the final hidden states and the head
weight to `tinytune.ops.linear_cross_entropy`, which never holds the full (B, T, V) logits. Same loss.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.encoding import IGNORE as IGNORE_INDEX  # -100: labels that are not scored
from ..models.transformer import CausalLM
from ..ops.cross_entropy import linear_cross_entropy

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


def _keeps_hidden_contract(hook) -> bool:
    """A hook owned by a module declaring `return_hidden_safe = True` (tinytune's soft prompt and prefix
    encoders): it treats `return_hidden=True` outputs as it treats logits, so the chunked loss stays exact."""
    return bool(getattr(getattr(hook, "__self__", None), "return_hidden_safe", False))


def fused_lm_head(model: nn.Module) -> torch.Tensor | None:
    """The `lm_head` weight (V, d) when `model`'s causal-LM loss can skip the logits, else None.

    That is a `CausalLM` with its own `forward`, no forward hooks on it or its head (except those of
    tinytune's soft prompts and prefixes, which handle hidden states as logits), and a head that is
    a plain bias-free `nn.Linear` (a LoRA-wrapped or otherwise replaced head takes the logits path).
    """
    if not isinstance(model, CausalLM) or type(model).forward is not CausalLM.forward or "forward" in vars(model):
        return None
    head = model.lm_head
    hooks = [h for m in (model, head) for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    hooked = any(not _keeps_hidden_contract(h) for h in hooks)
    if type(head) is not nn.Linear or head.bias is not None or hooked:
        return None
    return head.weight


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
