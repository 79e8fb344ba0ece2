"""One batch through the model: the forward call's keyword arguments and the built-in tasks' loss.

Shared by the built-in tasks (`tasks.py`); knows nothing of optimizers or checkpoints.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from ..data.collate import segment_mask
from .losses import causal_lm_loss_from_hidden, fused_lm_head, logits_shape, task_loss


def forward_kwargs(model: nn.Module) -> set[str]:
    """Which of `attention_mask` / `position_ids` `model.forward` accepts (both with **kwargs)."""
    params = inspect.signature(model.forward).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return {"attention_mask", "position_ids"}
    return {p.name for p in params} & {"attention_mask", "position_ids"}


def _model_kwargs(model: nn.Module, batch: dict, accepted: set[str]) -> dict:
    kwargs = {}
    if "segment_ids" in batch and "attention_mask" not in accepted:
        raise ValueError(f"packed examples (segment_ids) need a model whose forward takes attention_mask "
                         f"(a block-diagonal mask keeps examples apart); {type(model).__name__}'s does not")
    if "attention_mask" in accepted:  # packed rows attend within their own example only
        kwargs["attention_mask"] = segment_mask(batch["segment_ids"]) if "segment_ids" in batch \
            else batch["attention_mask"]
    if "position_ids" in accepted and "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    return kwargs


def _logits(model: nn.Module, batch: dict, accepted: set[str], task: str = "causal_lm") -> torch.Tensor:
    out = model(batch["input_ids"], **_model_kwargs(model, batch, accepted))
    if not isinstance(out, torch.Tensor):  # Hugging Face style outputs: .logits, ["logits"] or a tuple
        out = out["logits"] if isinstance(out, dict) else out[0] if isinstance(out, tuple) else \
            getattr(out, "logits", out)
    lead, expected = logits_shape(task, batch)
    if not isinstance(out, torch.Tensor) or out.dim() != len(lead) + 1 or tuple(out.shape[:-1]) != lead:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{type(model).__name__} must return logits of shape {expected} for task={task!r}; "
                         f"got {shape}")
    return out


def batch_loss(model: nn.Module, batch: dict, accepted: set[str], task: str, count: int,
          module: nn.Module | None = None) -> torch.Tensor:
    """`task_loss` of the model's output on `batch`; a causal LM with a plain head skips the logits.

    `module` is the model inside a DDP wrapper `model` (its head is looked up there); None: `model`.
    """
    weight = fused_lm_head(module if module is not None else model) if task == "causal_lm" else None
    if weight is None:
        return task_loss(task, _logits(model, batch, accepted, task), batch, count)
    hidden = model(batch["input_ids"], return_hidden=True, **_model_kwargs(model, batch, accepted))  # (B, T, d)
    return causal_lm_loss_from_hidden(hidden, weight, batch["labels"], count)
