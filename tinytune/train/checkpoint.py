"""Training checkpoints: trainable weights, optimizer, scheduler, scaler, RNG states, data position.

Layout of `out_dir/checkpoints/step-0000010/` (format 2):
    trainable.safetensors   the parameters with requires_grad (adapter weights only for PEFT)
    state.json              optimizer, scheduler, scaler, RNG states, data position, history so far,
    state.safetensors       as JSON, with every tensor (moments, RNG states) in the safetensors file
    manifest.json           format, step, file list, the run's config
    tinytune_manifest.json  every file's size and SHA-256 (the integrity record)

No file is a pickle: loading never unpickles anything. A checkpoint is one directory transaction
(`tinytune._transaction`): written beside, fsynced, swapped in, so a crash leaves the previous
checkpoints untouched and never a half-written one. Only the newest `keep` checkpoints are kept.

Resuming reads and checks EVERYTHING first (integrity, names, shapes, dtypes, optimizer groups and
moments, the loop state's fields) and only then copies anything into the model or optimizer;
`find_checkpoint` skips damaged checkpoints, with a warning, for the newest intact one.
"""
from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import signal
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

from .. import _check
from .._files import contained_file, read_json, read_safetensors
from .._manifest import IntegrityError, verify
from .._transaction import directory_transaction
from ..seeding import seed_everything  # noqa: F401  (kept as ckpt.seed_everything for older callers)
from . import state_codec
from .checkpoint_checks import check_loop_state, check_optimizer_state

MANIFEST = "manifest.json"
WEIGHTS = "trainable.safetensors"
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
FORMAT_VERSION = 2
_STEP_DIR = re.compile(r"step-(\d+)")


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of `model` with `requires_grad`, by name, detached and contiguous (tied ones once)."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def check_trainable_weights(model: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Raise ValueError unless `weights` are exactly the trainable parameters of `model` (names, shapes,
    dtypes); names `where` and the first offending keys. Copies nothing."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ValueError(f"{where}: the weights do not match the model's trainable parameters: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, param in params.items():
        if weights[name].shape != param.shape:
            raise ValueError(f"{where}: weight {name!r} has shape {tuple(weights[name].shape)}, "
                             f"the model's has {tuple(param.shape)}")
        if weights[name].dtype != param.dtype:
            raise ValueError(f"{where}: weight {name!r} is {weights[name].dtype}, the model's is {param.dtype}")


