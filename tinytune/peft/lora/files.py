"""LoRA's adapter files in PEFT's layout: the config (`adapter_config.json` <-> `LoraConfig`) and the
weights (one adapter's tensors under PEFT's saved key names, and back).

Files hold one adapter and no adapter name (`base_model.model.<path>.lora_A.weight`); PEFT's
in-memory names carry it (`lora_A.<name>.weight`), tinytune's `state_dict(model, adapter=...)`
picks the adapter instead, so its keys are always the file's.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ... import _check
from .._method import refuse_mixed
from ..modules_to_save import read_field
from .._state import copy_state
from .config import DEFAULT_ADAPTER, LoraConfig
from .inject import add_adapter, apply
from .multi import active_adapter, adapter_layers, adapter_spec, delete_adapter, list_adapters, lora_layers, resolve_adapter

CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."

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
    adapter = resolve_adapter(model, adapter, "save_adapter")
    layers = [(name, layer.adapters[adapter]) for name, layer in adapter_layers(model, adapter)]
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
    bias_trained = any(k.endswith(".bias") for k in state_dict(model, adapter))
    # PEFT's fan_in_fan_out: the base stores its weight (in, out), as GPT-2's Conv1D does (PEFT itself
    # sets it per module on load, so a model mixing Conv1D and nn.Linear loads either way)
    fan_in_fan_out = any(getattr(layer, "fan_in_fan_out", False) for _, layer in adapter_layers(model, adapter))
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": first.dropout,
        "target_modules": [name for name, _ in layers],  # exact paths: PEFT matches them as suffixes
        "use_rslora": first.rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "lora_only" if bias_trained else "none",
        "init_lora_weights": _init_lora_weights(first.init),
        "use_dora": first.dora,
        "modules_to_save": None,  # save_adapter writes the model's (modules_to_save.saved_paths)
        "inference_mode": True,
        "base_model_name_or_path": None,
    }


_UNSUPPORTED = {  # PEFT config fields whose non-default values this loader cannot honour yet
    # (fan_in_fan_out is not one: it only says how the base stores its weight, which each layer knows)
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None,),
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


def config_from_peft(config: dict, path: str | os.PathLike | None = None) -> LoraConfig:
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
    _flag(fields, "fan_in_fan_out")  # type-checked only: each layer reads its weight's layout from its module
    return LoraConfig(
        rank=fields.get("r", _check.integer, 1),
        alpha=fields.get("lora_alpha", _check.number, 0, low_open=True),
        dropout=fields.get("lora_dropout", _check.number, 0, 1, high_open=True, none=True, default=None) or 0.0,
        targets=fields.get("target_modules", _check.string_or_list),
        exclude=fields.get("exclude_modules", _check.string_or_list, none=True, default=None),
        rslora=_flag(fields, "use_rslora"),
        init=_init_from_peft(fields),
        train_bias=bias == "lora_only",
        dora=_flag(fields, "use_dora"),
        modules_to_save=read_field(fields),
    )


# ------------------------------------------------------------------------------ the weights
def _layer_tensors(name: str, layer: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    key = PEFT_PREFIX + name
    tensors = {f"{key}.{suffix}": p for suffix, p in layer.file_tensors(adapter).items()}
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


# ------------------------------------------------------------------------------ loading a file
def check_sizes(cfg: LoraConfig, weights: dict[str, torch.Tensor], where: Path) -> None:
    """Every LoRA factor in the file has the config's rank on its rank axis, BEFORE anything is allocated
    (a hand-edited `r` of a billion must not allocate gigabytes first). Factors are matrices (linears,
    embeddings, Conv1D) or convolution kernels: A (r, in, *kernel), B (out, r, *1s).

    Raises:
        ValueError: no LoRA tensor, or a factor whose rank axis disagrees with `r` (named; a convolution's
            B of r / groups columns is named as PEFT's LoRA on a grouped convolution, which tinytune refuses).
    """
    file = where / "adapter_model.safetensors"
    found = [(k, weights[k].shape) for k in sorted(weights) if "lora_" in k and "magnitude" not in k]
    if not found:
        raise ValueError(f"load_adapter: {file} holds no LoRA tensors (keys: {sorted(weights)[:5]})")
    for key, shape in found:
        axis = 0 if ".lora_A" in key or "lora_embedding_A" in key else 1
        if len(shape) < 2 or shape[axis] != cfg.rank:
            grouped = axis == 1 and len(shape) > 2 and 0 < shape[1] < cfg.rank and cfg.rank % shape[1] == 0
            why = (f"; this is PEFT's LoRA on a grouped convolution (groups={cfg.rank // shape[1]}), which tinytune "
                   "does not adapt: its update could never be merged into the grouped weight") if grouped else ""
            raise ValueError(f"load_adapter: {file} tensor {key!r} has shape {tuple(shape)}, but "
                             f"{where / CONFIG_NAME} says r={cfg.rank} (expected size {cfg.rank} on axis {axis}){why}")


def _refuse_mixed_lora(model: nn.Module, name: str, cfg: LoraConfig, where: Path) -> None:
    spec = adapter_spec(model, name)
    for ours, file_field, theirs in (("rank", "r", cfg.rank), ("alpha", "lora_alpha", cfg.alpha),
                                     ("dropout", "lora_dropout", cfg.dropout), ("rslora", "use_rslora", cfg.rslora),
                                     ("dora", "use_dora", cfg.dora)):
        if getattr(spec, ours) != theirs:
            refuse_mixed(f"LoRA adapter {name!r}", f"{ours}={getattr(spec, ours)!r}", f"{file_field}={theirs!r}",
                         where, "pass adapter_name='<new name>' to load it beside the existing one")
    if (spec.init == "pissa") != (cfg.init == "pissa"):
        refuse_mixed(f"LoRA adapter {name!r}", f"init={spec.init!r}", f"init={cfg.init!r}", where)


def load_file(model: nn.Module, cfg: LoraConfig, config: dict, weights: dict[str, torch.Tensor], where: Path,
              name: str | None) -> None:
    """Apply (no LoRA yet), add (a new name) or reuse (the active adapter, or `name` when it exists)
    the adapter, then load it strictly; an adapter added here is removed again if loading fails.
    Reusing an adapter whose hyperparameters differ from the file's is refused (it would mix the two)."""
    existing = list_adapters(model)
    added = None
    if not existing:
        apply(model, cfg, adapter_name=name or DEFAULT_ADAPTER)
    elif name is not None and name not in existing:
        add_adapter(model, name, cfg)
        added = name
    else:
        _refuse_mixed_lora(model, name or active_adapter(model), cfg, where)
    try:
        load_state_dict(model, weights, strict=True, adapter=name)
    except Exception:
        if added is not None:
            delete_adapter(model, added)
        raise
