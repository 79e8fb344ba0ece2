"""(IA)^3 (Liu et al., 2022): learned vectors that rescale activations, in Hugging Face PEFT's format.

    cfg = ia3.IA3Config(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"])
    names = ia3.apply(model, cfg)          # swaps modules in place, freezes everything else

For a wrapped `nn.Linear` with weight W (out x in) and bias b:
    non-feedforward target:  y = (x W^T + b) * l      l = ia3_l: (out, 1), the bias is scaled too
    feedforward target:      y = (x * l) W^T + b      l = ia3_l: (1, in),  the bias is not
The shapes, the maths (bias included) and the state-dict keys `base_model.model.<path>.ia3_l` are PEFT's,
so adapters move between tinytune and `peft` unchanged.

This module holds the config, `apply` and the model-level verbs (merge, disabled, state dicts, PEFT's
adapter_config.json); the layer itself, `IA3Linear`, is in `ia3_linear`.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from .. import _check
from ._targets import (ALL_LINEAR, TargetSpec, describe_candidates, find_targets, get_parent, matches, output_heads,
                       refuse_shared_merge, replace_module, validate_spec)
from ._state import copy_state
from ._targets import guard_fused_fast_paths, layers_disabled
from ._method import Method, refuse_mixed
from .ia3_linear import IA3Linear
from .modules_to_save import applies, check_names, read_field
from .lora.base import LORA_LAYER_TYPES

__all__ = ["IA3Config", "IA3Linear", "apply", "merge", "unmerge", "merge_and_unload", "disabled", "state_dict",
           "load_state_dict", "ia3_layers", "peft_config_dict", "config_from_peft"]

PEFT_PREFIX = "base_model.model."
PEFT_TYPE = "IA3"


@dataclass
class IA3Config:
    """What `apply` does. Validated on construction (ValueError naming the field).

    Attributes:
        targets: which nn.Linear modules get a vector: a list of names (equal, or a dotted suffix),
            a regex (`re.fullmatch` on the dotted name), "all-linear" or a callable `(name, module) -> bool`.
        feedforward: which of the targets scale their input instead of their output, by the same
            rules; in the list form it must be a subset of a list of `targets`. None: no target is.
        exclude: modules to leave alone, by the same rules.
        init_ones: start every vector at 1, so the model equals its base (PEFT's `init_ia3_weights`);
            False draws N(0, 1) as PEFT does (discouraged).
        modules_to_save: modules trained whole and saved with the vectors (PEFT's field; names equal
            or a dotted suffix); see tinytune/peft/modules_to_save.py.
    """

    targets: TargetSpec = ("k_proj", "v_proj", "down_proj")
    feedforward: TargetSpec = ("down_proj",)
    exclude: TargetSpec = None
    init_ones: bool = True
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        self.modules_to_save = check_names(self.modules_to_save, "IA3Config.modules_to_save")
        for field in ("targets", "feedforward", "exclude"):
            if isinstance(getattr(self, field), (tuple, set, frozenset)):
                setattr(self, field, list(getattr(self, field)))
            validate_spec(getattr(self, field), f"IA3Config.{field}")
        if self.targets is None:
            raise ValueError("IA3Config.targets is None; give module names, a regex, 'all-linear' or a callable")
        if not isinstance(self.init_ones, bool):
            raise ValueError(f"IA3Config.init_ones must be True or False, got init_ones={self.init_ones!r}")
        if isinstance(self.targets, list) and isinstance(self.feedforward, list):
            extra = [f for f in self.feedforward if f not in self.targets]
            if extra:  # PEFT's rule: a feedforward module must also be a target
                raise ValueError(f"IA3Config.feedforward entries {extra!r} are not in targets {self.targets!r}; "
                                 "feedforward must be a subset of targets")


def ia3_layers(model: nn.Module) -> Iterator[tuple[str, IA3Linear]]:
    """Yields: the (name, layer) pairs of every (IA)^3 layer in `model`, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, IA3Linear):
            yield name, module


