"""Adapter files in Hugging Face PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

A save is a transaction (`tinytune._transaction`): the whole directory is written beside the old
one, fsynced and swapped in atomically, with a manifest of every file's size and SHA-256 that
`load_adapter` verifies, so a reader finds the complete old adapter or the complete new one, never
new weights beside an old config. Loading reads safetensors only: no pickle is ever executed; every
size the config implies is checked against the file's tensors before the method is applied.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .. import _check
from .._files import contained_file, parse_json, parse_safetensors
from .._manifest import read_verified
from .._transaction import describe_missing, directory_transaction
from . import _rollback, adapter, freeze, ia3, lora, lora_config_io, lora_multi, prefix, prompt
from ._targets import find_targets, matches

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_PROMPT_LEARNING = {"PROMPT_TUNING": prompt, "PREFIX_TUNING": prefix}
_OWNED = (WEIGHTS_NAME, "adapter_model.bin", CONFIG_NAME)  # what an adapter save supersedes (never carried over)


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
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    path = Path(path)
    # one transaction: the old adapter stays whole until the new one is complete on disk; a stale
    # adapter_model.bin of an older save is dropped with it (it would contradict the new weights)
    with directory_transaction(path, owned=_OWNED, what="save_adapter") as staging:
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(text)
    return path


def _config_file(path: Path) -> Path:
    config_file = contained_file(path, CONFIG_NAME, "load_adapter")
    if not config_file.is_file():
        raise FileNotFoundError(f"load_adapter: {config_file} not found (expected a PEFT adapter directory)"
                                + describe_missing(path))
    return config_file


def _weights_file(path: Path) -> Path:
    weights = contained_file(path, WEIGHTS_NAME, "load_adapter")
    if not weights.is_file():
        pickled = path / "adapter_model.bin"
        hint = (f"; {pickled.name} exists but pickles are never loaded: convert it to safetensors"
                if pickled.exists() else "")
        raise FileNotFoundError(f"load_adapter: {weights} not found{hint}")
    return weights


def _load_lora(model: nn.Module, cfg: lora.LoraConfig, weights: dict[str, torch.Tensor], name: str | None,
               where: Path) -> None:
    """Apply (no LoRA yet), add (a new name) or reuse (the active adapter, or `name` when it exists)
    the adapter, then load it strictly; an adapter added here is removed again if loading fails.
    Reusing an adapter whose hyperparameters differ from the file's is refused (it would mix the two)."""
    existing = lora.list_adapters(model)
    added = None
    if not existing:
        lora.apply(model, cfg, adapter_name=name or lora.DEFAULT_ADAPTER)
    elif name is not None and name not in existing:
        lora.add_adapter(model, name, cfg)
        added = name
    else:
        _refuse_mixed_lora(model, name or lora.active_adapter(model), cfg, where)
    try:
        lora.load_state_dict(model, weights, strict=True, adapter=name)
    except Exception:
        if added is not None:
            lora.delete_adapter(model, added)
        raise


def _refuse_mixed_lora(model: nn.Module, name: str, cfg: lora.LoraConfig, where: Path) -> None:
    spec = lora_multi.adapter_spec(model, name)
    for ours, file_field, theirs in (("rank", "r", cfg.rank), ("alpha", "lora_alpha", cfg.alpha),
                                     ("dropout", "lora_dropout", cfg.dropout), ("rslora", "use_rslora", cfg.rslora),
                                     ("dora", "use_dora", cfg.dora)):
        if getattr(spec, ours) != theirs:
            _refuse_mixed(f"LoRA adapter {name!r}", f"{ours}={getattr(spec, ours)!r}", f"{file_field}={theirs!r}",
                          where, "pass adapter_name='<new name>' to load it beside the existing one")
    if (spec.init == "pissa") != (cfg.init == "pissa"):
        _refuse_mixed(f"LoRA adapter {name!r}", f"init={spec.init!r}", f"init={cfg.init!r}", where, "")


def _refuse_mixed(what: str, ours: str, theirs: str, where: Path, hint: str) -> None:
    raise ValueError(f"load_adapter: the model already carries {what} with {ours}, but {where / CONFIG_NAME} has "
                     f"{theirs}; loading its weights into it would mix the two silently. Load it into a model "
                     f"without that method{' or ' + hint if hint else ''}")


