"""Putting LoRA on a model: match the targets, check every match, then wrap them all (or none).

    cfg = tt.lora.LoraConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"])
    names = tt.lora.apply(model, cfg)      # swaps modules in place, freezes everything else

Which module types can take LoRA, and with which layer, is the table in `registry`. A list, regex or
callable that also matches modules LoRA cannot adapt (an activation, a norm, a container) skips them
with a warning naming them, as PEFT does, and is an error only when nothing adaptable matched.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn

from .._targets import ALL_LINEAR, find_targets, get_parent, guard_fused_fast_paths, output_heads, replace_module
from .._rollback import restore, snapshot
from ..modules_to_save import marked as saved_modules
from .base import LORA_LAYER_TYPES, LoRALayer
from .config import DEFAULT_ADAPTER, LoraConfig, check_adapter_name
from .multi import active_adapter, list_adapters
from .registry import cannot_wrap, is_linear_kind, layer_entry
from .shared_shrink import link_groups

__all__ = ["apply", "add_adapter", "adaptable_modules"]


def _already_adapted(model: nn.Module, name: str, module: nn.Module) -> str | None:
    """The LoRA layer's name when `module` is one or is the `.base` of one, else None."""
    if isinstance(module, LORA_LAYER_TYPES):
        return name
    parent, _ = get_parent(model, name)
    return name.rpartition(".")[0] if isinstance(parent, LORA_LAYER_TYPES) else None


def _blocked(model: nn.Module, name: str, module: nn.Module) -> str | None:
    """Why LoRA cannot adapt the module called `name` (None: it can)."""
    parent, _ = get_parent(model, name)
    if isinstance(parent, nn.MultiheadAttention):
        return _mha_child_reason(model, name.rpartition(".")[0], parent)
    return cannot_wrap(module)


def _mha_child_reason(model: nn.Module, parent_name: str, mha: nn.MultiheadAttention) -> str:
    """Why a child of an nn.MultiheadAttention (its out_proj) takes no LoRA of its own: the MHA is the unit."""
    owner = parent_name
    if owner.rpartition(".")[2] == "base" and isinstance(get_parent(model, owner)[0], LORA_LAYER_TYPES):
        owner = owner.rpartition(".")[0]  # the .base of a LoRA layer: name the layer
    why = ("nn.MultiheadAttention reads its projection weights directly (in_proj_weight, out_proj.weight) instead "
           "of calling this module, so an adapter here would be silently ignored; ")
    reason = cannot_wrap(mha)
    if reason is not None:
        return why + f"and LoRA cannot adapt the MultiheadAttention {owner!r} itself: {reason}"
    return why + (f"target the MultiheadAttention {owner!r} itself: LoRA then adapts in_proj and out_proj "
                  "together, as PEFT does")


def _find(model: nn.Module, cfg: LoraConfig, modules: list[tuple[str, nn.Module]] | None = None):
    """find_targets with LoRA's linear kinds (registered types with linear=True, nn.MultiheadAttention among
    them). "all-linear" is resolved here: the output heads are found among the linear layers proper, an
    MHA's out_proj standing for the MHA (which has no in/out_features: taken as the model's first
    linear, it would hide the model's width from `output_heads`, and an MHA is never an output head)."""
    modules = list(model.named_modules()) if modules is None else modules
    if ALL_LINEAR not in (cfg.targets, cfg.exclude):
        return find_targets(model, cfg.targets, cfg.exclude, modules=modules, is_linear=is_linear_kind)
    heads = output_heads(model, modules, lambda m: is_linear_kind(m) and not isinstance(m, nn.MultiheadAttention))

    def resolve(spec):
        return (lambda n, m: is_linear_kind(m) and n not in heads) if spec == ALL_LINEAR else spec
    return find_targets(model, resolve(cfg.targets), resolve(cfg.exclude), modules=modules, is_linear=is_linear_kind)


def adaptable_modules(model: nn.Module) -> list[str]:
    """The names of the modules of `model` LoRA could adapt now (registered types, not adapted yet)."""
    return [n for n, m in model.named_modules()
            if n and _already_adapted(model, n, m) is None and _blocked(model, n, m) is None]