def _check_target(model: nn.Module, name: str, module: nn.Module) -> None:
    """Raise if `module` cannot take (IA)^3 (already has it, wrong type, its weight read directly)."""
    parent, _ = get_parent(model, name)
    if isinstance(module, IA3Linear) or isinstance(parent, IA3Linear):
        owner = name if isinstance(module, IA3Linear) else name.rpartition(".")[0]
        raise ValueError(f"module {owner!r} already has (IA)^3; call merge_and_unload first to apply it again")
    if isinstance(parent, (nn.MultiheadAttention, *LORA_LAYER_TYPES)):
        raise TypeError(f"cannot put (IA)^3 on {name!r}: its parent {type(parent).__name__} reads the weight "
                        "directly instead of calling the module, so the vector would be silently ignored")
    if not isinstance(module, nn.Linear):
        raise TypeError(f"module {name!r} matched the (IA)^3 targets but is a {type(module).__name__}; "
                        "(IA)^3 here supports nn.Linear")


@applies
def apply(model: nn.Module, cfg: IA3Config) -> list[str]:
    """Wrap every module of `model` that `cfg.targets` matches in an `IA3Linear`, in place.

    Every other parameter is frozen; only the `ia3_l` vectors train (and `cfg.modules_to_save`, or a
    head the model declares). Nothing is changed unless every match can be wrapped.

    Returns:
        The dotted names of the wrapped modules, in model order.

    Raises:
        TypeError: `cfg` is not an IA3Config; a matched module is not an nn.Linear, or its parent
            reads its weight directly (nn.MultiheadAttention, a LoRA layer).
        ValueError: nothing matched (the message lists module names that exist), or a matched
            module already has (IA)^3.
    """
    if not isinstance(cfg, IA3Config):
        raise TypeError(f"apply expects an ia3.IA3Config, got {type(cfg).__name__}")
    found = find_targets(model, cfg.targets, cfg.exclude)
    if cfg.targets == ALL_LINEAR:  # quietly leave out linears a parent reads directly
        found = [(n, m) for n, m in found if not isinstance(get_parent(model, n)[0], nn.MultiheadAttention)]
    if not found:
        raise ValueError(f"(IA)^3 targets {cfg.targets!r} (exclude={cfg.exclude!r}) matched no module of "
                         f"{type(model).__name__}; linear modules that exist: {describe_candidates(model, (nn.Linear,))}")
    for name, module in found:
        _check_target(model, name, module)
    heads = output_heads(model) if cfg.feedforward == ALL_LINEAR else set()
    feedforward = [matches(name, module, cfg.feedforward, heads) for name, module in found]
    model.requires_grad_(False)
    for (name, module), ff in zip(found, feedforward):
        layer = IA3Linear(module, ff, cfg.init_ones)
        replace_module(model, name, layer)
        guard_fused_fast_paths(model, name, layer)
    return [name for name, _ in found]


def _require_ia3(model: nn.Module, what: str) -> list[tuple[str, IA3Linear]]:
    layers = list(ia3_layers(model))
    if not layers:
        raise ValueError(f"{what}: {type(model).__name__} has no (IA)^3 layers; call ia3.apply first")
    return layers


