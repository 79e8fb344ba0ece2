"""Bottleneck adapters on any `nn.Module`: `A(h) = up(dropout(act(down(h))))`, (..., d) -> (..., b) -> (..., d),
added to chosen sublayers f. Serial placements: `y = f(x) + s A(f(x))`, "houlsby" (Houlsby et al., 2019)
after attention and FFN, "pfeiffer" (Pfeiffer et al., 2020) after the FFN; "parallel" (He et al., 2022):
`y = f(x) + s A(x)`. `up` starts at zero, so the adapted model equals its base at init.

Adapters are NOT mergeable into base weights (the activation makes them nonlinear): there is no
`merge`; `disabled()` gives the base. Each adapter has `2 d b + b + d` parameters. Weights are keyed
`base_model.model.<module path>.adapter.{down,up}.{weight,bias}` with `peft_type: "BOTTLENECK_ADAPTER"`
(PEFT itself has no bottleneck adapters). Modules are found by name only (no tinytune.models import).

This module finds the sublayers and applies, disables, saves and loads adapters; the config
(`AdapterConfig`) is in `adapter_config`, the modules (`BottleneckAdapter`, `AdapterLayer`) in `adapter_layers`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from .. import _check
from ._method import Method, refuse_mixed
from .modules_to_save import applies, read_field
from ._state import copy_state
from ._targets import find_targets, get_parent, guard_fused_fast_paths, layers_disabled, replace_module
from .adapter_config import AdapterConfig
from .adapter_layers import ACTIVATIONS, PLACEMENTS, AdapterLayer, BottleneckAdapter

PEFT_PREFIX = "base_model.model."
PEFT_TYPE = "BOTTLENECK_ADAPTER"
# Which sublayers `targets=None` picks, by Hugging Face Llama names (tinytune's decoder uses them too).
DEFAULT_TARGETS = {"houlsby": ["self_attn", "mlp"], "pfeiffer": ["mlp"], "parallel": ["mlp"]}

__all__ = [
    "AdapterConfig", "BottleneckAdapter", "AdapterLayer", "apply", "disabled", "state_dict",
    "load_state_dict", "adapter_layers", "applied_config", "peft_config_dict", "config_from_peft",
    "parameter_count", "PLACEMENTS", "ACTIVATIONS", "DEFAULT_TARGETS", "PEFT_TYPE",
]


def parameter_count(hidden: int, bottleneck: int) -> int:
    """Parameters of one adapter of hidden size d = `hidden` and bottleneck b = `bottleneck`.

    Returns:
        down (b x d weights + b biases) plus up (d x b + d): `2 d b + b + d`.
    """
    return 2 * hidden * bottleneck + bottleneck + hidden


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Yields the (name, layer) pairs of every `AdapterLayer` in `model`, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def _require_adapters(model: nn.Module, what: str) -> list[tuple[str, AdapterLayer]]:
    layers = list(adapter_layers(model))
    if not layers:
        raise ValueError(f"{what}: {type(model).__name__} has no bottleneck adapters; call adapter.apply first")
    return layers


def _io_sizes(module: nn.Module) -> tuple[int | None, int | None]:
    """(in_features of the first nn.Linear, out_features of the last), in registration order."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return (linears[0].in_features, linears[-1].out_features) if linears else (None, None)


def _hidden_size(name: str, module: nn.Module, cfg: AdapterConfig) -> int:
    """d for the adapter on `module`: its output size (serial) or its input = output size (parallel)."""
    first_in, last_out = _io_sizes(module)
    kind = type(module).__name__
    if cfg.placement == "parallel" and first_in is not None and first_in != last_out:
        raise ValueError(f"placement='parallel' adds an adapter of {name!r}'s input to its output, so they must "
                         f"have one size, but {name!r} ({kind}) maps {first_in} -> {last_out} features "
                         "(its first and last nn.Linear); use a serial placement or other targets")
    if cfg.hidden_size is None:
        if last_out is None:
            raise ValueError(f"cannot infer the hidden size of {name!r} ({kind}): it holds no nn.Linear; "
                             "pass AdapterConfig(hidden_size=...)")
        return last_out
    if last_out is not None and last_out != cfg.hidden_size:
        raise ValueError(f"AdapterConfig.hidden_size={cfg.hidden_size} does not match {name!r} ({kind}), "
                         f"which outputs {last_out} features (its last nn.Linear)")
    return cfg.hidden_size


