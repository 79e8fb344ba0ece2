"""Adapter files in Hugging Face PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

A save is a transaction (`tinytune._transaction`): the whole directory is written beside the old
one, fsynced and swapped in atomically, with a manifest of every file's size and SHA-256 that
`load_adapter` verifies, so a reader finds the complete old adapter or the complete new one, never
new weights beside an old config. The model card (`README.md`, `model_card`) is written in the same
transaction; loading never reads it. Loading reads safetensors only: no pickle is ever executed; every
size the config implies is checked against the file's tensors before the method is applied.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .. import _check
from .._files import contained_file, parse_json, parse_safetensors
from .._manifest import read_verified
from .._transaction import describe_missing, directory_transaction
from . import _rollback, lora, model_card, modules_to_save as mts
from ._targets import find_targets
from .methods import METHODS, by_peft_type, methods_to_save
from .params import count_parameters

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
OWNED = (WEIGHTS_NAME, "adapter_model.bin", CONFIG_NAME)  # what an adapter save supersedes (never carried over)


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module a `torch.compile`d model (`OptimizedModule`) wraps, else `model`: its keys carry
    `_orig_mod.`, which no adapter file may hold. (Dynamo is only looked up when imported already:
    without it nothing can have been compiled, and importing it would cost a second.)"""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(eval_frame, "OptimizedModule", None)
    while optimized is not None and isinstance(model, optimized):
        model = model._orig_mod
    return model


def _metadata(model: nn.Module) -> dict:
    """What the model says of itself for adapter_config.json: PEFT's `task_type` from its explicit
    `peft_task_type` ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS"; absent: the method's value stays), and
    `base_model_name_or_path` from `name_or_path` (set by `load_pretrained`, as transformers does)."""
    out = {}
    task = getattr(model, "peft_task_type", None)
    if task is not None:
        out["task_type"] = _check.string(task, f"{type(model).__name__}.peft_task_type")
    name = getattr(model, "name_or_path", None)
    out["base_model_name_or_path"] = os.fspath(name) if isinstance(name, (str, os.PathLike)) and name else None
    return out


def _with_modules_to_save(model: nn.Module, method, config: dict, tensors: dict) -> tuple[dict, dict]:
    """Add the modules to save (tensors and `modules_to_save`) after checking that the file loses no
    trainable parameter and holds no adapter inside a saved module."""
    paths = mts.saved_paths(model)
    prefix = method.module_prefix
    nested = sorted(k for k in tensors if any(k.startswith(f"{prefix}{p}.") for p in paths))
    if nested:
        raise ValueError(f"save_adapter: {method.name} tensors {nested[:4]} lie inside modules_to_save {paths}; a "
                         "module trained whole cannot also hold an adapter (apply the method before marking it)")
    extra = mts.state_dict(model, paths, prefix)
    owned = list(method.owned(model)) if method.owned is not None else []
    lost = mts.unsaved_trainable(model, [*tensors.values(), *extra.values(), *owned])
    if lost:
        modules = sorted({n.rpartition(".")[0] or n for n in lost})
        raise ValueError(
            f"save_adapter: parameters {lost[:8]}{' ...' if len(lost) > 8 else ''} of {type(model).__name__} are "
            f"trainable but belong neither to {method.name} nor to modules_to_save, so the adapter file would "
            f"silently lose what they learned. Save their modules with it: "
            f"tinytune.peft.modules_to_save.add(model, {modules[:4]}) (or modules_to_save=[...] in the method's "
            "config), or freeze them (requires_grad_(False)) if they were not meant to train")
    return {**config, mts.FIELD: paths or None}, {**tensors, **extra}