def merge(model: nn.Module) -> nn.Module:
    """Fold every vector into its base weight (and bias, for output scaling, as PEFT). Safe twice.

    Returns:
        model.

    Raises:
        ValueError: no (IA)^3 layers, a vector has a zero entry, or a base weight is shared with another
            module (a tied lm_head / embedding) (named; nothing is merged then).
    """
    layers = _require_ia3(model, "merge")
    refuse_shared_merge(model, [(n, layer) for n, layer in layers if not layer.merged], "ia3.merge")
    zeros = [name for name, layer in layers if not layer.merged and bool((layer.ia3_l == 0).any())]
    if zeros:
        raise ValueError(f"merge: ia3_l of {zeros[:5]} has zero entries, so unmerge could not undo it; "
                         "use merge_and_unload for a one-way merge")
    for _, layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge` by dividing the vectors out (exact up to float rounding). Safe to call twice.

    Returns: model.  Raises: ValueError: the model has no (IA)^3 layers.
    """
    for _, layer in _require_ia3(model, "unmerge"):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge (one way: zero entries are allowed), then put the plain nn.Linear modules back; they stay
    frozen, as `apply` left them.

    Returns: model.  Raises: ValueError: the model has no (IA)^3 layers, or a base weight is shared (tied)
    with another module.
    """
    layers = _require_ia3(model, "merge_and_unload")
    refuse_shared_merge(model, [(n, layer) for n, layer in layers if not layer.merged], "ia3.merge_and_unload")
    for name, layer in layers:
        if not layer.merged:
            layer._rescale(torch.mul)
        replace_module(model, name, layer.base)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside the block every (IA)^3 layer computes exactly its base layer (bit for bit).

    Raises:
        RuntimeError: a layer is merged (its base weight holds the vector); call `unmerge` first.
    """
    layers = _require_ia3(model, "disabled")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise RuntimeError(f"disabled(): (IA)^3 is merged into {merged[:5]}; call ia3.unmerge(model) first "
                           "(a merged base weight cannot give the base model bit for bit)")
    with layers_disabled(layer for _, layer in layers):
        yield model


def _parameters_by_key(model: nn.Module) -> dict[str, nn.Parameter]:
    return {f"{PEFT_PREFIX}{name}.ia3_l": layer.ia3_l for name, layer in ia3_layers(model)}


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Returns: the vectors only, keyed `base_model.model.<module path>.ia3_l` (PEFT's), detached, not
    copied ({} for a model without (IA)^3)."""
    return {k: v.detach() for k, v in _parameters_by_key(model).items()}


def load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], strict: bool = True) -> tuple[list[str], list[str]]:
    """Copy vectors from `sd` (PEFT key names; the `base_model.model.` prefix is optional).

    Returns:
        (missing, unexpected) key lists (both empty under strict=True).

    Raises:
        ValueError: the model has no (IA)^3; a key is mis-shaped; with strict, a key is missing or
            unexpected. Each message names the keys. Nothing is copied when it raises.
    """
    _require_ia3(model, "load_state_dict")
    params = _parameters_by_key(model)
    given = {k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k: v for k, v in sd.items()}
    return copy_state(params, given, strict, "the (IA)^3 state dict")


def _spec_for_json(spec: TargetSpec, field: str):
    if callable(spec):
        raise ValueError(f"peft_config_dict: {field} is a callable, which adapter_config.json cannot hold; "
                         "use names or a regex, or pass the model to write its exact module paths")
    return spec if spec is None or isinstance(spec, str) else list(spec)


def _feedforward_paths(targets: list[str], feedforward: list[str]):
    """PEFT tests list-form feedforward names with a plain `key.endswith(entry)`; when that would also
    catch a non-feedforward path (say "xa.b" for "a.b"), write an exact regex instead."""
    others = [t for t in targets if t not in feedforward]
    if any(t.endswith(f) for t in others for f in feedforward):
        return "(?:" + "|".join(re.escape(f) for f in feedforward) + ")"
    return feedforward


def peft_config_dict(model_or_cfg: nn.Module | IA3Config) -> dict:
    """The adapter_config.json dict in PEFT's IA3 format.

    Args:
        model_or_cfg: a model with (IA)^3 (writes the exact module paths it holds) or an IA3Config
            (writes its specs as given).

    Returns:
        A JSON-able dict with `peft_type` "IA3", `target_modules`, `feedforward_modules`,
        `exclude_modules`, `fan_in_fan_out`, `init_ia3_weights`, `modules_to_save`, `task_type`, ...

    Raises:
        ValueError: the model has no (IA)^3, or a spec is a callable.
        TypeError: the argument is neither a module nor an IA3Config.
    """
    if isinstance(model_or_cfg, IA3Config):
        cfg = model_or_cfg
        targets, exclude = _spec_for_json(cfg.targets, "targets"), _spec_for_json(cfg.exclude, "exclude")
        feedforward = _spec_for_json(cfg.feedforward, "feedforward")
        init, saved = cfg.init_ones, cfg.modules_to_save
    elif isinstance(model_or_cfg, nn.Module):
        layers = _require_ia3(model_or_cfg, "peft_config_dict")
        targets, exclude, init, saved = [n for n, _ in layers], None, True, None  # save_adapter writes the model's
        feedforward = _feedforward_paths(targets, [n for n, layer in layers if layer.feedforward])
    else:
        raise TypeError(f"peft_config_dict expects a model or an ia3.IA3Config, got {type(model_or_cfg).__name__}")
    return {
        "peft_type": PEFT_TYPE, "task_type": None, "target_modules": targets,
        "feedforward_modules": [] if feedforward is None else feedforward,  # PEFT reads None as "look it up"
        "exclude_modules": exclude, "fan_in_fan_out": False, "init_ia3_weights": init,
        "modules_to_save": saved,
        "inference_mode": True, "base_model_name_or_path": None, "revision": None, "auto_mapping": None,
    }


_PEFT_FIELDS = {  # PeftConfig's own fields plus IA3Config's (peft 0.21); anything else is refused
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out",
    "modules_to_save", "init_ia3_weights",
}


def config_from_peft(d: dict, path: str | os.PathLike | None = None) -> IA3Config:
    """The IA3Config for a PEFT adapter_config.json dict (written by PEFT or by `peft_config_dict`).

    `fan_in_fan_out` is accepted either way: the vectors have the same shapes and meaning for a
    transposed (GPT-2 Conv1D) weight, and tinytune's linears are never transposed.

    Args:
        d: the parsed adapter_config.json.
        path: the adapter DIRECTORY it was read from, named in error messages (None: just the file name).

    Raises:
        ValueError: peft_type is not "IA3"; an unknown field; `target_modules` missing (tinytune
            keeps no per-architecture defaults); a field of the wrong type
            (`_check.FieldError`, also a TypeError). Each names the file and the field.
    """
    fields = _check.Fields(d, "adapter_config.json", None if path is None else Path(path) / "adapter_config.json")
    where = f"config_from_peft: {fields.label}"
    if d.get("peft_type") != PEFT_TYPE:
        raise ValueError(f"{where}: peft_type={d.get('peft_type')!r}; expected {PEFT_TYPE!r}")
    unknown = sorted(set(d) - _PEFT_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown IA3 config fields {unknown}; known: {sorted(_PEFT_FIELDS)}")
    if d.get("target_modules") is None:
        raise ValueError(f"{where}: the field 'target_modules' is missing or null; tinytune has no "
                         "per-architecture default, so the adapter must name its modules")
    fields.get("fan_in_fan_out", _check.boolean, none=True, default=None)  # either way (see above), but a bool
    spec = lambda key: fields.get(key, _check.string_or_list, none=True, default=None)  # noqa: E731
    as_spec = lambda v: v if v is None or isinstance(v, str) else sorted(v)  # noqa: E731 (sets from PEFT)
    init = fields.get("init_ia3_weights", _check.boolean, none=True, default=None)
    return IA3Config(targets=as_spec(spec("target_modules")), feedforward=as_spec(spec("feedforward_modules")),
                     exclude=as_spec(spec("exclude_modules")), init_ones=True if init is None else init,
                     modules_to_save=read_field(fields))


def is_applied(model: nn.Module) -> bool:
    """Whether `model` has any (IA)^3 layer."""
    return any(True for _ in ia3_layers(model))


def _check_compatible(model: nn.Module, cfg: IA3Config, where) -> None:
    for name, layer in ia3_layers(model):
        wanted = matches(name, layer.base, cfg.feedforward)
        if layer.feedforward != wanted:
            refuse_mixed("(IA)3", f"{name!r} feedforward={layer.feedforward}", f"feedforward={wanted} for it", where)


def merged_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """{layer path: the plain nn.Linear's state} with every vector folded in (the model is unchanged).

    Raises: ValueError: an unmerged layer's base weight is tied to another module.
    """
    layers = list(ia3_layers(model))
    refuse_shared_merge(model, [(n, layer) for n, layer in layers if not layer.merged], "save_pretrained")
    return {name: layer.merged_state() for name, layer in layers}


METHOD = Method(
    peft_type=PEFT_TYPE, name="(IA)3", config_type=IA3Config, is_applied=is_applied,
    peft_config_dict=peft_config_dict, config_from_peft=config_from_peft, apply=apply, state_dict=state_dict,
    load_state_dict=load_state_dict, check_compatible=_check_compatible, merged_state=merged_state,
)
