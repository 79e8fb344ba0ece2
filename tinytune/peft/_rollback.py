"""Undo what applying a method did to a model when loading its weights then fails, so that a failed
`load_adapter` leaves the model as it was (nothing half-applied, nothing frozen that was trainable).

Applying a method only swaps child modules, adds hooks and attributes, and flips `requires_grad`:
all of it lives in the modules' `__dict__` (their `_modules`, hook and attribute entries) and in the
parameters' flags, which `snapshot` copies shallowly (references, not tensors). The one method that
rewrites tensors, PiSSA (the base keeps the residual), gets copies of the weights it may touch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass
class ModelSnapshot:
    """What `restore` puts back: every module's attribute dict, every parameter's `requires_grad`, and
    the values of the tensors listed in `weights`."""

    modules: list[tuple[nn.Module, dict]] = field(default_factory=list)
    flags: list[tuple[nn.Parameter, bool]] = field(default_factory=list)
    weights: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def snapshot(model: nn.Module, weights=()) -> ModelSnapshot:
    """Record `model`'s structure and flags (cheap: references), and copies of the tensors `weights`."""
    snap = ModelSnapshot()
    for module in model.modules():
        # dict values (children, parameters, hooks) are copied: applying a method mutates them in place
        snap.modules.append((module, {k: (v.copy() if isinstance(v, dict) else v) for k, v in vars(module).items()}))
    snap.flags = [(p, p.requires_grad) for p in model.parameters()]
    snap.weights = [(w, w.detach().clone()) for w in weights]
    return snap


@torch.no_grad()
def restore(snap: ModelSnapshot) -> None:
    """Put back what `snapshot` recorded (modules created since are dropped with their parents' dicts)."""
    for module, saved in snap.modules:
        module.__dict__.clear()
        module.__dict__.update(saved)
    for param, flag in snap.flags:
        param.requires_grad_(flag)
    for tensor, value in snap.weights:
        tensor.copy_(value)
