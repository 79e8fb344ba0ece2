"""Which module types LoRA can wrap, and with which layer: a plain table users extend by one call.

    tt.lora.register_layer(MyQuantLinear, MyLoRAQuantLinear, linear=True)

A type's entry also serves its subclasses, unless a more specific type has its own (looked up along
the class's MRO). `linear=True` makes `"all-linear"` include the type. A layer class may refuse a
particular module through its `cannot_wrap` classmethod (say, an `nn.Linear` subclass with its own
`forward`, which the fused op would bypass), and the module is then skipped like any other type
LoRA cannot adapt. Built-in entries: nn.Linear, nn.Embedding (see `layers`), and the layer types
registered by the modules that define them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from .base import LoRALayer
from .config import LoraSpec

LayerFactory = Callable[[nn.Module, LoraSpec, str], LoRALayer]


@dataclass(frozen=True)
class LayerEntry:
    """How one module type takes LoRA: `make(base, spec, adapter_name)` builds the wrapping layer,
    `linear` says whether "all-linear" targets the type, `layer` is the class (for `cannot_wrap`)."""

    make: LayerFactory
    linear: bool
    layer: type | None


_TABLE: dict[type, LayerEntry] = {}
_BY_NAME: dict[str, LayerEntry] = {}  # "module.QualName" -> entry, for types of packages tinytune never imports


def register_layer(module_type: type, layer: type | LayerFactory, *, linear: bool = False) -> None:
    """Tell LoRA how to wrap modules of `module_type` (and of its subclasses without an entry of their own).

    Args:
        module_type: an `nn.Module` subclass, e.g. a user's quantised linear.
        layer: a `tt.lora.LoRALayer` subclass (built with its `from_spec(base, spec, adapter_name)`), or
            any callable `(base, spec, adapter_name) -> LoRALayer`.
        linear: whether `targets="all-linear"` includes modules of this type.

    Raises:
        TypeError: `module_type` is not an nn.Module subclass, or `layer` is neither a LoRALayer subclass
            nor a callable.

    Registering a type again replaces its entry (so a user may override a built-in one).
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_layer: module_type must be an nn.Module subclass, got {module_type!r}")
    _TABLE[module_type] = _entry(layer, linear, "register_layer")


def _entry(layer, linear: bool, where: str) -> LayerEntry:
    if isinstance(layer, type):
        if not issubclass(layer, LoRALayer):
            raise TypeError(f"{where}: layer {layer.__name__} must subclass tt.lora.LoRALayer "
                            "(or be a callable (base, spec, adapter_name) -> LoRALayer)")
        return LayerEntry(layer.from_spec, bool(linear), layer)
    if callable(layer):
        return LayerEntry(layer, bool(linear), None)
    raise TypeError(f"{where}: layer must be a LoRALayer subclass or a callable, got {layer!r}")


def register_layer_by_name(qualified_name: str, layer: type | LayerFactory, *, linear: bool = False) -> None:
    """`register_layer` for a type named by its module and qualified name ("transformers.pytorch_utils.Conv1D"),
    so that tinytune never imports its package: the entry applies once a module of that type is met.

    Raises:
        TypeError: `layer` as for `register_layer`, or the name is not a dotted string.
    """
    if not isinstance(qualified_name, str) or "." not in qualified_name:
        raise TypeError(f"register_layer_by_name: expected 'package.module.ClassName', got {qualified_name!r}")
    _BY_NAME[qualified_name] = _entry(layer, linear, "register_layer_by_name")


def layer_entry(module: nn.Module) -> LayerEntry | None:
    """The entry for `module`'s type (the most specific registered base class, by type or by name), or None."""
    for cls in type(module).__mro__:
        entry = _TABLE.get(cls) or _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if entry is not None:
            return entry
    return None


def registered_types() -> list[type | str]:
    """The module types LoRA can wrap, in registration order (then those registered by name, as names)."""
    return [*_TABLE, *_BY_NAME]


def is_linear_kind(module: nn.Module) -> bool:
    """Whether "all-linear" includes `module` (a registered type with `linear=True`)."""
    entry = layer_entry(module)
    return entry is not None and entry.linear


def cannot_wrap(module: nn.Module) -> str | None:
    """Why LoRA cannot wrap `module` (no entry for its type, or its layer class refuses it), or None."""
    entry = layer_entry(module)
    if entry is None:
        return f"LoRA has no layer for {type(module).__name__} (register one with tt.lora.register_layer)"
    return entry.layer.cannot_wrap(module) if entry.layer is not None else None
