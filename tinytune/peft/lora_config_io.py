"""LoRA's `adapter_config.json`: tinytune's layers -> PEFT's LoRA config fields, and back to a `LoraConfig`."""
from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn

from .. import _check
from . import lora, lora_multi

CONFIG_NAME = "adapter_config.json"


def _init_lora_weights(init: str):
    """PEFT's `init_lora_weights` for an adapter's init. "pissa" matters on load: PEFT (and tinytune)
    then take the SVD of the given base weight again and replace it by the residual, so a PiSSA
    adapter applies to the ORIGINAL base model."""
    return {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa"}[init]


def peft_config_dict(model: nn.Module, adapter: str | None = None) -> dict:
    """PEFT's LoRA config for adapter `adapter` (default: the active one) of `model`; the layers
    holding it must agree in rank, alpha, dropout...

    Raises:
        ValueError: no such adapter, or its layers differ in a field the PEFT layout holds once
            (names the field and layers).
    """
    adapter = lora_multi.resolve_adapter(model, adapter, "save_adapter")
    layers = [(name, layer.adapters[adapter]) for name, layer in lora_multi.adapter_layers(model, adapter)]
    first = layers[0][1]
    for name, spec in layers:
        for field in ("rank", "alpha", "dropout", "rslora", "dora"):
            if getattr(spec, field) != getattr(first, field):
                raise ValueError(
                    f"save_adapter: LoRA layers differ in {field} ({layers[0][0]!r}: {getattr(first, field)}, "
                    f"{name!r}: {getattr(spec, field)}); the PEFT layout written here needs one value"
                )
        if (spec.init == "pissa") != (first.init == "pissa"):
            raise ValueError(
                f"save_adapter: LoRA layers differ in init ({layers[0][0]!r}: {first.init!r}, {name!r}: "
                f"{spec.init!r}); a PiSSA adapter must be PiSSA throughout (its config says which bases to rewrite)"
            )
    bias_trained = any(k.endswith(".bias") for k in lora.state_dict(model, adapter))
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout,
        "target_modules": [name for name, _ in layers],  # exact paths: PEFT matches them as suffixes
        "use_rslora": first.rslora,
        "fan_in_fan_out": False,
        "bias": "lora_only" if bias_trained else "none",
        "init_lora_weights": _init_lora_weights(first.init),
        "use_dora": first.dora,
        "modules_to_save": None,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }


_UNSUPPORTED = {  # PEFT config fields whose non-default values this loader cannot honour yet
    "fan_in_fan_out": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None,),
    "modules_to_save": (None, []),
    # each of these changes what the adapter computes or which tensors the file holds
    "lora_bias": (False, None),
    "use_qalora": (False, None),
    "layer_replication": (None,),
    "trainable_token_indices": (None,),
    "target_parameters": (None, []),
    "alora_invocation_tokens": (None,),
}
_BIASES = ("none", "all", "lora_only")  # PEFT's `bias`; only "lora_only" trains (and so saves) biases here


# inits that rewrite the base weights in ways tinytune does not reproduce: loading their A and B
# onto an unmodified base would give a different model without a word
_BASE_REWRITING_INITS = ("olora", "corda", "loftq", "lora_ga")


def _init_from_peft(fields: _check.Fields) -> str:
    """tinytune's init for PEFT's `init_lora_weights` (a bool or a string; only "pissa" changes what loading does)."""
    value = fields.data.get("init_lora_weights", True)
    if value is not None and not isinstance(value, (bool, str)):
        raise _check.FieldError(f"{fields.where('init_lora_weights')} must be true, false or the name of an init "
                                f"(e.g. 'gaussian', 'pissa'), got {value!r} ({type(value).__name__})")
    if value in ("gaussian", "pissa"):
        return value
    if isinstance(value, str) and (value.startswith("pissa_niter") or value.lower() in _BASE_REWRITING_INITS):
        raise ValueError(
            f"load_adapter: init_lora_weights={value!r} in {fields.label} is not supported: it rewrites the base "
            "weights in a way tinytune does not reproduce (only 'pissa', the full SVD, is). Convert the adapter to "
            "plain LoRA with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    return "kaiming"  # True, False, None, "eva", "orthogonal", ...: the file's A and B overwrite the init


def _flag(fields: _check.Fields, key: str) -> bool:
    """A PEFT boolean that defaults to False (absent or null)."""
    return bool(fields.get(key, _check.boolean, none=True, default=False))


def config_from_peft(config: dict, path: str | os.PathLike | None = None) -> lora.LoraConfig:
    """The `LoraConfig` a PEFT LoRA `adapter_config.json` describes, every field it reads type-checked.

    Args:
        config: the parsed adapter_config.json.
        path: the adapter DIRECTORY it was read from, named in error messages (None: just the file name).

    Raises:
        ValueError: a field this loader cannot honour, a base-rewriting init, a missing field, or a field
            of the wrong type or out of range (`_check.FieldError`, also a TypeError); each names the
            file and the field.
    """
    fields = _check.Fields(config, CONFIG_NAME, None if path is None else Path(path) / CONFIG_NAME)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"load_adapter: {fields.label} has peft_type={peft_type!r}; this loader reads 'LORA'")
    for field, allowed in _UNSUPPORTED.items():
        if config.get(field, allowed[0]) not in allowed:
            raise ValueError(f"load_adapter: {field}={config[field]!r} in {fields.label} is not supported")
    for field in ("r", "lora_alpha", "target_modules"):
        if config.get(field) is None:
            raise ValueError(f"load_adapter: {fields.label} lacks the field {field!r}")
    bias = fields.get("bias", _check.string, _BIASES, none=True, default="none")
    return lora.LoraConfig(
        rank=fields.get("r", _check.integer, 1),
        alpha=fields.get("lora_alpha", _check.number, 0, low_open=True),
        dropout=fields.get("lora_dropout", _check.number, 0, 1, high_open=True, none=True, default=None) or 0.0,
        targets=fields.get("target_modules", _check.string_or_list),
        exclude=fields.get("exclude_modules", _check.string_or_list, none=True, default=None),
        rslora=_flag(fields, "use_rslora"),
        init=_init_from_peft(fields),
        train_bias=bias == "lora_only",
        dora=_flag(fields, "use_dora"),
    )
