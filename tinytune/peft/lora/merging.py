"""Model-level merge, unmerge, merge_and_unload and disabled() for LoRA (each layer's own maths is in `base`)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from .._targets import layers_disabled, refuse_shared_merge, replace_module
from .multi import lora_layers, require_lora as _require_lora
from .shared_shrink import link_groups

__all__ = ["merge", "unmerge", "merge_and_unload", "disabled", "merged_state", "inference_merged"]


def _refuse_unmergeable(layers, what: str) -> None:
    """TypeError naming every layer that cannot be merged, before any layer is."""
    refused = [(name, layer.cannot_merge()) for name, layer in layers if not layer.merged]
    refused = [(name, reason) for name, reason in refused if reason is not None]
    if refused:
        raise TypeError(f"{what}: {'; '.join(f'{name!r}: {reason}' for name, reason in refused[:4])}")


def merge(model: nn.Module) -> nn.Module:
    """Add `scaling * B A` of the ACTIVE adapter into every base weight that has it. Safe to call
    twice. Returns model. While merged, `set_adapter` to another adapter and `adapter_per_row` refuse.

    DoRA layers write `m / ||W + s B A|| * (W + s B A)` instead and keep that norm until `unmerge`.
    With a bf16/fp16 base the merged weight is rounded to that dtype (see docs/lora.md).

    Raises:
        ValueError: an unmerged layer's base weight is shared with another module (a tied lm_head /
            embedding): merging would change that module too. Nothing is merged then.
    """
    layers = _require_lora(model, "merge")
    _refuse_unmergeable(layers, "lora.merge")
    refuse_shared_merge(model, [(n, layer) for n, layer in layers if not layer.merged], "lora.merge")
    for _, layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge` (exact up to the base dtype's rounding). Safe to call twice. Returns model."""
    for _, layer in _require_lora(model, "unmerge"):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter, then put the plain base modules back in place of the LoRA layers
    (every other adapter is dropped). Returns model.

    The restored modules keep the requires_grad flags `apply` gave them (frozen).

    Raises:
        ValueError: a base weight is shared with another module (tied), as for `merge`.
    """
    layers = _require_lora(model, "merge_and_unload")
    _refuse_unmergeable(layers, "lora.merge_and_unload")
    refuse_shared_merge(model, [(n, layer) for n, layer in layers if not layer.merged], "lora.merge_and_unload")
    for name, layer in layers:
        layer.merge()
        replace_module(model, name, layer.base)
    link_groups(model)  # the shared-shrink hooks of the parents go with the layers
    return model


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside the block every LoRA layer computes exactly its base layer (bit for bit).

    Raises:
        RuntimeError: a layer is merged: its base weight holds the delta, so the base model
            cannot be reproduced exactly; call `unmerge` first.
    """
    layers = _require_lora(model, "disabled")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise RuntimeError(
            f"disabled(): LoRA is merged into {merged[:5]}; call tt.lora.unmerge(model) first "
            "(a merged base weight cannot give the base model bit for bit)"
        )
    with layers_disabled(layer for _, layer in layers):
        yield model


def merged_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{layer path: the plain module's state dict} with the active adapter folded in, for a checkpoint
    writer (the model is unchanged): what each LoRA layer's `merged_state()` gives.

    Raises:
        ValueError: an unmerged layer's base weight is tied to another module (as `merge`).
    """
    layers = list(lora_layers(model))
    _refuse_unmergeable(layers, "save_pretrained")
    refuse_shared_merge(model, [(n, layer) for n, layer in layers if not layer.merged], "save_pretrained")
    return {name: layer.merged_state() for name, layer in layers}


@contextlib.contextmanager
def inference_merged(model: nn.Module):
    """Inside the block (no grad, eval mode) every LoRA layer that can computes `x (W + s B A)^T + b` with
    a merged weight made once on entry and dropped on exit; base weights are never written. Layers that
    cannot (see `inference`) keep their normal path. `tt.generate` does this itself (`merge_lora=True`)."""
    with contextlib.ExitStack() as stack:
        for _, layer in lora_layers(model):
            stack.enter_context(layer.generation_context())
        yield model