def _refuse_mixed_method(kind: str, model: nn.Module, cfg, where: Path) -> None:
    """The same refusal for IA3, bottleneck adapters, soft prompts and prefixes already on `model`."""
    if kind == adapter.PEFT_TYPE:
        have = adapter.applied_config(model)
        for field in ("bottleneck", "reduction_factor", "placement", "activation", "scaling", "dropout"):
            if getattr(have, field) != getattr(cfg, field):
                _refuse_mixed("bottleneck adapters", f"{field}={getattr(have, field)!r}",
                              f"{field}={getattr(cfg, field)!r}", where, "")
    elif kind == ia3.PEFT_TYPE:
        for name, layer in ia3.ia3_layers(model):
            wanted = matches(name, layer.base, cfg.feedforward)
            if layer.feedforward != wanted:
                _refuse_mixed("(IA)3", f"{name!r} feedforward={layer.feedforward}", f"feedforward={wanted} for it",
                              where, "")
    elif kind in _PROMPT_LEARNING:
        have = _PROMPT_LEARNING[kind].state_dict(model)["prompt_embeddings"].shape[0]
        if have != cfg.num_virtual_tokens:
            _refuse_mixed(kind.lower().replace("_", " "), f"num_virtual_tokens={have}",
                          f"num_virtual_tokens={cfg.num_virtual_tokens}", where, "")


def _check_sizes(kind: str, cfg, weights: dict[str, torch.Tensor], where: Path) -> None:
    """Every size the config implies agrees with the file's tensors, BEFORE the method allocates anything
    (a hand-edited `r` of a billion must not allocate gigabytes first)."""
    file = where / WEIGHTS_NAME
    if kind == "LORA":
        found = [(k, weights[k].shape) for k in sorted(weights) if "lora_" in k and "magnitude" not in k]
        if not found:
            raise ValueError(f"load_adapter: {file} holds no LoRA tensors (keys: {sorted(weights)[:5]})")
        for key, shape in found:
            axis = 0 if key.endswith(("lora_A.weight", "lora_embedding_A")) else 1
            if len(shape) != 2 or shape[axis] != cfg.rank:
                raise ValueError(f"load_adapter: {file} tensor {key!r} has shape {tuple(shape)}, but "
                                 f"{where / CONFIG_NAME} says r={cfg.rank} (expected size {cfg.rank} on axis {axis})")
    elif kind in _PROMPT_LEARNING:
        shape = weights["prompt_embeddings"].shape if "prompt_embeddings" in weights else None
        if shape is None or len(shape) != 2 or shape[0] != cfg.num_virtual_tokens:
            raise ValueError(f"load_adapter: {file} tensor 'prompt_embeddings' has shape "
                             f"{None if shape is None else tuple(shape)}, but {where / CONFIG_NAME} says "
                             f"num_virtual_tokens={cfg.num_virtual_tokens}")
    elif kind == adapter.PEFT_TYPE and cfg.bottleneck is not None:
        for key, value in weights.items():
            if key.endswith("adapter.down.weight") and (value.dim() != 2 or value.shape[0] != cfg.bottleneck):
                raise ValueError(f"load_adapter: {file} tensor {key!r} has shape {tuple(value.shape)}, but "
                                 f"{where / CONFIG_NAME} says bottleneck_size={cfg.bottleneck}")


_KNOWN = ["LORA", ia3.PEFT_TYPE, adapter.PEFT_TYPE, *_PROMPT_LEARNING, freeze.PEFT_TYPE]


def _method_config(kind, config: dict, path: Path):
    """The method's config from the file (typed and bounded; no allocation yet)."""
    if kind == "LORA":
        return lora_config_io.config_from_peft(config, path)
    if kind == ia3.PEFT_TYPE:
        return ia3.config_from_peft(config, path)
    if kind == adapter.PEFT_TYPE:
        return adapter.config_from_peft(config, path)
    if kind in _PROMPT_LEARNING:
        return _PROMPT_LEARNING[kind].config_from_peft(config, path)
    if kind == freeze.PEFT_TYPE:
        return None
    raise ValueError(f"load_adapter: {path / CONFIG_NAME} has peft_type={kind!r}; this loader reads {_KNOWN}")