def _describe(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return (shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")) if names else "(none)"


def _select(model: nn.Module, cfg: LoraConfig, found: list[tuple[str, nn.Module]], what: str) -> list[tuple[str, nn.Module]]:
    """The matches LoRA will adapt: the unadaptable ones skipped with a warning (quietly for "all-linear",
    whose rules already say what a linear is), an error when nothing adaptable is left."""
    keep, skipped = [], []
    for name, module in found:
        if isinstance(module, LORA_LAYER_TYPES) and what != "apply":
            keep.append((name, module))  # add_adapter: an adapted layer takes one more adapter
            continue
        owner = _already_adapted(model, name, module)
        if owner is not None and what == "apply":
            raise ValueError(f"module {owner!r} already has LoRA; call merge_and_unload first to apply it again, or "
                             "add another adapter with tt.lora.add_adapter(model, name, cfg)")
        reason = _blocked(model, name, module)
        (skipped if reason else keep).append((name, module, reason) if reason else (name, module))
    if not keep:
        if skipped:
            details = "; ".join(f"{n!r} ({type(m).__name__}): {r}" for n, m, r in skipped[:8])
            raise TypeError(f"{what}: LoRA targets {cfg.targets!r} (exclude={cfg.exclude!r}) matched only modules "
                            f"LoRA cannot adapt: {details}. Modules that would work: {_describe(adaptable_modules(model))}")
        saved = tuple(getattr(cfg, "modules_to_save", None) or ()) + saved_modules(model)
        note = (f" (modules in modules_to_save {sorted(set(saved))} and everything inside them are trained whole "
                "and never targeted)") if saved else ""
        raise ValueError(f"{what}: LoRA targets {cfg.targets!r} (exclude={cfg.exclude!r}) matched no module of "
                         f"{type(model).__name__}{note}; modules LoRA can adapt: {_describe(adaptable_modules(model))}")
    if skipped and cfg.targets != ALL_LINEAR:
        reasons = "; ".join(f"{n!r} ({type(m).__name__}): {r}" for n, m, r in skipped[:4])
        more = f"; ... and {len(skipped) - 4} more" if len(skipped) > 4 else ""
        warnings.warn(f"{what}: LoRA targets {cfg.targets!r} also matched modules LoRA cannot adapt, which were "
                      f"skipped: {_describe([f'{n} ({type(m).__name__})' for n, m, _ in skipped])}. Why: {reasons}{more}",
                      stacklevel=4)  # _select, apply, the modules_to_save wrapper, the caller
    return keep


def _wrap(module: nn.Module, cfg: LoraConfig, adapter_name: str) -> LoRALayer:
    layer = layer_entry(module).make(module, cfg.spec, adapter_name)
    if not isinstance(layer, LoRALayer):  # a user's factory: never swap in something that is not a LoRA layer
        raise TypeError(f"the layer registered for {type(module).__name__} returned a {type(layer).__name__}, not a "
                        "tt.lora.LoRALayer; fix the factory given to tt.lora.register_layer")
    return layer


@contextlib.contextmanager
def _all_or_nothing(model: nn.Module, found: list[tuple[str, nn.Module]], cfg: LoraConfig):
    """Within: layers are built and swapped in; if anything raises, the model is put back as it was
    (modules, flags, and the weights PiSSA may already have rewritten into residuals)."""
    weights = [m.weight for _, m in found if cfg.init == "pissa" and isinstance(getattr(m, "weight", None), torch.Tensor)]
    snap = snapshot(model, weights)
    try:
        yield
    except BaseException:
        restore(snap)
        raise



def _check_pissa(model: nn.Module, found: list[tuple[str, nn.Module]], rank: int) -> None:
    """PiSSA rewrites each adapted linear weight in place: refuse, before anything changes, a rank
    the SVD cannot give and a weight another module also uses (a tied lm_head would change the
    embedding too, and the model would no longer equal the base)."""
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            users.setdefault(id(weight), []).append(name)
    for name, module in found:
        if not isinstance(module, nn.Linear):
            continue  # embeddings keep their weight under PiSSA (PEFT's behaviour)
        if rank > min(module.in_features, module.out_features):
            raise ValueError(f"init='pissa' needs rank <= min(in_features, out_features); {name!r} is "
                             f"{module.in_features} -> {module.out_features}, got rank={rank}")
        others = [n for n in users.get(id(module.weight), []) if n != name]
        if others:
            raise ValueError(f"init='pissa' would rewrite the weight of {name!r}, which is shared with {others}; "
                             "exclude it or untie the weights first")


def _lora_view(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs as target matching sees a model that may have LoRA already: a LoRA
    layer stands for its base at its own path and its `.base` child is left out, so a config
    matches the same modules before and after LoRA was applied."""
    out = []
    for name, module in model.named_modules():
        parent, child = get_parent(model, name) if name else (None, "")
        if child == "base" and isinstance(parent, LORA_LAYER_TYPES):
            continue
        out.append((name, module.base if isinstance(module, LORA_LAYER_TYPES) else module))
    return out


def apply(model: nn.Module, cfg: LoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> list[str]:
    """Put LoRA on every module of `model` that `cfg.targets` matches, in place.

    Every parameter that is not an adapter parameter is frozen (base biases of adapted layers stay
    trainable with `cfg.train_bias`). Matched modules LoRA cannot adapt (no registered layer for their
    type, or a parent that reads their weight directly) are skipped with a warning naming them; nothing
    is changed unless every other match can be adapted. With `init="pissa"` the adapted linear weights
    are replaced by their SVD residuals (one float32 SVD per layer), so `disabled()` then gives the
    residual model, not the original.

    Args:
        model: any module tree; changed in place.
        cfg: what to adapt and how.
        adapter_name: the name of the adapter created (the active one); add more with `add_adapter`.

    Returns:
        The dotted names of the replaced modules, in model order.

    Raises:
        ValueError: nothing matched (the message lists module names LoRA can adapt), a matched
            module already has LoRA, a bad adapter name, or (PiSSA) a rank above a layer's
            smaller dimension or a weight shared with another module.
        TypeError: `cfg` is not a LoraConfig, or every match is a module LoRA cannot adapt (each is
            named with its type and the reason).
    """
    if not isinstance(cfg, LoraConfig):
        raise TypeError(f"apply expects a tt.lora.LoraConfig, got {type(cfg).__name__}")
    check_adapter_name(adapter_name)
    found = _select(model, cfg, _find(model, cfg), "apply")
    if cfg.init == "pissa":
        _check_pissa(model, found, cfg.rank)
    with _all_or_nothing(model, found, cfg):
        layers = [(name, _wrap(module, cfg, adapter_name)) for name, module in found]
        model.requires_grad_(False)
        for (name, module), (_, layer) in zip(found, layers):
            if cfg.train_bias and getattr(module, "bias", None) is not None:
                module.bias.requires_grad_(True)
            replace_module(model, name, layer)
            guard_fused_fast_paths(model, name, layer)
    link_groups(model)  # siblings reading one input share one shrink pass (shared_shrink; "auto")
    return [name for name, _ in found]


def _check_add(model: nn.Module, name: str, cfg: LoraConfig, found: list[tuple[str, nn.Module]]) -> None:
    """Everything `add_adapter` refuses, before anything changes."""
    if cfg.train_bias:
        raise ValueError(f"add_adapter({name!r}): train_bias=True is not supported for an added adapter: a layer's bias "
                         "is shared by all its adapters (train it with the first adapter, tt.lora.apply)")
    for n, m in found:
        if not isinstance(m, LORA_LAYER_TYPES) or not m._pissa_rewrites_base:
            continue
        held = list(m.adapters)
        pissa = [a for a in held if m.adapters[a].init == "pissa"]
        if held and (cfg.init == "pissa" or pissa):
            raise ValueError(f"add_adapter({name!r}): {n!r} holds adapters {held}; PiSSA (init='pissa', here "
                             f"{pissa or [name]}) rewrites the shared base weight, so it cannot sit beside other "
                             "adapters on one layer: target other modules, or merge_and_unload first")
    if cfg.init == "pissa":
        _check_pissa(model, [(n, m) for n, m in found if not isinstance(m, LORA_LAYER_TYPES)], cfg.rank)


def add_adapter(model: nn.Module, name: str, cfg: LoraConfig) -> list[str]:
    """Add a further LoRA adapter called `name` to `model`, beside the adapters it has.

    The new adapter follows its own `cfg` (PEFT's behaviour): its targets are matched as if the
    model had no LoRA; modules already adapted get the adapter beside their others, plain ones are
    wrapped. It is added INACTIVE and frozen: the forward keeps using the active adapter until
    `set_adapter(model, name)` (layers that lack the active adapter compute their base). On a model
    without LoRA this is `apply(model, cfg, adapter_name=name)`, and the adapter is active.

    Args:
        model: the model, changed in place.
        name: the new adapter's name: a non-empty string without "." ("default" is `apply`'s).
        cfg: rank, alpha, dropout, targets... of the new adapter (`train_bias` must be False).

    Returns:
        The dotted names of the modules that received the adapter, in model order.

    Raises:
        ValueError: `name` is taken (the message names it and lists the adapters) or invalid;
            nothing matched; `train_bias=True`; PiSSA beside another adapter on one layer; the
            PiSSA rank or shared-weight checks of `apply`.
        TypeError: `cfg` is not a LoraConfig, or only modules LoRA cannot adapt matched (as `apply`).
    """
    if not isinstance(cfg, LoraConfig):
        raise TypeError(f"add_adapter expects a tt.lora.LoraConfig, got {type(cfg).__name__}")
    check_adapter_name(name)
    existing = list_adapters(model)
    if not existing:
        return apply(model, cfg, adapter_name=name)
    if name in existing:
        raise ValueError(f"add_adapter: the model already has an adapter named {name!r} (adapters: {existing}); "
                         "pick another name or delete_adapter it first")
    found = _find(model, cfg, _lora_view(model))
    found = [(n, model.get_submodule(n)) for n, _ in found]  # back from the view to the real modules
    found = _select(model, cfg, found, f"add_adapter({name!r})")
    _check_add(model, name, cfg, found)
    active = active_adapter(model)
    with _all_or_nothing(model, found, cfg):
        new = {path: _wrap(module, cfg, name) for path, module in found if not isinstance(module, LORA_LAYER_TYPES)}
        for path, module in found:
            if path not in new:
                module.add_adapter(name, cfg.spec)
                continue
            new[path].set_adapter(active)  # computes its base until `name` is set active; `name` frozen
            replace_module(model, path, new[path])
            guard_fused_fast_paths(model, path, new[path])
    link_groups(model)  # new layers join their siblings' groups, in the mode those had
    return [n for n, _ in found]
