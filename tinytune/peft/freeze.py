"""Selective fine-tuning: train a chosen subset of a model's own parameters, add nothing.

    freeze.freeze(model)                              # every parameter frozen
    freeze.unfreeze(model, ["lm_head"])               # same matching rules as LoRA targets
    freeze.bitfit(model)                              # biases only (Ben Zaken et al., 2021)
    freeze.apply(model, freeze.FreezeConfig(mode="last_blocks", n_blocks=2))

Nothing is wrapped or swapped: the only state is each parameter's `requires_grad`. The "state dict"
of the method is therefore the trainable parameters themselves, under their model names.
Finding norm layers and the block list (`is_norm`, `find_blocks`, re-exported here) is in `freeze_parts`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

from .. import _check
from ._method import Method
from ._state import copy_state
from ._targets import TargetSpec, find_targets, output_heads, validate_spec
from .freeze_parts import find_blocks, is_norm
from .modules_to_save import applies

__all__ = [
    "FreezeConfig", "MODES", "freeze", "unfreeze", "bitfit", "norms_only", "last_blocks", "embeddings_and_head",
    "apply", "state_dict", "load_state_dict", "peft_config_dict", "apply_peft_config", "is_norm", "find_blocks",
]

MODES = ("bitfit", "norms", "last_blocks", "embeddings", "targets")
PEFT_TYPE = "FREEZE"  # not a peft.PeftType: PEFT has no selective fine-tuning method


@dataclass
class FreezeConfig:
    """What `apply` trains. Validated on construction (ValueError naming the field).

    Attributes:
        mode: "bitfit" (biases), "norms" (normalisation layers), "last_blocks" (the last
            `n_blocks` entries of the block list), "embeddings" (nn.Embedding modules and the
            output head) or "targets" (the modules `targets` matches).
        targets: for mode="targets" only: module names (equal, or a dotted suffix), a regex
            (`re.fullmatch`), "all-linear" or a callable `(name, module) -> bool`.
        n_blocks: for mode="last_blocks" only: how many blocks, counted from the end (>= 1).
        blocks: for mode="last_blocks" only: dotted name of the block list; None auto-detects it.
    """

    mode: str = "bitfit"
    targets: TargetSpec = None
    n_blocks: int | None = None
    blocks: str | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown FreezeConfig.mode={self.mode!r}; expected one of {', '.join(map(repr, MODES))}")
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if self.mode == "targets":
            if self.targets is None:
                raise ValueError("FreezeConfig.targets is None but mode='targets' needs module names, a regex, "
                                 "'all-linear' or a callable")
            validate_spec(self.targets, "FreezeConfig.targets")
        elif self.targets is not None:
            raise ValueError(f"FreezeConfig.targets={self.targets!r} is only used with mode='targets', not {self.mode!r}")
        if self.mode == "last_blocks":
            _check_n(self.n_blocks, "FreezeConfig.n_blocks")
            if self.blocks is not None and (not isinstance(self.blocks, str) or not self.blocks):
                raise ValueError(f"FreezeConfig.blocks must be a dotted module name or None, got {self.blocks!r}")
        else:
            for field in ("n_blocks", "blocks"):
                if getattr(self, field) is not None:
                    raise ValueError(f"FreezeConfig.{field}={getattr(self, field)!r} is only used with "
                                     f"mode='last_blocks', not {self.mode!r}")


def _check_n(n, field: str) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{field} must be an integer >= 1, got {field.rpartition('.')[2]}={n!r}")


def freeze(model: nn.Module) -> nn.Module:
    """Freeze every parameter of `model` (requires_grad=False), in place.

    Returns: model (so calls chain: `unfreeze(freeze(model), ["lm_head"])`).
    """
    model.requires_grad_(False)
    return model


def _owners(found: Iterable[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """The matches that hold at least one parameter (a ReLU or a rotary cache has nothing to train)."""
    return [(n, m) for n, m in found if next(m.parameters(), None) is not None]


def _parameter_modules(model: nn.Module, limit: int = 12) -> str:
    """Names of modules that hold parameters directly, for error messages."""
    names = [n for n, m in model.named_modules() if n and next(m.parameters(recurse=False), None) is not None]
    shown = ", ".join(repr(n) for n in names[:limit])
    return (shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")) if names else "(none)"


def _set_trainable(modules: list[tuple[str, nn.Module]]) -> list[str]:
    for _, module in modules:
        module.requires_grad_(True)
    return [name for name, _ in modules]


def _match(model: nn.Module, targets: TargetSpec, exclude: TargetSpec, what: str) -> list[tuple[str, nn.Module]]:
    """Matched modules that own parameters, or ValueError naming the targets and what exists."""
    if targets is None:
        raise ValueError(f"{what}: targets is None; give module names, a regex, 'all-linear' or a callable")
    validate_spec(targets, f"{what} targets")
    validate_spec(exclude, f"{what} exclude")
    found = find_targets(model, targets, exclude, skip_saved=False)  # a module to save may be unfrozen too
    owners = _owners(found)
    if not owners:
        why = (f"matched only modules without parameters ({[n for n, _ in found][:8]})" if found
               else "matched no module")
        raise ValueError(
            f"{what}: targets {targets!r} (exclude={exclude!r}) {why} of {type(model).__name__}; "
            f"modules with parameters that exist: {_parameter_modules(model)}"
        )
    return owners


def unfreeze(model: nn.Module, targets: TargetSpec, exclude: TargetSpec = None) -> list[str]:
    """Make every parameter of the modules `targets` matches trainable (others are left as they are).

    Matching follows LoRA's rules exactly (tinytune/peft/_targets.py): a list of names (equal, or a
    dotted suffix), a regex (`re.fullmatch` on the dotted name), "all-linear" (every nn.Linear but
    the output head) or a callable `(name, module) -> bool`. Combine with `freeze` for "only these".

    Args:
        model: any nn.Module, changed in place.
        targets: which modules to train.
        exclude: modules to leave alone, by the same rules.

    Returns:
        The dotted names of the matched modules that hold parameters, in model order.

    Raises:
        ValueError: a malformed spec, or nothing with parameters matched (the message lists module
            names that exist). Nothing is changed when it raises.
    """
    return _set_trainable(_match(model, targets, exclude, "unfreeze"))


def bitfit(model: nn.Module) -> list[str]:
    """BitFit: freeze everything, then train every parameter called `bias` (norm biases included).

    Returns:
        The names of the bias parameters made trainable, in model order.

    Raises:
        ValueError: the model has no bias parameters (nothing is frozen then).
    """
    biases = [(n, p) for n, p in model.named_parameters() if n.rpartition(".")[2] == "bias"]
    if not biases:
        raise ValueError(f"bitfit: {type(model).__name__} has no bias parameters, so BitFit would train nothing; "
                         "use norms_only, last_blocks or unfreeze instead")
    freeze(model)
    for _, p in biases:
        p.requires_grad_(True)
    return [n for n, _ in biases]


def norms_only(model: nn.Module) -> list[str]:
    """Freeze everything, then train the normalisation layers (LayerNorm, RMSNorm, GroupNorm, ...).

    Returns:
        The names of the norm modules made trainable (those with parameters), in model order.

    Raises:
        ValueError: the model has no norm layer with parameters (nothing is frozen then).
    """
    found = _owners((n, m) for n, m in model.named_modules() if n and is_norm(m))
    if not found:
        raise ValueError(f"norms_only: {type(model).__name__} has no normalisation layer with parameters; "
                         f"modules with parameters that exist: {_parameter_modules(model)}")
    freeze(model)
    return _set_trainable(found)


def last_blocks(model: nn.Module, n: int, blocks: str | None = None) -> list[str]:
    """Freeze everything, then train the last `n` entries of the model's block list.

    Args:
        model: any nn.Module, changed in place.
        n: how many blocks, counted from the end (1 <= n <= number of blocks).
        blocks: dotted name of the block list (an nn.ModuleList or nn.Sequential); None picks the
            longest outermost nn.ModuleList whose entries share one type (`find_blocks`).

    Returns:
        The dotted names of the blocks made trainable, e.g. ["model.layers.1"].

    Raises:
        ValueError: n is not an integer in [1, number of blocks] (the message names both), or no
            block list is found. Nothing is changed when it raises.
        TypeError: `blocks` names a module that is not a list of blocks.
    """
    name, block_list = find_blocks(model, blocks)
    count = len(block_list)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= count:
        raise ValueError(f"last_blocks: n={n!r} must be an integer between 1 and the number of blocks in "
                         f"{name!r}, which is {count}")
    prefix = name + "." if name else ""
    chosen = [(f"{prefix}{i}", block_list[i]) for i in range(count - n, count)]
    freeze(model)
    return _set_trainable(chosen)


def embeddings_and_head(model: nn.Module) -> list[str]:
    """Freeze everything, then train every nn.Embedding and the output layer (the module
    `get_output_embeddings()` names, a linear tied to an embedding's weight, or else the last linear).

    Returns:
        The dotted names of the modules made trainable, in model order.

    Raises:
        ValueError: the model has neither (nothing is frozen then).
    """
    heads = output_heads(model)
    found = [(n, m) for n, m in model.named_modules() if n and (isinstance(m, nn.Embedding) or n in heads)]
    if not found:
        raise ValueError(f"embeddings_and_head: {type(model).__name__} has no nn.Embedding and no output head "
                         f"(no linear); modules with parameters: {_parameter_modules(model)}")
    freeze(model)
    return _set_trainable(found)


@applies(mark=False)  # a head the model declares trains too; the file holds it with the rest
def apply(model: nn.Module, cfg: FreezeConfig) -> list[str]:
    """Freeze everything in `model`, then make trainable what `cfg.mode` selects (and a classification
    head the model declares, `peft_modules_to_save`: a new head must train). FreezeConfig has no
    `modules_to_save`: every trainable parameter is saved already.

    Returns:
        What the mode's function returns: bias parameter names for "bitfit", module names otherwise.

    Raises:
        TypeError: `cfg` is not a FreezeConfig.
        ValueError / TypeError: as the mode's function (`bitfit`, `norms_only`, `last_blocks`,
            `embeddings_and_head`, `unfreeze`). Nothing is changed when it raises.
    """
    if not isinstance(cfg, FreezeConfig):
        raise TypeError(f"apply expects a freeze.FreezeConfig, got {type(cfg).__name__}")
    if cfg.mode == "bitfit":
        return bitfit(model)
    if cfg.mode == "norms":
        return norms_only(model)
    if cfg.mode == "last_blocks":
        return last_blocks(model, cfg.n_blocks, cfg.blocks)
    if cfg.mode == "embeddings":
        return embeddings_and_head(model)
    found = _match(model, cfg.targets, None, "apply")  # validate before freezing: all or nothing
    freeze(model)
    return _set_trainable(found)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters lists a tied parameter once, under its first name
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Returns: the trainable parameters under their model names (`model.named_parameters()`; a tied
    parameter once, under its first name), detached, not copied."""
    return {n: p.detach() for n, p in _trainable(model).items()}


