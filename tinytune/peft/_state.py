"""Strict copying of a state dict into a method's parameters: the one `load_state_dict` core that every
PEFT namespace shares (each builds its own key -> parameter map and message hints)."""
from __future__ import annotations

import torch


def copy_state(params: dict[str, torch.Tensor], given: dict[str, torch.Tensor], strict: bool, what: str,
               source: str = "given", missing_hint: str = "", unexpected_hint: str = "") -> tuple[list[str], list[str]]:
    """Copy `given[key]` into `params[key]` for every shared key, after checking all of them.

    Args:
        params: the model's parameters by key. given: the tensors to load, by the same keys.
        strict: missing or unexpected keys are errors (otherwise they are returned).
        what: names the state dict in the message ("the (IA)^3 state dict").
        source: how the message calls `given`'s side of a shape mismatch ("given", "file").
        missing_hint, unexpected_hint: appended to those parts of the message.

    Returns:
        (missing, unexpected) sorted key lists (both empty under strict=True).

    Raises:
        ValueError: a mis-shaped key, or (strict) a missing or unexpected one; every offending key is
            named. Nothing is copied when it raises.
    """
    missing, unexpected = sorted(set(params) - set(given)), sorted(set(given) - set(params))
    problems = [f"missing keys: {missing}{missing_hint}"] if strict and missing else []
    problems += [f"unexpected keys: {unexpected}{unexpected_hint}"] if strict and unexpected else []
    shapes = [f"{k}: {source} {tuple(given[k].shape)} vs model {tuple(p.shape)}"
              for k, p in params.items() if k in given and given[k].shape != p.shape]
    problems += [f"mis-shaped keys: {shapes}"] if shapes else []
    if problems:
        raise ValueError(f"cannot load {what}; " + "; ".join(problems))
    with torch.no_grad():
        for key, param in params.items():
            if key in given:
                param.copy_(given[key].to(device=param.device, dtype=param.dtype))
    return missing, unexpected
