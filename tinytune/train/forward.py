"""One batch through the model: the forward call's keyword arguments and the built-in tasks' loss.

Shared by the built-in tasks (`tasks.py`); knows nothing of optimizers or checkpoints.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from ..data.collate import segment_mask
from .losses import logits_shape, num_scored, task_loss


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


def loss_kwargs(model: nn.Module) -> set[str]:
    """Which of `labels` / `num_items_in_batch` `model.forward` takes: a model that takes `labels` computes
    its own loss (the Hugging Face convention), and one that also takes `num_items_in_batch` (by name or
    through **kwargs, as transformers' models do) divides its summed loss by the count it is given, unless it
    sets `accepts_loss_kwargs = False` (transformers' Trainer reads the same attribute)."""
    params = inspect.signature(model.forward).parameters
    names = {"labels", "num_items_in_batch"} & set(params)
    if "labels" in names and any(p.kind is p.VAR_KEYWORD for p in params.values()):
        names.add("num_items_in_batch")
    if getattr(model, "accepts_loss_kwargs", True) is False:  # transformers' opt-out: it averages its own batch
        names.discard("num_items_in_batch")
    return names


def _output_loss(out, model: nn.Module) -> torch.Tensor:
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    if loss is None and isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor) and out[0].dim() == 0:
        loss = out[0]
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(f"{type(model).__name__}.forward takes labels but returned no scalar loss (expected an "
                         f"output with .loss, ['loss'] or a scalar first item; got {type(out).__name__})")
    return loss


def _own_loss(model: nn.Module, batch: dict, accepted: set[str], takes: set[str], count: int) -> torch.Tensor:
    """The causal-LM loss the model computes from `labels`, as summed loss / `count`."""
    kwargs = _model_kwargs(model, batch, accepted)
    if "num_items_in_batch" in takes:
        kwargs["num_items_in_batch"] = count
    loss = _output_loss(model(batch["input_ids"], labels=batch["labels"], **kwargs), model)
    if "num_items_in_batch" in takes:
        return loss
    # a model that only averages over its own batch: rescale its mean to this step's sum / count
    return loss * (num_scored("causal_lm", batch) / count)


def batch_loss(model: nn.Module, batch: dict, accepted: set[str], task: str, count: int,
               module: nn.Module | None = None) -> torch.Tensor:
    """`task_loss` of the model's output on `batch`, summed and divided by `count`.

    For "causal_lm" a model whose forward takes `labels` computes the loss itself (a tinytune `CausalLM`
    then never holds the (B, T, V) logits); otherwise, and for the classification tasks (whose logits are
    small, so the loss is computed here, exactly, for any model), from the logits. `module` is the model
    inside a DDP wrapper `model` (its signature is read there); None: `model`.
    """
    takes = loss_kwargs(module if module is not None else model) if task == "causal_lm" else set()
    if "labels" in takes:
        return _own_loss(model, batch, accepted, takes, count)
    return task_loss(task, _logits(model, batch, accepted, task), batch, count)