def load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], strict: bool = True) -> tuple[list[str], list[str]]:
    """Copy `sd` into the model's trainable parameters (apply the same selection first).

    Returns:
        (missing, unexpected) key lists (both empty under strict=True).

    Raises:
        ValueError: nothing in the model is trainable; a key is mis-shaped; with strict, a key is
            missing or unexpected (a key naming a frozen parameter is unexpected, and says so). Each
            message names the keys. Nothing is copied when it raises.
    """
    params = _trainable(model)
    if not params:
        raise ValueError(f"load_state_dict: every parameter of {type(model).__name__} is frozen; "
                         "apply the same freeze selection first")
    frozen = {n for n, _ in model.named_parameters()} & (set(sd) - set(params))
    note = f" ({sorted(frozen)} are frozen in this model)" if frozen else ""
    return copy_state(params, sd, strict, "the freeze state dict", unexpected_hint=note)


def peft_config_dict(model: nn.Module) -> dict:
    """An adapter_config.json for the PEFT layout: `peft_type` "FREEZE" (PEFT has none) and the
    exact names of the trainable parameters, which `apply_peft_config` restores.

    Raises:
        ValueError: nothing in the model is trainable.
    """
    names = list(_trainable(model))
    if not names:
        raise ValueError(f"peft_config_dict: every parameter of {type(model).__name__} is frozen; nothing to save")
    return {"peft_type": PEFT_TYPE, "task_type": None, "trainable_parameters": names,
            "base_model_name_or_path": None, "inference_mode": True}


