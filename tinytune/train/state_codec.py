"""Nested training state (optimizer, scheduler, RNG, history) as JSON + safetensors: no pickle, ever.

`encode(obj)` splits a structure of dicts, lists, tuples, numbers, strings, None and tensors into a
JSON-ready structure, where each tensor is replaced by `{"__tensor__": key}`, and a dict of tensors
by key. `decode` puts them back. Dicts whose keys are not all strings (an optimizer's `state` is keyed
by parameter index) are stored as `{"__items__": [[key, value], ...]}`, tuples as `{"__tuple__": [...]}`,
so the round trip gives back the same Python types.
"""
from __future__ import annotations

import torch

_TENSOR, _ITEMS, _TUPLE = "__tensor__", "__items__", "__tuple__"
_SCALARS = (bool, int, float, str, type(None))


def encode(obj, path: str = "state") -> tuple[object, dict[str, torch.Tensor]]:
    """(JSON-ready structure, tensors by key) for `obj`.

    Raises:
        TypeError: a value of another type (named by its path in the structure).
    """
    tensors: dict[str, torch.Tensor] = {}
    return _encode(obj, path, _Store(tensors)), tensors


class _Store:
    """Tensors by key; the same tensor object met twice (rank 0's RNG state is also `rng`) is stored
    once, and distinct tensors sharing memory are copied apart (safetensors refuses shared storage)."""

    def __init__(self, tensors: dict):
        self.tensors, self.keys, self.storages = tensors, {}, set()

    def add(self, tensor: torch.Tensor, path: str) -> str:
        if id(tensor) in self.keys:
            return self.keys[id(tensor)]
        cpu = tensor.detach().to("cpu")
        whole = cpu.untyped_storage().nbytes() == cpu.numel() * cpu.element_size()
        ptr = cpu.untyped_storage().data_ptr()
        if not (cpu.is_contiguous() and cpu.storage_offset() == 0 and whole) or (ptr in self.storages and ptr):
            cpu = cpu.contiguous().clone()
        self.storages.add(cpu.untyped_storage().data_ptr())
        key = f"{len(self.tensors)}:{path}"  # numbered: paths alone can collide ({"x/y": a, "x": {"y": b}})
        self.tensors[key], self.keys[id(tensor)] = cpu, key
        return key


def _encode(obj, path: str, tensors: _Store):
    if isinstance(obj, torch.Tensor):
        return {_TENSOR: tensors.add(obj, path)}
    if isinstance(obj, _SCALARS):
        return obj
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not (k.startswith("__") and k.endswith("__")) for k in obj):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        return {_ITEMS: [[_encode(k, f"{path}/key{i}", tensors), _encode(v, f"{path}/{i}", tensors)]
                         for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"checkpoint state {path}: cannot store a {type(obj).__name__} (only tensors, numbers, "
                    "strings, None, lists, tuples and dicts)")


def decode(obj, tensors: dict[str, torch.Tensor], where: str):
    """Invert `encode`.

    Raises:
        ValueError: a tensor reference that the tensors do not hold, or a malformed marker (names `where`).
    """
    if isinstance(obj, list):
        return [decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj  # (NaN losses of skipped steps and an inf best-eval come back as floats: JSON's NaN/Infinity)
    if set(obj) == {_TENSOR}:
        key = obj[_TENSOR]
        if not isinstance(key, str) or key not in tensors:
            raise ValueError(f"{where}: refers to tensor {key!r}, which the checkpoint's tensors do not hold")
        return tensors[key]
    if set(obj) == {_TUPLE}:
        return tuple(decode(v, tensors, where) for v in _as_list(obj[_TUPLE], where))
    if set(obj) == {_ITEMS}:
        pairs = _as_list(obj[_ITEMS], where)
        if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise ValueError(f"{where}: malformed {_ITEMS} entry")
        return {decode(k, tensors, where): decode(v, tensors, where) for k, v in pairs}
    return {k: decode(v, tensors, where) for k, v in obj.items()}


def _as_list(value, where: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{where}: malformed entry (expected a list, got {type(value).__name__})")
    return value
