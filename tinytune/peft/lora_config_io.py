"""LoRA's `adapter_config.json`: tinytune's layers -> PEFT's LoRA config fields, and back to a `LoraConfig`."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

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
}


# inits that rewrite the base weights in ways tinytune does not reproduce: loading their A and B
# onto an unmodified base would give a different model without a word
_BASE_REWRITING_INITS = ("olora", "corda", "loftq", "lora_ga")


def _init_from_peft(value, path: Path) -> str:
    """tinytune's init for PEFT's `init_lora_weights` (only "pissa" changes what loading does)."""
    if value in ("gaussian", "pissa"):
        return value
    if isinstance(value, str) and (value.startswith("pissa_niter") or value.lower() in _BASE_REWRITING_INITS):
        raise ValueError(
            f"load_adapter: init_lora_weights={value!r} in {path / CONFIG_NAME} is not supported: it rewrites the base "
            "weights in a way tinytune does not reproduce (only 'pissa', the full SVD, is). Convert the adapter to "
            "plain LoRA with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    return "kaiming"  # True, False, "eva", "orthogonal", ...: the file's A and B overwrite the init


def config_from_peft(config: dict, path: Path) -> lora.LoraConfig:
    """The `LoraConfig` a PEFT LoRA `adapter_config.json` (read from the directory `path`) describes.

    Raises:
        ValueError: a field this loader cannot honour, a base-rewriting init, or a missing field.
    """
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"load_adapter: {path / CONFIG_NAME} has peft_type={peft_type!r}; this loader reads 'LORA'")
    for field, allowed in _UNSUPPORTED.items():
        if config.get(field, allowed[0]) not in allowed:
            raise ValueError(f"load_adapter: {field}={config[field]!r} in {path / CONFIG_NAME} is not supported")
    for field in ("r", "lora_alpha", "target_modules"):
        if config.get(field) is None:
            raise ValueError(f"load_adapter: {path / CONFIG_NAME} lacks the field {field!r}")
    targets = config["target_modules"]
    return lora.LoraConfig(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        targets=targets if isinstance(targets, str) else list(targets),
        exclude=config.get("exclude_modules"),
        rslora=bool(config.get("use_rslora", False)),
        init=_init_from_peft(config.get("init_lora_weights", True), path),
        train_bias=config.get("bias", "none") == "lora_only",
        dora=bool(config.get("use_dora") or False),
    )
