"""LoRA+ (Hayou et al., 2024): a larger learning rate for B than for A.

With one learning rate for both factors, LoRA's B learns too slowly at large width; LoRA+ gives B
(`lora_B`, and `lora_embedding_B` for embeddings) the learning rate `lr * lr_ratio` and every
other trainable parameter `lr`. The ratio the paper recommends is around 16.
"""
from __future__ import annotations

import math

import torch.nn as nn

from .lora_layers import LORA_LAYER_TYPES


def lora_b_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The B factors of every adapter of every LoRA layer of `model` (`lora_B`, `lora_embedding_B`), in
    model order (only the trainable ones, the active adapter's, reach an optimizer's groups)."""
    out = []
    for module in model.modules():
        if isinstance(module, LORA_LAYER_TYPES):
            out.extend(module._factor(module._B, name) for name in module.adapters)
    return out


def _check(lr, lr_ratio, weight_decay) -> None:
    for field, value in (("lr", lr), ("lr_ratio", lr_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"loraplus_param_groups: {field} must be a finite number > 0, got {field}={value!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"loraplus_param_groups: weight_decay must be a number >= 0, got weight_decay={weight_decay!r}")


def loraplus_param_groups(model: nn.Module, lr: float, lr_ratio: float = 16.0,
                          weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups for LoRA+: B factors at `lr * lr_ratio`, the rest at `lr`.

    Use as `torch.optim.AdamW(tt.lora.loraplus_param_groups(model, lr=2e-4))`. Every trainable
    parameter appears in exactly one group: A factors, DoRA magnitude vectors, trained biases and
    any other trainable parameter get `lr`. `weight_decay` applies to matrices only (2-D and up);
    1-D parameters (magnitudes, biases) get 0, as in `tinytune.train`.

    Args:
        model: a model with LoRA applied (`tt.lora.apply`).
        lr: the learning rate of A and of every non-B parameter (> 0).
        lr_ratio: B's learning rate divided by A's (> 0; the paper suggests 2**4 = 16).
        weight_decay: decoupled weight decay of matrix parameters (>= 0).

    Returns:
        Non-empty groups `{"params", "names", "lr", "weight_decay"}`, the B groups last (one
        group per learning rate when `weight_decay` is 0, else split into decayed / not decayed).

    Raises:
        ValueError: a bad lr, lr_ratio or weight_decay, or `model` has no LoRA layer.
    """
    _check(lr, lr_ratio, weight_decay)
    b_ids = {id(p) for p in lora_b_parameters(model)}
    if not b_ids:
        raise ValueError(f"loraplus_param_groups: {type(model).__name__} has no LoRA layers; call tt.lora.apply first")
    groups: dict[tuple[bool, bool], dict] = {}
    for is_b in (False, True):
        for decays in (True, False):
            groups[is_b, decays] = {"params": [], "names": [], "lr": lr * lr_ratio if is_b else lr,
                                    "weight_decay": weight_decay if decays else 0.0}
    for name, param in model.named_parameters():  # a tied parameter is yielded once
        if param.requires_grad:
            group = groups[id(param) in b_ids, param.ndim >= 2 and weight_decay > 0]
            group["params"].append(param)
            group["names"].append(name)
    return [g for g in groups.values() if g["params"]]


__all__ = ["loraplus_param_groups", "lora_b_parameters"]
