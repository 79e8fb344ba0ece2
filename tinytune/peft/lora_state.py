"""LoRA adapter weights as a state dict under Hugging Face PEFT's key names, one adapter at a time.

Files hold one adapter and no adapter name (`base_model.model.<path>.lora_A.weight`); PEFT's
in-memory names carry it (`lora_A.<name>.weight`), tinytune's `state_dict(model, adapter=...)`
picks the adapter instead, so its keys are always the file's.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._state import copy_state
from .lora_multi import adapter_layers, lora_layers, resolve_adapter

PEFT_PREFIX = "base_model.model."

# the parameter kind -> the suffix of PEFT's saved key (linears' factors are nn.Linear weights there)
_SUFFIX = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_embedding_A": "lora_embedding_A",
           "lora_embedding_B": "lora_embedding_B", "lora_magnitude_vector": "lora_magnitude_vector"}


def _layer_tensors(name: str, layer: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    key = PEFT_PREFIX + name
    tensors = {f"{key}.{_SUFFIX[kind]}": p for kind, p in layer.adapter_parameters(adapter).items()}
    bias = getattr(layer.base, "bias", None)
    if bias is not None and bias.requires_grad:
        tensors[f"{key}.bias"] = bias  # train_bias=True (PEFT's bias="lora_only"); shared by the layer's adapters
    return tensors


def parameters_by_key(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The parameters of adapter `adapter` (an existing name) under PEFT's saved key names."""
    out = {}
    for name, layer in adapter_layers(model, adapter):
        out.update(_layer_tensors(name, layer, adapter))
    return out


def state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The weights of one adapter only, under PEFT key names, detached (not copied).

    Args:
        model: a model with LoRA.
        adapter: which adapter (default: the active one). The keys carry no adapter name, as in
            PEFT's files: `base_model.model.<path>.lora_A.weight`, ...

    Returns:
        `{key: tensor}`; a trained base bias (`train_bias=True`) is included as `<path>.bias`.
        Empty for a model without LoRA when `adapter` is None.

    Raises:
        ValueError: no adapter `adapter`.
    """
    if adapter is None and not any(True for _ in lora_layers(model)):
        return {}
    adapter = resolve_adapter(model, adapter, "state_dict")
    return {k: v.detach() for k, v in parameters_by_key(model, adapter).items()}


def _normalise_key(key: str) -> str:
    return key if key.startswith(PEFT_PREFIX) else PEFT_PREFIX + key


def load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], strict: bool = True, *,
                    adapter: str | None = None) -> tuple[list[str], list[str]]:
    """Copy adapter weights from `sd` (PEFT key names; the `base_model.model.` prefix is optional).

    Args:
        model: a model with LoRA.
        sd: `{key: tensor}` as `state_dict` gives (or a PEFT adapter file holds).
        strict: raise on missing or unexpected keys (else return them).
        adapter: the adapter to load into (keyword only; default: the active one).

    Returns:
        (missing, unexpected) key lists (both empty under strict=True).

    Raises:
        ValueError: the model has no LoRA or no adapter `adapter`; a key is mis-shaped; with
            strict, a key is missing or unexpected. Each message names the keys. Nothing is
            copied when it raises.
        TypeError: `strict` is not a bool (e.g. an adapter name passed positionally).
    """
    if not isinstance(strict, bool):
        raise TypeError(f"load_state_dict: strict must be True or False, got {strict!r} "
                        "(pass the adapter as adapter=...)")
    adapter = resolve_adapter(model, adapter, "load_state_dict")
    params = parameters_by_key(model, adapter)
    given = {_normalise_key(k): v for k, v in sd.items()}
    missing = set(params) - set(given)
    hint = ""
    if missing and all(k.endswith(".lora_magnitude_vector") for k in missing):
        hint = " (the model has DoRA layers but the weights hold no magnitude vectors: use_dora mismatch?)"
    return copy_state(params, given, strict, f"the LoRA state dict into adapter {adapter!r}", source="file",
                      missing_hint=hint)
