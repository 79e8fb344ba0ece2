"""Adapter files in Hugging Face PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

Writes are atomic per file (written to a temporary name in the same directory, flushed, then
renamed over the target), the weights before the config, so a directory whose config exists
never holds half a weights file. Loading reads safetensors only: no pickle is ever executed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .._files import atomic_write
from . import _rollback, adapter, freeze, ia3, lora, lora_config_io, prefix, prompt
from ._targets import find_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_PROMPT_LEARNING = {"PROMPT_TUNING": prompt, "PREFIX_TUNING": prefix}


def _methods_on(model: nn.Module) -> list[str]:
    """The peft_type of every method applied to `model`."""
    found = {"LORA": lora.lora_layers, ia3.PEFT_TYPE: ia3.ia3_layers, adapter.PEFT_TYPE: adapter.adapter_layers}
    kinds = [kind for kind, layers in found.items() if any(True for _ in layers(model))]
    if isinstance(getattr(model, "prompt_encoder", None), prompt.SoftPrompt):
        kinds.append("PROMPT_TUNING")
    if isinstance(getattr(model, "prefix_encoder", None), prefix.PrefixEncoder):
        kinds.append("PREFIX_TUNING")
    return kinds


def _selective(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """Selective fine-tuning (no adapter modules): the trainable parameters themselves, "FREEZE"."""
    flags = [p.requires_grad for p in model.parameters()]
    if not any(flags):
        raise ValueError(f"save_adapter: {type(model).__name__} has no adapter to save and no trainable parameter "
                         "(apply a method first: tt.lora.apply, tt.ia3.apply, tt.adapter.apply, tt.freeze...)")
    if all(flags):
        raise ValueError(f"save_adapter: {type(model).__name__} has no adapter and every parameter is trainable "
                         "(full fine-tuning): save the model with tt.save_pretrained, or freeze part of it first")
    weights = {PEFT_PREFIX + k: v for k, v in freeze.state_dict(model).items()}
    return freeze.peft_config_dict(model), weights


def _adapter_files(model: nn.Module, lora_name: str | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json dict, tensors by PEFT key) for the one method on `model` (LoRA: the adapter
    `lora_name`, default the active one)."""
    methods = _methods_on(model)
    if len(methods) > 1:
        raise ValueError(f"save_adapter: {type(model).__name__} carries several methods {methods}; one adapter "
                         "directory holds one method (save them from separate models)")
    kind = methods[0] if methods else None
    if lora_name is not None and kind != "LORA":
        raise ValueError(f"save_adapter: adapter={lora_name!r} names a LoRA adapter, but {type(model).__name__} carries "
                         f"{kind or 'no adapter method'}; named adapters are a LoRA feature")
    if kind == "LORA":
        return lora_config_io.peft_config_dict(model, lora_name), lora.state_dict(model, lora_name)
    if kind == ia3.PEFT_TYPE:
        return ia3.peft_config_dict(model), ia3.state_dict(model)
    if kind == adapter.PEFT_TYPE:
        return adapter.peft_config_dict(adapter.applied_config(model)), adapter.state_dict(model)
    if kind in _PROMPT_LEARNING:  # key "prompt_embeddings" (prefix: the MLP's output, as PEFT saves it)
        method = _PROMPT_LEARNING[kind]
        return method.peft_config_dict(model), method.state_dict(model)
    return _selective(model)


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter: str | None = None) -> Path:
    """Write `model`'s adapter to the directory `path` (created if needed).

    Files: `adapter_model.safetensors` (PEFT key names) and `adapter_config.json`, for whichever method
    the model carries: LoRA (DoRA, PiSSA), IA3, bottleneck adapters ("BOTTLENECK_ADAPTER"), soft prompts,
    prefix tuning (its MLP, if any, folded: PEFT saves the prefixes themselves), or, with no
    adapter modules but part of the model frozen, its trainable parameters ("FREEZE"). One directory
    holds one adapter: with several LoRA adapters, `adapter` picks which (default: the active one),
    and the files carry no adapter name (as PEFT's). Returns the path.

    Raises:
        ValueError: the model has no adapter (or several methods), no LoRA adapter `adapter` (or
            `adapter` is given for another method), or the adapter's layers differ in rank/alpha/dropout.
    """
    config, tensors = _adapter_files(model, adapter)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(path / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return path


def _read_config(path: Path) -> dict:
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"load_adapter: {config_file} not found (expected a PEFT adapter directory)")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"load_adapter: {config_file} is not valid JSON: {err}") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickled = path / "adapter_model.bin"
        hint = (f"; {pickled.name} exists but pickles are never loaded: convert it to safetensors"
                if pickled.exists() else "")
        raise FileNotFoundError(f"load_adapter: {weights} not found{hint}")
    return load_file(str(weights))


