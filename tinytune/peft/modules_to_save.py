"""Trained modules that are not adapters (PEFT's `modules_to_save`): a classifier's head, or any module
trained whole beside a PEFT method, saved with the adapter and loaded back with it.

    cfg = tt.lora.LoraConfig(targets="all-linear", modules_to_save=["norm"])
    tt.lora.apply(model, cfg)        # LoRA on the linears, `model.norm` trained whole

Every method's `apply` goes through `applies` (one wrapper, not six copies): it resolves the names
before anything changes (a name that matches nothing is an error listing the module names), records
the module paths on the root model as `model._tinytune_modules_to_save` (a tuple, the one marker),
lets the method apply (which freezes the model; target matching leaves marked modules and everything
inside them out, as PEFT does), and then makes the marked modules fully trainable.

A model may declare its own (DESIGN principle 13, explicit capabilities): the classification heads of
`tinytune.models` have `peft_modules_to_save = ("score",)` (or `("classifier",)`), so applying any
method to them keeps the head trainable and saves it, without the user naming it.

Nothing is wrapped: PEFT holds a copy in a `ModulesToSaveWrapper` (`score.modules_to_save.default`), but
its files hold the plain keys, `base_model.model.score.weight` (`base_model.score.weight` for prompt
learning methods, whose PeftModel has no inner `model`), which is what `state_dict` writes here.
"""
from __future__ import annotations

import functools
from typing import Iterable

import torch
import torch.nn as nn

from .. import _check

ATTR = "_tinytune_modules_to_save"  # on the root model: a tuple of module paths, in model order
FIELD = "modules_to_save"  # PEFT's adapter_config.json field and every method config's attribute


def check_names(value, where: str) -> list[str] | None:
    """A config's `modules_to_save`: None, or a list (tuple) of non-empty module names.

    Raises: ValueError (`_check.FieldError`, also a TypeError) naming `where` and the value.
    """
    if value is None:
        return None
    if isinstance(value, str):  # a bare string would be read as its letters
        raise _check.FieldError(f"{where} must be None or a list of module names, got {value!r} (str): "
                                f"write [{value!r}]")
    return _check.string_list(value, where, allow_empty=True, name=FIELD)


def read_field(fields: _check.Fields) -> list[str] | None:
    """The `modules_to_save` of an adapter_config.json (None when absent or null; [] read as None)."""
    return fields.get(FIELD, _check.string_list, True, none=True, default=None) or None


def _matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)  # PEFT's rule: the name or a dotted suffix


def inside(name: str, paths: Iterable[str]) -> bool:
    """Whether the module `name` is one of `paths` or lies inside one."""
    return any(name == p or name.startswith(p + ".") for p in paths)


def marked(model: nn.Module) -> tuple[str, ...]:
    """The module paths recorded on `model` as modules to save (empty when none)."""
    return tuple(model.__dict__.get(ATTR, ()))


def declared(model: nn.Module) -> list[str]:
    """The module names `model` itself declares through `peft_modules_to_save` (its heads).

    Raises: TypeError: the attribute is not a list or tuple of non-empty strings.
    """
    names = getattr(model, "peft_modules_to_save", ())
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"{type(model).__name__}.peft_modules_to_save must be a tuple of module names, got {names!r}")
    return list(names)


def _module_names(model: nn.Module, limit: int = 16) -> str:
    names = [n for n, m in model.named_modules() if n and next(m.parameters(), None) is not None]
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "") if names else "(none)"


def resolve(model: nn.Module, names: Iterable[str], what: str, strict: bool = True) -> list[str]:
    """The paths of the modules `names` match (equal, or a dotted suffix), in model order, outermost only
    (a module inside another one listed is saved with it).

    Args:
        strict: a name that matches nothing is an error (what `apply` does with a user's config); False
            drops it (what loading does with PEFT's task defaults, ["classifier", "score"], of which a
            model has one).

    Raises:
        ValueError: (strict) a name matching no module, named with the module names that exist; a name
            matching only modules that hold no parameters or buffers (nothing to train or save).
    """
    names = list(names)
    modules = [(n, m) for n, m in model.named_modules() if n]
    found = {entry: [n for n, _ in modules if _matches(n, entry)] for entry in names}
    unmatched = [entry for entry, hits in found.items() if not hits]
    if unmatched and strict:
        raise ValueError(f"{what}: modules_to_save {unmatched} matched no module of {type(model).__name__}; "
                         f"modules with parameters that exist: {_module_names(model)}")
    paths = {n for hits in found.values() for n in hits}
    empty = sorted(p for p in paths if not model.get_submodule(p).state_dict())
    if empty:
        raise ValueError(f"{what}: modules_to_save matched {empty}, which hold no parameters or buffers "
                         f"(nothing to train or save); modules with parameters: {_module_names(model)}")
    ordered = [n for n, _ in modules if n in paths]
    return [p for p in ordered if not inside(p, [q for q in ordered if q != p])]