def _check_target(model: nn.Module, name: str, module: nn.Module, found_names: list[str]) -> None:
    """Raise if `module` cannot take an adapter (container, nested match, read directly by its parent)."""
    if type(module).forward is nn.Module.forward:
        raise TypeError(f"module {name!r} matched the adapter targets but is a {type(module).__name__}, which "
                        "has no forward of its own; target the modules it holds")
    inner = [n for n in found_names if n.startswith(name + ".")]
    if inner:
        raise ValueError(f"adapter targets matched both {name!r} and modules inside it ({inner[:3]}); "
                         "narrow the targets so that no matched module contains another")
    parent, _ = get_parent(model, name)
    if isinstance(parent, nn.MultiheadAttention):
        raise TypeError(f"cannot put an adapter on {name!r}: nn.MultiheadAttention reads its weights directly "
                        "instead of calling it, so the adapter would be silently skipped; target the "
                        "nn.MultiheadAttention itself")


def _describe_names(model: nn.Module, limit: int = 16) -> str:
    """Distinct last parts of the model's module names (what list targets match), for errors."""
    parts = list(dict.fromkeys(n.rpartition(".")[2] for n, _ in model.named_modules() if n))
    parts = [p for p in parts if not p.isdigit()] or parts
    more = f" ... and {len(parts) - limit} more" if len(parts) > limit else ""
    return (", ".join(map(repr, parts[:limit])) + more) if parts else "(none)"



@applies
def apply(model: nn.Module, cfg: AdapterConfig) -> list[str]:
    """Wrap every module of `model` that the config picks in an `AdapterLayer`, in place.

    The hidden size of each wrapped module is `cfg.hidden_size`, or inferred: the out_features of
    its last nn.Linear (registration order); "parallel" also needs its first nn.Linear's in_features
    to be the same. Every parameter that is not an adapter parameter is frozen (but `cfg.modules_to_save`
    and a head the model declares, trained whole). Nothing is changed
    unless every match can be wrapped. Call it once per model.

    Returns:
        The dotted names of the wrapped modules, in model order.

    Raises:
        TypeError: `cfg` is not an AdapterConfig; a matched module has no forward (ModuleList,
            ModuleDict) or is read directly by an nn.MultiheadAttention parent.
        ValueError: nothing matched (the message lists module names that exist); the model
            already has adapters; matches nest; a hidden size cannot be inferred or mismatches;
            the bottleneck conflicts with the reduction factor.
    """
    if not isinstance(cfg, AdapterConfig):
        raise TypeError(f"apply expects an AdapterConfig, got {type(cfg).__name__}")
    existing = [n for n, _ in adapter_layers(model)]
    if existing:
        raise ValueError(f"{type(model).__name__} already has bottleneck adapters on {existing[:5]}; apply "
                         "adapters once per model (one config covers every placement)")
    targets = DEFAULT_TARGETS[cfg.placement] if cfg.targets is None else cfg.targets
    found = find_targets(model, targets, cfg.exclude)
    if not found:
        raise ValueError(f"adapter targets {targets!r} (placement={cfg.placement!r}, exclude={cfg.exclude!r}) "
                         f"matched no module of {type(model).__name__}; module names that exist (last parts): "
                         f"{_describe_names(model)}")
    names = [n for n, _ in found]
    plans = []
    for name, module in found:  # validate everything first
        _check_target(model, name, module, names)
        hidden = _hidden_size(name, module, cfg)
        plans.append((name, module, hidden, cfg.bottleneck_for(hidden, repr(name))))
    model.requires_grad_(False)
    for name, module, hidden, bottleneck in plans:
        layer = AdapterLayer(module, hidden, bottleneck, cfg.placement, cfg.activation, cfg.scaling, cfg.dropout)
        layer.config = cfg
        replace_module(model, name, layer)
        guard_fused_fast_paths(model, name, layer)
    return names


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside the block every adapter is skipped: the model computes exactly its base (bit for bit).

    Raises:
        ValueError: the model has no adapters.
    """
    layers = _require_adapters(model, "disabled")
    with layers_disabled(layer for _, layer in layers):
        yield model


def _parameters_by_key(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{PEFT_PREFIX}{name}.adapter.{pname}": p
            for name, layer in adapter_layers(model) for pname, p in layer.adapter.named_parameters()}


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, detached (not copied), under
    `base_model.model.<wrapped module path>.adapter.{down,up}.{weight,bias}`. Empty without adapters."""
    return {k: v.detach() for k, v in _parameters_by_key(model).items()}