def _load_lora(model: nn.Module, cfg: lora.LoraConfig, weights: dict[str, torch.Tensor], name: str | None) -> None:
    """Apply (no LoRA yet), add (a new name) or reuse (the active adapter, or `name` when it exists)
    the adapter, then load it strictly; an adapter added here is removed again if loading fails."""
    existing = lora.list_adapters(model)
    added = None
    if not existing:
        lora.apply(model, cfg, adapter_name=name or lora.DEFAULT_ADAPTER)
    elif name is not None and name not in existing:
        lora.add_adapter(model, name, cfg)
        added = name
    try:
        lora.load_state_dict(model, weights, strict=True, adapter=name)
    except Exception:
        if added is not None:
            lora.delete_adapter(model, added)
        raise


def _load_method(model: nn.Module, config: dict, weights: dict[str, torch.Tensor], path: Path,
                 adapter_name: str | None) -> None:
    kind = config.get("peft_type")
    if adapter_name is not None and kind != "LORA":
        raise ValueError(f"load_adapter: adapter_name={adapter_name!r} is for LoRA adapters, but {path / CONFIG_NAME} "
                         f"has peft_type={kind!r}")
    if kind == "LORA":
        _load_lora(model, lora_config_io.config_from_peft(config, path), weights, adapter_name)
    elif kind == ia3.PEFT_TYPE:
        cfg = ia3.config_from_peft(config)
        if not any(True for _ in ia3.ia3_layers(model)):
            ia3.apply(model, cfg)
        ia3.load_state_dict(model, weights, strict=True)
    elif kind == adapter.PEFT_TYPE:
        cfg = adapter.config_from_peft(config)
        if not any(True for _ in adapter.adapter_layers(model)):
            adapter.apply(model, cfg)
        adapter.load_state_dict(model, weights, strict=True)
    elif kind in _PROMPT_LEARNING:
        method = _PROMPT_LEARNING[kind]
        if not _methods_on(model):
            method.apply(model, method.config_from_peft(config))
        method.load_state_dict(model, weights, strict=True)
    elif kind == freeze.PEFT_TYPE:
        freeze.apply_peft_config(model, config)
        freeze.load_state_dict(model, {k.removeprefix(PEFT_PREFIX): v for k, v in weights.items()}, strict=True)
    else:
        raise ValueError(f"load_adapter: {path / CONFIG_NAME} has peft_type={kind!r}; this loader reads "
                         f"{['LORA', ia3.PEFT_TYPE, adapter.PEFT_TYPE, *_PROMPT_LEARNING, freeze.PEFT_TYPE]}")


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> nn.Module:
    """Load an adapter directory written by `save_adapter` or by HF PEFT into `model`.

    The method is the config's `peft_type` (LORA, IA3, BOTTLENECK_ADAPTER, PROMPT_TUNING, PREFIX_TUNING,
    FREEZE). When `model` does not
    carry it yet, it is applied first from `adapter_config.json`. Loading is strict. Returns model.

    LoRA with `adapter_name` (PEFT's `load_adapter(path, adapter_name=...)`): on a model without LoRA
    the adapter is created under that name (active); on a model with LoRA a new name is ADDED beside
    the others (`tt.lora.add_adapter`: inactive until `set_adapter`), an existing name is overwritten.
    Without it the weights go into the active adapter (or "default", created when there is no LoRA).
    When loading fails, the model is left as it was (the method is taken off again, flags restored).

    Raises:
        FileNotFoundError: a file is missing (a pickled `adapter_model.bin` is refused).
        ValueError: an unknown peft_type, an unsupported config field, a missing, unexpected or
            mis-shaped key (named in the message), or `adapter_name` for a method other than LoRA.
    """
    path = Path(path)
    config = _read_config(path)
    weights = _read_weights(path)
    snap = _rollback.snapshot(model, _weights_pissa_may_rewrite(model, config, path))
    try:
        _load_method(model, config, weights, path, adapter_name)
    except BaseException:
        _rollback.restore(snap)  # a failed load leaves the model as it was
        raise
    return model


def _weights_pissa_may_rewrite(model: nn.Module, config: dict, path: Path) -> list[torch.Tensor]:
    """The base weights a PiSSA adapter's apply would replace by residuals (none for other methods)."""
    if config.get("peft_type") != "LORA" or config.get("init_lora_weights") != "pissa":
        return []
    cfg = lora_config_io.config_from_peft(config, path)
    return [m.weight for _, m in find_targets(model, cfg.targets, cfg.exclude) if isinstance(m, nn.Linear)]