def _adapter_files(model: nn.Module, adapter_name: str | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json dict, tensors by PEFT key) for the one method on `model` (LoRA: the adapter
    `adapter_name`, default the active one), with the modules to save and the model's metadata."""
    methods = methods_to_save(model)
    if len(methods) > 1:
        raise ValueError(f"save_adapter: {type(model).__name__} carries several methods {[m.peft_type for m in methods]}; "
                         "one adapter directory holds one method (save them from separate models)")
    method = methods[0]
    if adapter_name is not None and not method.named_adapters:
        raise ValueError(f"save_adapter: adapter={adapter_name!r} names a LoRA adapter, but {type(model).__name__} "
                         f"carries {method.peft_type}; named adapters are a LoRA feature")
    if method.named_adapters:
        config, tensors = method.peft_config_dict(model, adapter_name), method.state_dict(model, adapter_name)
    else:
        config, tensors = method.peft_config_dict(model), method.state_dict(model)
    if not method.saves_trainable:
        config, tensors = _with_modules_to_save(model, method, config, tensors)
    return {**config, **_metadata(model)}, tensors


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter: str | None = None, *,
                 card_info: dict | None = None) -> Path:
    """Write `model`'s adapter to the directory `path` (created if needed).

    Files: `adapter_model.safetensors` (PEFT key names) and `adapter_config.json`, for whichever method
    the model carries: LoRA (DoRA, PiSSA), IA3, bottleneck adapters ("BOTTLENECK_ADAPTER"), soft prompts,
    prefix tuning (its MLP, if any, folded: PEFT saves the prefixes themselves), or, with no
    adapter modules but part of the model frozen, its trainable parameters ("FREEZE"). One directory
    holds one adapter: with several LoRA adapters, `adapter` picks which (default: the active one),
    and the files carry no adapter name (as PEFT's). Returns the path.

    Modules trained whole (`modules_to_save` of the method's config, a classification head the model
    declares) are written beside the method under their plain paths (`base_model.model.score.weight`,
    PEFT's layout) and listed in the config's `modules_to_save`. The config also records the model's
    `task_type` and `base_model_name_or_path` (see docs/classification.md). A `torch.compile`d model
    writes the same files as the model it wraps.

    A model card, `README.md` (front matter `base_model`, `library_name`, `tags`, `pipeline_tag`,
    `datasets`; the method and its hyperparameters, trainable parameters, task, training data and
    hyperparameters, results), is written in the same transaction. `card_info` adds what only the
    caller knows: "datasets" (list of str), "metrics" ({name: number}), "training" ({name: JSON value})
    and "description" (str). A README.md already in `path` that tinytune did not write, or that was
    edited since, is the user's: it is kept unchanged and no card is written (docs/adapters.md).

    Raises:
        ValueError: the model has no adapter (or several methods), no LoRA adapter `adapter` (or
            `adapter` is given for another method), the adapter's layers differ in rank/alpha/dropout,
            a trainable parameter belongs neither to the method nor to a module to save (named:
            the file would lose it), or `card_info` has an unknown key or a mistyped value (named).
            Nothing is written then.
    """
    path = Path(path)
    info = model_card.check_card_info(card_info)
    # one transaction: the old adapter stays whole until the new one is complete on disk; a stale
    # adapter_model.bin of an older save is dropped with it (it would contradict the new weights)
    with directory_transaction(path, owned=OWNED, what="save_adapter") as staging:
        config, tensors = _write_files(model, staging, adapter)
        if not model_card.keeps_existing(path):  # else the user's README.md is carried over as it is
            counts = count_parameters(unwrap_compiled(model))
            card = model_card.render(config, counts.trainable, counts.total,
                                     sum(t.numel() for t in tensors.values()), len(tensors), info)
            (staging / model_card.CARD_NAME).write_text(card, encoding="utf-8")
    return path


def write_adapter_files(model: nn.Module, staging: Path, adapter: str | None = None) -> None:
    """Write `save_adapter`'s two files into `staging`, the directory of a transaction the caller holds
    (`directory_transaction(path, owned=OWNED + ...)`), so that a save that puts more beside the adapter
    (a reward model's statistics) commits it all at once. Everything is checked before the first write.
    (No model card: that is `save_adapter`'s.)

    Raises:
        ValueError: as `save_adapter`.
    """
    _write_files(model, staging, adapter)