def apply_peft_config(model: nn.Module, config: dict, path: str | os.PathLike | None = None) -> list[str]:
    """Freeze everything, then make trainable exactly the parameters `config` (from
    `peft_config_dict`) names. Returns those names.

    Args:
        model: the model to change in place.
        config: the parsed adapter_config.json.
        path: the adapter DIRECTORY it was read from, named in error messages (None: just the file name).

    Raises:
        ValueError: the peft_type is not "FREEZE", the list is missing, not a non-empty list of names
            (`_check.FieldError`, also a TypeError), or it names a parameter the model lacks (named in
            the message). Nothing is changed when it raises.
    """
    fields = _check.Fields(config, "adapter_config.json", None if path is None else Path(path) / "adapter_config.json")
    if config.get("peft_type") != PEFT_TYPE:
        raise ValueError(f"apply_peft_config: {fields.label} has peft_type={config.get('peft_type')!r}; "
                         f"expected {PEFT_TYPE!r}")
    names = fields.get("trainable_parameters", _check.string_list)
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"apply_peft_config: {fields.where('trainable_parameters')} names parameters that "
                         f"{type(model).__name__} lacks: {type(model).__name__} has no parameters {unknown[:8]}")
    freeze(model)
    for name in names:
        params[name].requires_grad_(True)
    return list(names)


