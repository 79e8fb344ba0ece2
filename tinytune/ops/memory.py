"""Measure what autograd keeps for backward: the memory a training step holds between passes."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def saved_storages(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[dict[int, int], object]:
    """Run `fn()` and record every storage autograd saves for backward, each counted once.

    Args:
        fn: the forward computation to watch.
        exclude: tensors whose storages are not counted (typically the parameters, which exist
            whether or not a backward follows).

    Returns:
        ({storage data_ptr: nbytes}, fn's result).
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return seen, out


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves while `fn()` runs (see `saved_storages`)."""
    seen, out = saved_storages(fn, exclude)
    del out
    return sum(seen.values())


def graph_saved_storages(outputs, exclude: Iterable[torch.Tensor] = ()) -> dict[int, int]:
    """The storages the autograd graph behind `outputs` keeps for backward, read from the graph itself.

    Unlike `saved_storages` this installs no saved-tensor hooks, so code that acts differently while hooks are
    active (a shared LoRA shrink then shares only its forward, see `tinytune.peft.lora.shared_shrink`) is measured
    as it runs.
    Custom Functions show their `saved_tensors`; built-in nodes their `_saved_*` attributes (0-dim ones, the
    wrapped Python scalars of ops such as `x * 2`, are not counted).

    Args:
        outputs: a tensor or tensors whose graph to walk (before backward frees it).
        exclude: tensors whose storages are not counted (typically the parameters).

    Returns:
        {storage data_ptr: nbytes}, each storage once.
    """
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}
    stack, visited = [t.grad_fn for t in outputs if t.grad_fn is not None], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        for t in _node_saved(node):
            storage = t.untyped_storage()
            if storage.data_ptr() not in skip:
                seen[storage.data_ptr()] = storage.nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return seen


def _node_saved(node) -> list[torch.Tensor]:
    saved = list(getattr(node, "saved_tensors", None) or ())  # custom autograd Functions
    for name in dir(node):
        if name.startswith("_saved_"):
            value = getattr(node, name)
            values = value if isinstance(value, (tuple, list)) else (value,)
            saved.extend(v for v in values if isinstance(v, torch.Tensor))
    # 0-dim tensors are skipped: built-in nodes save Python scalars (x * 2) as wrapped 0-dim tensors, which
    # saved-tensor hooks never see; a real 0-dim saved tensor is 1 element
    return [t for t in saved if t is not None and t.dim() > 0]
