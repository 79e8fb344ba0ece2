"""What resume checks in a checkpoint's optimizer and loop state before anything is copied."""
from __future__ import annotations

from pathlib import Path

import torch

from .. import _check


def check_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer, found: Path) -> None:
    """Raise ValueError unless `saved` (an optimizer state dict read from `found`) fits `optimizer`: the
    same groups (names, sizes) and every moment of its parameter's shape. Changes nothing."""
    where = f"resume: the optimizer state in {found}"
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise ValueError(f"{where} has no list of param_groups")
    saved_names = [g.get("names") for g in groups]
    current = [g.get("names") for g in optimizer.param_groups]
    if saved_names != current or len(groups) != len(optimizer.param_groups):
        raise ValueError(f"{where} was saved for parameter groups {saved_names}, but this run's are {current}")
    params = []
    for k, (old, new) in enumerate(zip(groups, optimizer.param_groups)):
        ids = old.get("params")
        if not isinstance(ids, list) or len(ids) != len(new["params"]):
            raise ValueError(f"{where}: group {k} holds {len(ids) if isinstance(ids, list) else ids!r} parameters, "
                             f"this run's holds {len(new['params'])}")
        params += list(zip(ids, new["params"]))
    moments = _check.mapping(saved.get("state"), f"{where} field 'state'")
    by_id = dict(params)
    for pid, entry in moments.items():
        if pid not in by_id or not isinstance(entry, dict):
            raise ValueError(f"{where}: state for parameter {pid!r}, which no group holds")
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != by_id[pid].shape:
                raise ValueError(f"{where}: {key} of parameter {pid} has shape {tuple(value.shape)}, "
                                 f"the parameter has {tuple(by_id[pid].shape)}")


_LOOP_FIELDS = {"step": int, "data": dict, "scheduler": dict, "scaler": dict, "rng": dict, "history": dict,
                "loop": list}


def check_loop_state(state, step: int, file: Path) -> dict:
    """The loop state read from `file`, every field `fit` uses present and of its type (ValueError naming
    the field otherwise)."""
    where = f"resume: {file}"
    state = _check.mapping(state, f"{where} field 'loop'")
    for name, kind in _LOOP_FIELDS.items():
        if not isinstance(state.get(name), kind):
            raise ValueError(f"{where}: loop state field {name!r} is missing or not a {kind.__name__}")
    if state["step"] != step:
        raise ValueError(f"{where}: step {state['step']} disagrees with the manifest's {step}")
    for name in ("num_examples", "epoch", "index"):
        _check.integer(state["data"].get(name), f"{where} field 'data.{name}'", low=0)
    history = state["history"]
    for name in ("losses", "lrs"):
        if not isinstance(history.get(name), list) or len(history[name]) != step:
            raise ValueError(f"{where}: history.{name} should list {step} steps")
    if len(state["loop"]) != 3:
        raise ValueError(f"{where}: field 'loop' should hold [bad_streak, best_eval, evals_since_best]")
    return state
