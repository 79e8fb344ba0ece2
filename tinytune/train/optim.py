"""AdamW over the trainable parameters and learning-rate schedules with warmup."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..peft.lora.variants import lora_b_parameters
from .config import TrainConfig


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Decaying a bias or a norm's scale pulls it toward 0, which changes what the layer computes
    # rather than regularising it; 1-D parameters are exactly these (biases, norm weights, IA3 scales).
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim < 2 or leaf == "bias" or "norm" in name.lower()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters of `model`, split into a decayed and a non-decayed group.

    Args:
        model: any module; parameters with `requires_grad=False` are left out, shared ones appear once.
        weight_decay: decay of the first group (matrices); the second group ("no_decay") gets 0.

    Returns:
        `[{"params", "names", "weight_decay"}, ...]`: empty groups are dropped.
    """
    decay, no_decay = {"params": [], "names": [], "weight_decay": weight_decay}, \
        {"params": [], "names": [], "weight_decay": 0.0}
    for name, param in model.named_parameters():  # named_parameters yields a tied parameter once
        if param.requires_grad:
            group = no_decay if _no_decay(name, param) else decay
            group["params"].append(param)
            group["names"].append(name)
    return [g for g in (decay, no_decay) if g["params"]]


def loraplus_split(groups: list[dict], model: nn.Module, lr: float, ratio: float) -> list[dict]:
    """LoRA+: split each group into its non-B part (at `lr`) and its LoRA B part (at `lr * ratio`).

    Returns:
        The non-B groups first (so `param_groups[0]["lr"]` is still the base rate), empty ones dropped.

    Raises:
        ValueError: `model` has no LoRA layer.
    """
    b_ids = {id(p) for p in lora_b_parameters(model)}
    if not b_ids:
        raise ValueError(f"TrainConfig.loraplus_lr_ratio is set, but {type(model).__name__} has no LoRA layers "
                         "(apply tt.lora first, or leave loraplus_lr_ratio=None)")
    out = []
    for is_b in (False, True):
        for group in groups:
            keep = [(p, n) for p, n in zip(group["params"], group["names"]) if (id(p) in b_ids) == is_b]
            if keep:
                out.append({**group, "params": [p for p, _ in keep], "names": [n for _, n in keep],
                            "lr": lr * ratio if is_b else lr})
    return out


def _implementation(params: list[torch.Tensor]) -> dict:
    # The fused kernel (one launch for all parameters) exists for fp32 tensors on CPU and CUDA in
    # recent torch; fall back to foreach (batched ops) and let AdamW raise nothing on other devices.
    devices = {p.device.type for p in params}
    if len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.dtype == torch.float32 for p in params):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `model`, fused when the device supports it.

    Args:
        model: the model, already on its device with trainable parameters in fp32.
        cfg: lr, betas, eps, weight_decay and loraplus_lr_ratio are read.

    Returns:
        A `torch.optim.AdamW`; each param group carries its parameter `names` (for inspection).

    Raises:
        ValueError: `model` has no trainable parameter, or `cfg.loraplus_lr_ratio` is set and it has
            no LoRA layer.
    """
    groups = param_groups(model, cfg.weight_decay)
    if cfg.loraplus_lr_ratio is not None:
        groups = loraplus_split(groups, model, cfg.lr, cfg.loraplus_lr_ratio)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameter to optimise")
    kwargs = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **_implementation(params))
    try:
        return torch.optim.AdamW(groups, **kwargs)
    except (RuntimeError, TypeError):  # an older torch without fused AdamW on this device
        kwargs.pop("fused", None)
        return torch.optim.AdamW(groups, **kwargs, foreach=True)


def lr_factor(step: int, steps: int, warmup_steps: int, schedule: str) -> float:
    """The multiplier of the peak lr for optimizer step `step` (0-based) of `steps`.

    Warmup: `(step + 1) / warmup_steps` for `step < warmup_steps`, so the last warmup step reaches 1.
    After it, with `p = (step - warmup_steps) / max(1, steps - warmup_steps)` in [0, 1):
    "constant": 1; "linear": `1 - p`; "cosine": `0.5 * (1 + cos(pi * p))`.

    Raises:
        ValueError: an unknown schedule name.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown schedule {schedule!r}; choices: constant, linear, cosine")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` applying `lr_factor` (its state_dict holds only numbers, so it checkpoints safely)."""
    steps, warmup, schedule = cfg.steps, cfg.warmup_steps, cfg.schedule
    lr_factor(0, steps, warmup, schedule)  # fail now on a bad name, not at the first step

    def factor(step: int) -> float:
        return lr_factor(step, steps, warmup, schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
