"""Find modules by name and swap them: the only machinery the PEFT methods share.

Matching rules (the same for `targets` and `exclude`, see ../shared/API.md):
- a list of strings: a module matches when its dotted name equals an entry or ends with "." + entry;
- a string: a regular expression, `re.fullmatch` against the dotted name;
- "all-linear": every linear layer (`nn.Linear`; a method may count more types as linear, such as
  LoRA's registered types) except the model's output layer (see `output_heads`);
- a callable `(name, module) -> bool`.

A module marked as a module to save (`modules_to_save`) and everything inside it never matches: it is
trained whole, so an adapter inside it would be saved twice and loaded once (PEFT excludes them too).
"""
from __future__ import annotations

import contextlib

import re
from typing import Callable, Iterable, Union

import torch.nn as nn

from .modules_to_save import inside, marked

TargetSpec = Union[str, Iterable[str], Callable[[str, nn.Module], bool], None]

ALL_LINEAR = "all-linear"
LinearKind = Callable[[nn.Module], bool]


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


def output_heads(model: nn.Module, modules: list[tuple[str, nn.Module]] | None = None,
                 is_linear: LinearKind = _is_linear) -> set[str]:
    """The names of the model's output layers, which "all-linear" leaves out (as PEFT does).

    The output layer is the module `model.get_output_embeddings()` returns (the model says so), and
    any linear whose weight is an input embedding's (tied). A model that names none of these has as
    its output layer its last linear in module order when that one changes the model's width (its
    `out_features` differ from the first linear's `in_features`: a classifier or regression head),
    so that the last projection of a block (nn.TransformerEncoderLayer's linear2) is not taken for one.

    `modules`: the (name, module) pairs to look at (default: `model.named_modules()`).
    """
    modules = list(model.named_modules()) if modules is None else modules
    heads = set()
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    embedding_weights = {id(m.weight) for _, m in modules if isinstance(m, nn.Embedding)}
    linears = [(name, m) for name, m in modules if name and is_linear(m)]
    for name, m in linears:
        if m is output or id(getattr(m, "weight", None)) in embedding_weights:
            heads.add(name)
    if not heads and linears:
        width = getattr(linears[0][1], "in_features", None)
        last_name, last = linears[-1]
        if getattr(last, "out_features", None) != width:
            heads.add(last_name)
    return heads