def load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], strict: bool = True) -> tuple[list[str], list[str]]:
    """Copy adapter weights from `sd` (keys as `state_dict` writes them; `base_model.model.` optional).

    Returns:
        (missing, unexpected) key lists (both empty under strict=True).

    Raises:
        ValueError: the model has no adapters; a key is mis-shaped; with strict, a key is missing
            or unexpected. Each message names the keys. Nothing is copied when it raises.
    """
    _require_adapters(model, "load_state_dict")
    params = _parameters_by_key(model)
    given = {k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k: v for k, v in sd.items()}
    return copy_state(params, given, strict, "the adapter state dict")


def applied_config(model: nn.Module) -> AdapterConfig:
    """The config `apply` used on `model`, with `targets` the exact wrapped names (exclude dropped).

    Raises:
        ValueError: no adapters, or layers built by hand (not by `apply`), which carry no config.
    """
    layers = _require_adapters(model, "applied_config")
    configs = [layer.config for _, layer in layers]
    if any(c is None or c is not configs[0] for c in configs):
        raise ValueError("applied_config: the adapters were not all made by one adapter.apply call")
    return dataclasses.replace(configs[0], targets=[n for n, _ in layers], exclude=None)


def peft_config_dict(cfg: AdapterConfig, target_modules: list[str] | None = None) -> dict:
    """The JSON-ready `adapter_config.json` content for `cfg` (PEFT's layout, our own peft_type).

    Args:
        cfg: the config (e.g. `applied_config(model)`, whose targets are exact names).
        target_modules: names to write instead of `cfg.targets` (then `exclude` is not written).

    Raises:
        ValueError: the targets or exclude to write are a callable (JSON cannot hold one).
    """
    targets = cfg.targets if target_modules is None else list(target_modules)
    exclude = cfg.exclude if target_modules is None else None
    for field, spec in (("targets", targets), ("exclude", exclude)):
        if callable(spec):
            raise ValueError(f"peft_config_dict: AdapterConfig.{field} is a callable, which JSON cannot hold; "
                             "pass target_modules= (e.g. the names apply returned)")
    as_json = lambda spec: spec if spec is None or isinstance(spec, str) else list(spec)  # noqa: E731
    return {
        "peft_type": PEFT_TYPE, "task_type": None, "inference_mode": True, "base_model_name_or_path": None,
        "target_modules": as_json(targets), "exclude_modules": as_json(exclude),
        "bottleneck_size": None if cfg.bottleneck is None else int(cfg.bottleneck),
        "reduction_factor": cfg.reduction_factor, "placement": cfg.placement, "activation": cfg.activation,
        "scaling": cfg.scaling, "dropout": cfg.dropout, "hidden_size": cfg.hidden_size,
        "modules_to_save": cfg.modules_to_save,  # save_adapter writes the model's (modules_to_save.saved_paths)
    }


_PEFT_FIELDS = {  # PeftConfig's own fields plus what `peft_config_dict` writes; anything else is refused
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "target_modules", "exclude_modules", "bottleneck_size", "reduction_factor", "placement", "activation", "scaling",
    "dropout", "hidden_size", "modules_to_save",
}