def _write_files(model: nn.Module, staging: Path, adapter: str | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """`write_adapter_files`, returning the config and the tensors written."""
    config, tensors = _adapter_files(unwrap_compiled(model), adapter)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    save_file(tensors, str(Path(staging) / WEIGHTS_NAME), metadata={"format": "pt"})
    (Path(staging) / CONFIG_NAME).write_text(text)
    return config, tensors


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


def _method_config(kind, config: dict, path: Path):
    """The method and its config from the file (typed and bounded; no allocation yet)."""
    method = by_peft_type(kind)
    if method is None:
        raise ValueError(f"load_adapter: {path / CONFIG_NAME} has peft_type={kind!r}; this loader reads "
                         f"{[m.peft_type for m in METHODS]}")
    return method, method.config_from_peft(config, path)


def _read_files(path: Path, adapter_name: str | None):
    """(method, its config, the parsed adapter_config.json, the tensors, the weights file) of the adapter
    directory `path`: both files read once, verified against the manifest, parsed and typed."""
    if not path.is_dir():
        raise FileNotFoundError(f"load_adapter: {path} is not a directory (expected a PEFT adapter directory)"
                                + describe_missing(path))
    weights_file, config_file = _weights_file(path), _config_file(path)
    # both files as read, checked against the manifest: never new weights beside an old config
    data = read_verified(path, [CONFIG_NAME, WEIGHTS_NAME], "load_adapter")
    config = _check.mapping(parse_json(data[CONFIG_NAME], config_file, "load_adapter"), f"load_adapter: {config_file}")
    kind = config.get("peft_type")
    method, cfg = _method_config(kind, config, path)
    if adapter_name is not None and not method.named_adapters:
        raise ValueError(f"load_adapter: adapter_name={adapter_name!r} is for LoRA adapters, but {path / CONFIG_NAME} "
                         f"has peft_type={kind!r}")
    weights = parse_safetensors(data.pop(WEIGHTS_NAME), weights_file, "load_adapter")
    return method, cfg, config, weights, weights_file


def _checked_split(model: nn.Module, method, cfg, weights: dict, path: Path, weights_file: Path):
    """(cfg without its modules_to_save, their paths on `model`, the method's tensors, the saved modules'
    tensors), every size checked against `cfg` and `model` before anything is applied."""
    cfg, paths = _file_modules_to_save(model, method, cfg)
    weights, saved = mts.split(weights, paths, method.module_prefix)
    if method.check_sizes is not None:
        method.check_sizes(cfg, weights, path)
    mts.check_state(model, paths, saved, method.module_prefix, weights_file)
    return cfg, paths, weights, saved


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

    The config's `modules_to_save` that match modules of `model` (a name matching none is skipped: PEFT
    writes its task defaults, ["classifier", "score"]) are marked, made trainable and loaded strictly
    from the file's tensors under their paths, whose shapes are checked before anything is applied. A
    `torch.compile`d model is loaded into the module it wraps (and returned as given).

    Raises:
        FileNotFoundError: a file is missing (a pickled `adapter_model.bin` is refused).
        ValueError: a damaged or mismatched file (`IntegrityError`, naming it), an unknown peft_type,
            an unsupported or ill-typed config field, a size the tensors contradict, a missing,
            unexpected or mis-shaped key (named in the message), hyperparameters that differ from the
            method already on the model, `adapter_name` for a method other than LoRA, or a module to
            save whose tensors are missing, unexpected or mis-shaped in the file (named).
    """
    path = Path(path)
    method, cfg, config, weights, weights_file = _read_files(path, adapter_name)
    target = unwrap_compiled(model)
    cfg, paths, weights, saved = _checked_split(target, method, cfg, weights, path, weights_file)
    snap = _rollback.snapshot(target, _weights_pissa_may_rewrite(target, cfg))
    try:
        if not method.saves_trainable:
            mts.attach(target, paths)  # marked first: the method's targets leave these modules out
        method.load_file(target, cfg, config, weights, path, adapter_name)
        if not method.saves_trainable:
            mts.attach(target, mts.resolve(target, mts.declared(target), "load_adapter", strict=False))
            mts.load_state(target, paths, saved, method.module_prefix, weights_file)
    except BaseException:
        _rollback.restore(snap)  # a failed load leaves the model as it was
        raise
    return model


def _file_modules_to_save(model: nn.Module, method, cfg):
    """(the config without its modules_to_save, the module paths they match on `model`). A name that
    matches nothing is dropped: PEFT writes its task defaults, ["classifier", "score"], of which a model
    has one; the file's tensors are still all loaded strictly (a stray key is an unexpected one)."""
    names = getattr(cfg, mts.FIELD, None)
    if method.saves_trainable or not names:
        return cfg, []
    cfg = copy.copy(cfg)  # apply must not resolve the file's names again, strictly
    setattr(cfg, mts.FIELD, None)
    return cfg, mts.resolve(model, names, "load_adapter", strict=False)


def _weights_pissa_may_rewrite(model: nn.Module, cfg) -> list[torch.Tensor]:
    """The base weights a PiSSA adapter's apply would replace by residuals (none for other methods)."""
    if not isinstance(cfg, lora.LoraConfig) or cfg.init != "pissa":
        return []
    return [m.weight for _, m in find_targets(model, cfg.targets, cfg.exclude) if isinstance(m, nn.Linear)]
