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
