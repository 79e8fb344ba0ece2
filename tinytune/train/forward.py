"""One batch through the model: the forward call's keyword arguments, the task loss, and `evaluate`.

Shared by the training loop (`loop.py`) and evaluation; knows nothing of optimizers or checkpoints.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn

from ..data.collate import segment_mask
from .collate import collate
from .config import TrainConfig
from .distributed import Distributed
from .losses import causal_lm_loss_from_hidden, fused_lm_head, logits_shape, num_scored, task_loss
from .precision import Precision


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


@torch.no_grad()
def evaluate(model: nn.Module, data, cfg: TrainConfig, precision: Precision | None = None,
             dist: Distributed | None = None) -> float:
    """Mean loss of `model` over `data` for `cfg.task` (the training loss: per token, or per example).

    Args:
        model: the model, on `cfg.device`; put in eval mode for the call, its mode restored after.
        data: a sequence of examples with `input_ids` and `labels` (`label` for classification).
        cfg: task, batch_size, device, dtype and pad_token_id are read.
        precision: the run's `Precision` (default: one built from cfg).
        dist: with several processes, each evaluates every world_size-th example and the sums are
            all-reduced, so every rank returns the same number. Pass the plain module (or an FSDP one),
            not a DDP wrapper.

    Returns:
        Summed loss / scored tokens (examples, for classification) over all of `data`.
    """
    precision = precision or Precision(cfg.dtype, cfg.device)
    dist = dist or Distributed()
    was_training, accepted = model.training, forward_kwargs(model)
    model.eval()
    total, scored = 0.0, 0
    mine = list(range(dist.rank, len(data), dist.world_size))
    try:
        # An FSDP model gathers its weights in every forward, so every rank runs the same number of
        # batches: a rank out of examples runs example 0 once more and does not count it.
        for start in range(0, math.ceil(len(data) / dist.world_size), cfg.batch_size):
            ids = mine[start:start + cfg.batch_size]
            batch = collate([data[i] for i in ids or [0]], cfg.pad_token_id, cfg.device)
            n = num_scored(cfg.task, batch) if ids else 0
            with precision.autocast():
                loss = batch_loss(model, batch, accepted, cfg.task, max(n, 1))
            total += float(loss) * n
            scored += n
    finally:
        model.train(was_training)
    total, scored = dist.sum([total, scored], cfg.device)
    return total / scored if scored else float("nan")