def _union(*groups: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for group in groups:
        out += [p for p in group if p not in out]
    return tuple(p for p in out if not inside(p, [q for q in out if q != p]))


def attach(model: nn.Module, paths: Iterable[str]) -> tuple[str, ...]:
    """Record `paths` (module paths of `model`) beside those already marked, and make every marked
    module fully trainable. Returns the marked paths."""
    paths = _union(marked(model), paths)
    setattr(model, ATTR, paths)  # a new tuple each time: a rollback snapshot keeps the old one
    for path in paths:
        model.get_submodule(path).requires_grad_(True)
    return paths


def applies(apply_fn=None, *, cfg_arg: int = 1, mark: bool = True):
    """Wrap a method's `apply(model, cfg, ...)`: the config's `modules_to_save` and the model's declared
    heads are resolved first (errors before anything changes), marked (`mark=False`: selective
    fine-tuning, which saves every trainable parameter itself, only makes them trainable), the method
    applies, and the modules become trainable. If the method raises, the marker is put back.

    `cfg_arg`: the position of the config among the arguments (LoRA's `add_adapter(model, name, cfg)`: 2).
    """
    if apply_fn is None:
        return functools.partial(applies, cfg_arg=cfg_arg, mark=mark)

    @functools.wraps(apply_fn)
    def apply(model, *args, **kwargs):
        cfg = args[cfg_arg - 1] if len(args) >= cfg_arg else kwargs.get("cfg")
        names = check_names(getattr(cfg, FIELD, None), f"{type(cfg).__name__}.{FIELD}") or []
        paths = _union(resolve(model, names, "apply"), resolve(model, declared(model), "apply", strict=False))
        if not mark:
            result = apply_fn(model, *args, **kwargs)
            for path in paths:
                model.get_submodule(path).requires_grad_(True)
            return result
        had, before = ATTR in model.__dict__, marked(model)
        setattr(model, ATTR, _union(before, paths))  # before the method matches its targets: they skip these
        try:
            result = apply_fn(model, *args, **kwargs)
        except BaseException:
            if had:
                setattr(model, ATTR, before)
            else:
                model.__dict__.pop(ATTR, None)
            raise
        attach(model, ())
        return result

    return apply


def saved_paths(model: nn.Module) -> list[str]:
    """The modules an adapter file of `model` holds beside the method: the marked ones and the heads the
    model declares, in model order."""
    paths = _union(marked(model), resolve(model, declared(model), "save_adapter", strict=False))
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(paths, key=lambda p: order.get(p, len(order)))


def _entries(model: nn.Module, paths: Iterable[str], prefix: str) -> dict[str, torch.Tensor]:
    """{file key: the live parameter or buffer} of every module in `paths` (its whole state dict)."""
    out = {}
    for path in paths:
        for key, tensor in model.get_submodule(path).state_dict(keep_vars=True).items():
            out[f"{prefix}{path}.{key}"] = tensor
    return out


def state_dict(model: nn.Module, paths: Iterable[str], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of the modules `paths` under PEFT's file keys (`<prefix><path>.<name>`), detached."""
    return {k: v.detach() for k, v in _entries(model, paths, prefix).items()}


def split(tensors: dict[str, torch.Tensor], paths: Iterable[str], prefix: str):
    """(the method's tensors, the saved modules' tensors) of an adapter file: a key under a saved module's
    path belongs to it (methods never adapt what lies inside one)."""
    heads = [prefix + p for p in paths]
    own = {k: v for k, v in tensors.items() if not any(k.startswith(h + ".") for h in heads)}
    return own, {k: v for k, v in tensors.items() if k not in own}


def check_state(model: nn.Module, paths: list[str], tensors: dict[str, torch.Tensor], prefix: str, file) -> None:
    """Every tensor of the saved modules is in the file with the model's shape, and nothing else under
    their paths, BEFORE anything is applied.

    Raises: ValueError naming the file and every missing, unexpected or mis-shaped key.
    """
    entries = _entries(model, paths, prefix)
    expected = {k: tuple(v.shape) for k, v in entries.items()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    shapes = [f"{k}: file {tuple(tensors[k].shape)} vs model {s}" for k, s in expected.items()
              if k in tensors and tuple(tensors[k].shape) != s]
    # a float16 head loads into a float32 model (cast); integers or bools into floats would be a damaged file
    kinds = [f"{k}: file {tensors[k].dtype} vs model {v.dtype}" for k, v in entries.items()
             if k in tensors and tensors[k].is_floating_point() != v.is_floating_point()]
    problems = [f"{label}: {keys}" for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                                      ("mis-shaped keys", shapes), ("mistyped keys", kinds)) if keys]
    if problems:
        raise ValueError(f"load_adapter: the modules_to_save {paths} in {file} do not fit the model; "
                         + "; ".join(problems))


@torch.no_grad()
def load_state(model: nn.Module, paths: list[str], tensors: dict[str, torch.Tensor], prefix: str, file) -> None:
    """Mark `paths`, make them trainable and copy their tensors in (checked first, strictly)."""
    check_state(model, paths, tensors, prefix, file)
    attach(model, paths)
    for key, target in _entries(model, paths, prefix).items():
        target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))


def unsaved_trainable(model: nn.Module, covered: Iterable[torch.Tensor]) -> list[str]:
    """The names of trainable parameters an adapter file would lose: in none of the tensors `covered`
    (what the file holds, compared by storage, so a tied parameter saved under its other name counts)."""
    pointers = {t.data_ptr() for t in covered if t.numel()}
    return [n for n, p in model.named_parameters() if p.requires_grad and p.numel() and p.data_ptr() not in pointers]


def add(model: nn.Module, names: list[str]) -> list[str]:
    """Mark the modules `names` match (a list, by the matching rule above) as modules to save on a model
    that already carries a method, and make them trainable: what to do when `save_adapter` says a
    trained parameter would be lost. Returns the marked paths (all of them, in model order).

    Raises:
        ValueError: a bad list, or a name that matches no module (the module names are listed).
    """
    names = check_names(names, "modules_to_save.add names") or []
    attach(model, resolve(model, names, "modules_to_save.add"))
    return saved_paths(model)
