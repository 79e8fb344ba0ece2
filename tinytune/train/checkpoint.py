"""Training checkpoints: trainable weights, optimizer, scheduler, scaler, RNG states, data position.

Layout of `out_dir/checkpoints/step-0000010/`:
    trainable.safetensors   the parameters with requires_grad (adapter weights only for PEFT)
    optimizer.pt            `optimizer.state_dict()` (tensors and plain containers only)
    state.pt                scheduler, scaler, RNG states, data position, step, history so far
    manifest.json           step, file list, config; a directory without it is not a checkpoint

Writing is atomic: everything goes into a hidden temporary directory that is renamed into place, so
a crash mid-write leaves the previous checkpoints untouched and no half-written one. Every `.pt` file
is read with `torch.load(weights_only=True)`: no pickled code runs on load.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.pt"
FORMAT_VERSION = 1


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of `model` with `requires_grad`, by name, detached and contiguous (tied ones once)."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` into the trainable parameters of `model`, strictly.

    Raises:
        ValueError: a trainable parameter is missing from `weights`, a key is not a trainable
            parameter, or a shape differs; the message names the key.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint weights do not match the model's trainable parameters: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            if weights[name].shape != param.shape:
                raise ValueError(f"checkpoint weight {name!r} has shape {tuple(weights[name].shape)}, "
                                 f"the model's has {tuple(param.shape)}")
            param.copy_(weights[name])


def rng_state(device: str) -> dict:
    """RNG states of torch (CPU and, when in use, CUDA), python `random` and numpy, as plain data."""
    version, internal, gauss = random.getstate()
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],  # a list, not a tuple: loads with weights_only
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }
    if device == "cuda" or torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), python `random` and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def catch_signals(enabled: bool = True):
    """Turn SIGINT/SIGTERM into a flag checked between steps, so a checkpoint can be saved first.

    Yields the list the received signal numbers are appended to. A second signal raises
    KeyboardInterrupt at once (the user insists). The previous handlers are restored on exit. Off the
    main thread (where handlers cannot be installed) or with `enabled=False`, nothing is installed.
    """
    received: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        received.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_files(tmp: Path, model, optimizer, state: dict, manifest: dict) -> None:
    save_file(trainable_state_dict(model), str(tmp / WEIGHTS))
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
    torch.save(state, tmp / STATE)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: marks the set complete
    for name in (WEIGHTS, OPTIMIZER, STATE, MANIFEST):
        with open(tmp / name, "rb+") as f:
            os.fsync(f.fileno())


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    """Where `save_checkpoint` puts step `step` of the run writing to `out_dir`."""
    return Path(out_dir) / "checkpoints" / f"step-{step:07d}"


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, config: dict | None = None) -> Path:
    """Write `out_dir/checkpoints/step-<step>/` atomically and return its path.

    Args:
        out_dir: the run's output directory.
        step: optimizer steps done; names the directory.
        model: its trainable parameters are saved.
        optimizer: its `state_dict()` is saved.
        state: plain data (tensors, numbers, strings, lists, dicts): scheduler, scaler, RNG, data
            position, history.
        config: the run's `TrainConfig.to_dict()`, recorded in the manifest for reference.

    Returns:
        The checkpoint directory.
    """
    final = checkpoint_dir(out_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        manifest = {"format_version": FORMAT_VERSION, "step": step,
                    "files": [WEIGHTS, OPTIMIZER, STATE], "config": config}
        _write_files(tmp, model, optimizer, state, manifest)
        if final.exists():  # the same step saved again (e.g. after a resume): swap, never mix files
            trash = root / f".{final.name}.old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint at `path`, or the latest complete one under `path/checkpoints`; None if none.

    Only directories holding a manifest count: a temporary or half-written one is never picked.
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    root = path / "checkpoints"
    if not root.is_dir():
        return None
    done = [d for d in root.glob("step-*") if (d / MANIFEST).is_file()]
    return max(done, key=lambda d: json.loads((d / MANIFEST).read_text())["step"], default=None)


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    map_location: str = "cpu") -> dict:
    """Load trainable weights and optimizer state into `model` / `optimizer`; return the `state` dict.

    Raises:
        FileNotFoundError: `path` holds no complete checkpoint.
        ValueError: the weights or optimizer groups do not match the model (names the key).
    """
    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {path} (expected {MANIFEST} there or a "
                                f"checkpoints/step-*/ directory holding one)")
    load_trainable_state_dict(model, load_file(str(found / WEIGHTS)))
    opt_state = torch.load(found / OPTIMIZER, map_location=map_location, weights_only=True)
    saved = [g.get("names") for g in opt_state["param_groups"]]
    current = [g.get("names") for g in optimizer.param_groups]
    if saved != current:
        raise ValueError(f"optimizer state in {found} was saved for parameter groups {saved}, "
                         f"but this run's are {current}")
    optimizer.load_state_dict(opt_state)
    state = torch.load(found / STATE, map_location=map_location, weights_only=True)
    state["path"] = str(found)
    return state