# ------------------------------------------------------------------ selective fine-tuning as adapter files
PEFT_PREFIX = "base_model.model."


def is_applied(model: nn.Module) -> bool:
    """Whether `model` is partly frozen: some parameters train, some do not. Every adapter method leaves a
    model so too, so adapter files count selective fine-tuning only when no other method is applied."""
    flags = [p.requires_grad for p in model.parameters()]
    return any(flags) and not all(flags)


def file_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters under PEFT-style file keys (`base_model.model.<parameter name>`).

    Raises:
        ValueError: nothing is trainable, or everything is (full fine-tuning: save the model instead).
    """
    flags = [p.requires_grad for p in model.parameters()]
    if not any(flags):
        raise ValueError(f"save_adapter: {type(model).__name__} has no adapter to save and no trainable parameter "
                         "(apply a method first: tt.lora.apply, tt.ia3.apply, tt.adapter.apply, tt.freeze...)")
    if all(flags):
        raise ValueError(f"save_adapter: {type(model).__name__} has no adapter and every parameter is trainable "
                         "(full fine-tuning): save the model with tt.save_pretrained, or freeze part of it first")
    return {PEFT_PREFIX + k: v for k, v in state_dict(model).items()}


def _load_file_state(model: nn.Module, sd: dict[str, torch.Tensor], strict: bool = True):
    return load_state_dict(model, {k.removeprefix(PEFT_PREFIX): v for k, v in sd.items()}, strict)


def _config_from_file(config: dict, path=None) -> dict:
    return config  # checked by apply_peft_config, against the model it names parameters of


def _load_file(model: nn.Module, cfg, config: dict, tensors: dict[str, torch.Tensor], where, adapter_name) -> None:
    apply_peft_config(model, config, where)
    _load_file_state(model, tensors, strict=True)


METHOD = Method(
    peft_type=PEFT_TYPE, name="selective fine-tuning", config_type=FreezeConfig, is_applied=is_applied,
    peft_config_dict=peft_config_dict, config_from_peft=_config_from_file, apply=apply,
    state_dict=file_state_dict, load_state_dict=_load_file_state, merged_state=lambda model: {}, load=_load_file,
    saves_trainable=True,
)