def shared_weight_users(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> dict[str, list[str]]:
    """For each (name, layer) whose `layer.base.weight` another module of `model` also uses (a tied
    lm_head and input embedding): name -> the other modules' names. Merging into such a weight would
    change those modules too."""
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            users.setdefault(id(weight), []).append(name)
    shared = {}
    for name, layer in layers:
        weight = getattr(layer.base, "weight", None)  # a custom (quantised) base may keep none
        others = [n for n in users.get(id(weight), []) if n not in (name, name + ".base")] if weight is not None else []
        if others:
            shared[name] = others
    return shared


def refuse_shared_merge(model: nn.Module, layers: list[tuple[str, nn.Module]], what: str) -> None:
    """Raise ValueError naming the layers whose base weight is shared with another module (see above)."""
    shared = shared_weight_users(model, layers)
    if shared:
        raise ValueError(f"{what}: the base weight of {shared} is shared (tied) with the modules listed, so merging "
                         "would change them too and the model would no longer compute what it does unmerged; "
                         "keep the adapter unmerged, or untie the weights first")


def matches(name: str, module: nn.Module, spec: TargetSpec, heads: frozenset[str] | set[str] = frozenset(),
            is_linear: LinearKind = _is_linear) -> bool:
    """Whether the module called `name` matches `spec` under the rules above.

    `heads` holds the output-head names that "all-linear" leaves out (see `output_heads`); `is_linear`
    says which modules "all-linear" counts as linear.
    """
    if spec is None:
        return False
    if callable(spec):
        return bool(spec(name, module))
    if isinstance(spec, str):
        if spec == ALL_LINEAR:
            return is_linear(module) and name not in heads
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def validate_spec(spec: TargetSpec, field: str) -> None:
    """Raise `ValueError` for a spec that is none of the accepted kinds (or a bad regex)."""
    if spec is None or callable(spec):
        return
    if isinstance(spec, str):
        if spec == ALL_LINEAR:
            return
        try:
            re.compile(spec)
        except re.error as err:
            raise ValueError(f"{field}={spec!r} is not a valid regular expression: {err}") from None
        return
    try:
        entries = list(spec)
    except TypeError:
        raise ValueError(
            f"{field} must be a list of names, a regex string, 'all-linear' or a callable; got {spec!r}"
        ) from None
    bad = [e for e in entries if not isinstance(e, str) or not e]
    if bad:
        raise ValueError(f"{field} entries must be non-empty strings; got {bad!r}")


def find_targets(model: nn.Module, targets: TargetSpec, exclude: TargetSpec = None,
                 modules: list[tuple[str, nn.Module]] | None = None,
                 is_linear: LinearKind = _is_linear, skip_saved: bool = True) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs that match `targets` and not `exclude`, in model order.

    `modules`: the (name, module) pairs to match (default: `model.named_modules()`); LoRA passes
    a view in which an adapted layer stands for its base, to add further adapters. `is_linear`: which
    modules "all-linear" counts (default: nn.Linear). `skip_saved`: leave out the modules marked as
    modules to save and what lies inside them (see the module docstring).
    """
    modules = list(model.named_modules()) if modules is None else modules
    heads = output_heads(model, modules, is_linear) if ALL_LINEAR in (targets, exclude) else set()
    saved = marked(model) if skip_saved else ()
    if saved:  # after finding the heads: which linear is the output layer does not change
        modules = [(name, module) for name, module in modules if not inside(name, saved)]
    found = []
    for name, module in modules:
        if not name:
            continue  # the root itself is never swapped
        if (matches(name, module, targets, heads, is_linear)
                and not matches(name, module, exclude, heads, is_linear)):
            found.append((name, module))
    return found


def describe_candidates(model: nn.Module, kinds: tuple[type, ...] = (nn.Linear, nn.Embedding), limit: int = 12) -> str:
    """A short list of module names of the given kinds, for error messages."""
    names = [n for n, m in model.named_modules() if n and isinstance(m, kinds)]
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return shown + more if names else "(none)"


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The parent module of dotted `name` and the child's attribute name."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the module called `name` is (works for nn.Sequential/ModuleList indices too)."""
    parent, child = get_parent(model, name)
    setattr(parent, child, new)


@contextlib.contextmanager
def layers_disabled(layers):
    """Within: every layer's `_disabled` flag is set (its forward computes only its base); after: each
    flag as it was. The one switch behind `disabled()` of LoRA, (IA)3 and bottleneck adapters."""
    layers = list(layers)
    previous = [layer._disabled for layer in layers]
    for layer in layers:
        layer._disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, previous):
            layer._disabled = was


def guard_fused_fast_paths(model: nn.Module, name: str, layer: nn.Module) -> None:
    """Keep torch's fused transformer paths, which read the weights directly, from skipping `layer`
    (swapped in at `name`). nn.TransformerEncoder/DecoderLayer's fast path is off while any submodule has
    a forward hook, so `layer` gets a no-op one; nn.TransformerEncoder's nested-tensor path (eval with a
    padding mask) would feed nested tensors to the adapters, so its `use_nested_tensor` is turned off.
    Shared by every method that swaps modules."""
    parts = name.split(".")
    hooked = False
    for depth in range(len(parts)):
        ancestor = model.get_submodule(".".join(parts[:depth]))
        if isinstance(ancestor, nn.TransformerEncoder):
            ancestor.use_nested_tensor = False
        if not hooked and isinstance(ancestor, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            layer.register_forward_pre_hook(_no_op_hook)
            hooked = True


def _no_op_hook(module, args):
    return None