def _load_method(model: nn.Module, kind: str, cfg, config: dict, weights: dict[str, torch.Tensor], path: Path,
                 adapter_name: str | None) -> None:
    if kind == "LORA":
        _load_lora(model, cfg, weights, adapter_name, path)
    elif kind in (ia3.PEFT_TYPE, adapter.PEFT_TYPE):
        method = ia3 if kind == ia3.PEFT_TYPE else adapter
        layers = ia3.ia3_layers if kind == ia3.PEFT_TYPE else adapter.adapter_layers
        if not any(True for _ in layers(model)):
            method.apply(model, cfg)
        else:
            _refuse_mixed_method(kind, model, cfg, path)
        method.load_state_dict(model, weights, strict=True)
    elif kind in _PROMPT_LEARNING:
        method = _PROMPT_LEARNING[kind]
        if not _methods_on(model):
            method.apply(model, cfg)
        elif kind in _methods_on(model):
            _refuse_mixed_method(kind, model, cfg, path)
        method.load_state_dict(model, weights, strict=True)
    else:
        freeze.apply_peft_config(model, config, path)
        freeze.load_state_dict(model, {k.removeprefix(PEFT_PREFIX): v for k, v in weights.items()}, strict=True)


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> nn.Module:
    """Load an adapter directory written by `save_adapter` or by HF PEFT into `model`.

    The method is the config's `peft_type` (LORA, IA3, BOTTLENECK_ADAPTER, PROMPT_TUNING, PREFIX_TUNING,
    FREEZE). When `model` does not carry it yet, it is applied first from `adapter_config.json`.
    Loading is strict. Returns model.

    Before anything touches the model: a directory written by tinytune is checked against its
    manifest (every file's size and SHA-256), the config's fields are type- and range-checked, and
    every size the config implies (rank, virtual tokens, bottleneck) is checked against the tensors
    in the file. A model that already carries the method with other hyperparameters than the file's
    is refused, never silently mixed.

    LoRA with `adapter_name` (PEFT's `load_adapter(path, adapter_name=...)`): on a model without LoRA
    the adapter is created under that name (active); on a model with LoRA a new name is ADDED beside
    the others (`tt.lora.add_adapter`: inactive until `set_adapter`), an existing name is overwritten.
    Without it the weights go into the active adapter (or "default", created when there is no LoRA).
    When loading fails, the model is left as it was (the method is taken off again, flags restored).

    Raises:
        FileNotFoundError: a file is missing (a pickled `adapter_model.bin` is refused).
        ValueError: a damaged or mismatched file (`IntegrityError`, naming it), an unknown peft_type,
            an unsupported or ill-typed config field, a size the tensors contradict, a missing,
            unexpected or mis-shaped key (named in the message), hyperparameters that differ from the
            method already on the model, or `adapter_name` for a method other than LoRA.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"load_adapter: {path} is not a directory (expected a PEFT adapter directory)"
                                + describe_missing(path))
    weights_file, config_file = _weights_file(path), _config_file(path)
    # both files as read, checked against the manifest: never new weights beside an old config
    data = read_verified(path, [CONFIG_NAME, WEIGHTS_NAME], "load_adapter")
    config = _check.mapping(parse_json(data[CONFIG_NAME], config_file, "load_adapter"), f"load_adapter: {config_file}")
    kind = config.get("peft_type")
    if adapter_name is not None and kind != "LORA":
        raise ValueError(f"load_adapter: adapter_name={adapter_name!r} is for LoRA adapters, but {path / CONFIG_NAME} "
                         f"has peft_type={kind!r}")
    cfg = _method_config(kind, config, path)
    weights = parse_safetensors(data.pop(WEIGHTS_NAME), weights_file, "load_adapter")
    _check_sizes(kind, cfg, weights, path)
    snap = _rollback.snapshot(model, _weights_pissa_may_rewrite(model, cfg))
    try:
        _load_method(model, kind, cfg, config, weights, path, adapter_name)
    except BaseException:
        _rollback.restore(snap)  # a failed load leaves the model as it was
        raise
    return model


def _weights_pissa_may_rewrite(model: nn.Module, cfg) -> list[torch.Tensor]:
    """The base weights a PiSSA adapter's apply would replace by residuals (none for other methods)."""
    if not isinstance(cfg, lora.LoraConfig) or cfg.init != "pissa":
        return []
    return [m.weight for _, m in find_targets(model, cfg.targets, cfg.exclude) if isinstance(m, nn.Linear)]