def config_from_peft(config: dict, path: str | os.PathLike | None = None) -> AdapterConfig:
    """The `AdapterConfig` that `peft_config_dict` wrote (absent or null optional fields take the defaults).

    Args:
        config: the parsed adapter_config.json.
        path: the adapter DIRECTORY it was read from, named in error messages (None: just the file name).

    Raises:
        ValueError: another peft_type; an unknown field; neither bottleneck_size nor reduction_factor; a
            field of the wrong type or out of range (`_check.FieldError`, also a TypeError). Each names
            the file and the field.
    """
    fields = _check.Fields(config, "adapter_config.json",
                           None if path is None else Path(path) / "adapter_config.json")
    where = f"config_from_peft: {fields.label}"
    if config.get("peft_type") != PEFT_TYPE:
        raise ValueError(f"{where}: peft_type={config.get('peft_type')!r}; expected {PEFT_TYPE!r}")
    unknown = sorted(set(config) - _PEFT_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown {PEFT_TYPE} config fields {unknown}; known: {sorted(_PEFT_FIELDS)}")
    if config.get("bottleneck_size") is None and config.get("reduction_factor") is None:
        raise ValueError(f"{where}: the config gives neither bottleneck_size nor reduction_factor")
    read = {  # file field -> (AdapterConfig field, checker, arguments)
        "bottleneck_size": ("bottleneck", _check.integer, (1,), {}),
        "reduction_factor": ("reduction_factor", _check.integer, (1,), {}),
        "hidden_size": ("hidden_size", _check.integer, (1,), {}),
        "placement": ("placement", _check.string, (PLACEMENTS,), {}),
        "activation": ("activation", _check.string, (tuple(ACTIVATIONS),), {}),
        "scaling": ("scaling", _check.number, (0,), {"low_open": True}),
        "dropout": ("dropout", _check.number, (0, 1), {"high_open": True}),
        "target_modules": ("targets", _check.string_or_list, (), {}),
        "exclude_modules": ("exclude", _check.string_or_list, (), {}),
    }
    values = {ours: fields.get(key, check, *args, none=True, default=None, **kw)
              for key, (ours, check, args, kw) in read.items()}
    return AdapterConfig(**{ours: value for ours, value in values.items() if value is not None},
                         modules_to_save=read_field(fields))


def is_applied(model: nn.Module) -> bool:
    """Whether `model` has any bottleneck adapter."""
    return any(True for _ in adapter_layers(model))


def _applied_peft_config(model: nn.Module) -> dict:
    return peft_config_dict(applied_config(model))


def _check_sizes(cfg: AdapterConfig, tensors: dict[str, torch.Tensor], where) -> None:
    if cfg.bottleneck is None:
        return
    for key, value in tensors.items():
        if key.endswith("adapter.down.weight") and (value.dim() != 2 or value.shape[0] != cfg.bottleneck):
            raise ValueError(f"load_adapter: {where / 'adapter_model.safetensors'} tensor {key!r} has shape "
                             f"{tuple(value.shape)}, but {where / 'adapter_config.json'} says "
                             f"bottleneck_size={cfg.bottleneck}")


def _check_compatible(model: nn.Module, cfg: AdapterConfig, where) -> None:
    have = applied_config(model)
    for field in ("bottleneck", "reduction_factor", "placement", "activation", "scaling", "dropout"):
        if getattr(have, field) != getattr(cfg, field):
            refuse_mixed("bottleneck adapters", f"{field}={getattr(have, field)!r}", f"{field}={getattr(cfg, field)!r}",
                         where)


METHOD = Method(
    peft_type=PEFT_TYPE, name="bottleneck adapters", config_type=AdapterConfig, is_applied=is_applied,
    peft_config_dict=_applied_peft_config, config_from_peft=config_from_peft, apply=apply, state_dict=state_dict,
    load_state_dict=load_state_dict, check_sizes=_check_sizes, check_compatible=_check_compatible,
)