def load_trainable_state_dict(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` into the trainable parameters of `model`, strictly: everything is checked
    (`check_trainable_weights`) before the first copy.

    Raises:
        ValueError: a trainable parameter is missing from `weights`, a key is not a trainable
            parameter, or a shape or dtype differs; the message names the key.
    """
    check_trainable_weights(model, weights, "checkpoint")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
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


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    """Where `save_checkpoint` puts step `step` of the run writing to `out_dir`."""
    return Path(out_dir) / "checkpoints" / f"step-{step:07d}"


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, config: dict | None = None, keep: int | None = None) -> Path:
    """Write `out_dir/checkpoints/step-<step>/` as one transaction and return its path.

    Args:
        out_dir: the run's output directory.
        step: optimizer steps done; names the directory.
        model: its trainable parameters are saved.
        optimizer: its `state_dict()` is saved.
        state: plain data (tensors, numbers, strings, lists, tuples, dicts): scheduler, scaler, RNG,
            data position, history.
        config: the run's `TrainConfig.to_dict()`, recorded in the manifest (resume compares it).
        keep: keep only the newest `keep` checkpoints (the one written now among them); None keeps all.

    Returns:
        The checkpoint directory.

    Raises:
        SaveError: writing failed (full disk, ...): the previous checkpoints are intact.
    """
    final = checkpoint_dir(out_dir, step)
    structure, tensors = state_codec.encode({"optimizer": optimizer.state_dict(), "loop": state})
    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": [WEIGHTS, STATE_JSON, STATE_TENSORS],
                "config": config}
    with directory_transaction(final, what="save_checkpoint") as staging:
        save_file(trainable_state_dict(model), str(staging / WEIGHTS))
        save_file(tensors, str(staging / STATE_TENSORS))
        (staging / STATE_JSON).write_text(json.dumps(structure))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if keep is not None:
        _prune(final.parent, keep, final)
    return final


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every `step-N` directory under `root`, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := _STEP_DIR.fullmatch(d.name)) and d.is_dir()]
    return sorted(found, reverse=True)


def existing_checkpoints(out_dir: str | Path) -> list[Path]:
    """The `step-N` checkpoint directories (intact or damaged) under `out_dir/checkpoints`, newest first."""
    return [d for _, d in _step_dirs(Path(out_dir) / "checkpoints")]


def _prune(root: Path, keep: int, newest: Path) -> None:
    """Remove all but the `keep` newest checkpoints (never `newest`, the one just written)."""
    for _, directory in _step_dirs(root)[keep:]:
        if directory != newest:
            shutil.rmtree(directory, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint at `path`, or the newest intact one under `path/checkpoints`; None if there is none.

    Under `path/checkpoints`, a damaged `step-N` checkpoint (a file missing, truncated or changed; a
    damaged or missing manifest) is skipped with a warning for the next older intact one; a save's
    temporaries are hidden siblings that never match `step-N`.

    Raises:
        IntegrityError (a ValueError): `path` is itself a checkpoint and is damaged, or every
            checkpoint under `path/checkpoints` is (each named).
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        _check_intact(path)
        return path
    damaged = []
    for _, directory in _step_dirs(path / "checkpoints"):  # a save never leaves a step-N without its files
        try:
            _check_intact(directory)
        except (ValueError, OSError) as err:
            damaged.append(f"{directory.name}: {err}")
            continue
        if damaged:
            warnings.warn(f"resume: skipped {len(damaged)} damaged checkpoint(s) for {directory} "
                          f"({'; '.join(damaged)})", RuntimeWarning, stacklevel=2)
        return directory
    if damaged:
        raise IntegrityError(f"resume: every checkpoint under {path / 'checkpoints'} is damaged: " + "; ".join(damaged))
    return None


def _check_intact(directory: Path) -> None:
    """Every file of the checkpoint inside it, as its integrity manifest recorded, and a sound manifest."""
    for name in (MANIFEST, WEIGHTS, STATE_JSON, STATE_TENSORS):
        if (directory / name).exists() or (directory / name).is_symlink():
            contained_file(directory, name, "resume")  # no symlink leading out, even without a manifest
    _read_manifest(directory)  # first: an old format is named as such
    verify(directory, "resume", required=True, listed=(MANIFEST, WEIGHTS, STATE_JSON, STATE_TENSORS))


def _read_manifest(directory: Path) -> dict:
    file = contained_file(directory, MANIFEST, "resume")
    manifest = _check.mapping(read_json(file, "resume"), f"resume: {file}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"resume: {file} has format_version={version!r}; this tinytune reads {FORMAT_VERSION} "
                         "(format 1 checkpoints held pickles and are no longer read: start the run again)")
    _check.integer(manifest.get("step"), f"resume: {file} field 'step'", low=0)
    config = manifest.get("config")
    if config is not None:
        _check.mapping(config, f"resume: {file} field 'config'")
    return manifest


@dataclass
class Checkpoint:
    """A checkpoint read from disk and checked against a model and optimizer; nothing applied yet."""

    path: Path
    step: int
    config: dict | None
    weights: dict[str, torch.Tensor]
    optimizer: dict
    state: dict


def read_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> Checkpoint:
    """Read every file of the checkpoint `path` points to (see `find_checkpoint`) and check it against
    `model` and `optimizer`, without changing either.

    Raises:
        FileNotFoundError: `path` holds no checkpoint.
        ValueError: a damaged checkpoint, or one that does not fit: trainable names, shapes or dtypes,
            optimizer groups or moment shapes, missing or ill-typed loop-state fields (all named).
    """
    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {path} (expected {MANIFEST} there or a "
                                f"checkpoints/step-*/ directory holding one)")
    return read_found_checkpoint(found, model, optimizer)


def read_found_checkpoint(found: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> Checkpoint:
    """`read_checkpoint` of a directory `find_checkpoint` returned (its integrity already checked: the
    files are not hashed a second time)."""
    manifest = _read_manifest(found)
    weights_file, tensors_file, json_file = (contained_file(found, name, "resume")  # no symlink leading out
                                             for name in (WEIGHTS, STATE_TENSORS, STATE_JSON))
    weights = read_safetensors(weights_file, "resume")
    check_trainable_weights(model, weights, f"resume: {weights_file}")
    tensors = read_safetensors(tensors_file, "resume")
    structure = read_json(json_file, "resume")
    decoded = _check.mapping(state_codec.decode(structure, tensors, f"resume: {found / STATE_JSON}"),
                             f"resume: {found / STATE_JSON}")
    opt_state = _check.mapping(decoded.get("optimizer"), f"resume: {found / STATE_JSON} field 'optimizer'")
    check_optimizer_state(opt_state, optimizer, found)
    state = check_loop_state(decoded.get("loop"), manifest["step"], found / STATE_JSON)
    return Checkpoint(found, manifest["step"], manifest.get("config"), weights, opt_state, state)


@contextlib.contextmanager
def all_or_nothing(model: nn.Module, *stateful):
    """Inside, a resume may change `model`'s trainable parameters and the `state_dict`/`load_state_dict`
    objects in `stateful` (optimizer, scheduler, ...); if anything raises, all are put back as they were."""
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    before = [_clone_state(obj.state_dict()) for obj in stateful]
    try:
        yield
    except BaseException:
        load_trainable_state_dict(model, trainable)
        for obj, state in zip(stateful, before):
            obj.load_state_dict(state)
        raise


def check_rng_state(state: dict, where: str) -> None:
    """Raise ValueError unless `set_rng_state(state)` works here (other Python/numpy, more CUDA devices
    than this machine has, ...); the RNGs are left as they were."""
    current = rng_state("cuda" if "cuda" in state and torch.cuda.is_available() else "cpu")
    try:
        set_rng_state(state)
    except (ValueError, TypeError, RuntimeError, KeyError, IndexError) as err:
        raise ValueError(f"resume: the random-number state in {where} cannot be restored here ({err})") from None
    finally:
        set_rng_state(current)


def apply_checkpoint(checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Copy a checked `Checkpoint`'s weights and optimizer state in; if anything still fails, both are
    restored to what they were, so a failed resume changes nothing."""
    with all_or_nothing(model, optimizer):
        load_trainable_state_dict(model, checkpoint.weights)
        optimizer.load_state_dict(checkpoint.optimizer)


def _clone_state(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_state(v) for v in obj)
    return obj


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Read and check a checkpoint (`read_checkpoint`), then load its weights and optimizer state into
    `model` / `optimizer`; return the loop `state` dict (with "path").

    Raises:
        FileNotFoundError: `path` holds no complete checkpoint.
        ValueError: the checkpoint is damaged or does not fit (names the file and key); nothing was changed.
    """
    checkpoint = read_checkpoint(path, model, optimizer)
    apply_checkpoint(checkpoint, model, optimizer)
    return {**checkpoint.state, "path": str(checkpoint.path)}
