"""One call that seeds every random number generator tinytune draws from, for reproducible runs.

    import tinytune as tt
    tt.seed_everything(0)                    # before the model is adapted: LoRA's A, soft prompts, heads
    tt.lora.apply(model, tt.lora.LoraConfig(targets="all-linear"))
    tt.train.fit(model, data, tt.train.TrainConfig(seed=0))   # fit seeds again at its start (fresh runs)

Seeded: python's `random`, numpy's global RNG (`np.random.seed`, the legacy `RandomState` behind
`np.random.rand` & co.), torch's CPU generator and the generator of every CUDA device. Every random
initialisation in the library (LoRA A, adapter and prefix weights, soft prompts, classification heads,
dropout-mask seeds) draws from torch's global generator, so this one call governs all of them.

Not touched, on purpose:
- PYTHONHASHSEED. Python reads it once, when the interpreter starts: setting it here could not change
  `hash(str)` in the running process, only in subprocesses started later, which would make a child
  differ from its parent. tinytune's results do not depend on hash order (two CLI runs in processes
  with different hash seeds give byte-identical adapters; a test checks it). Set it in the shell if
  your own code iterates over sets of strings.
- Deterministic algorithms. `torch.use_deterministic_algorithms(True)` makes some CUDA ops slower and
  makes others raise, so it is opt-in: `seed_everything(seed, deterministic=True)`.
- Private generators (`torch.Generator()`, `np.random.default_rng()`, `random.Random()`): they have
  their own seeds. tinytune's own (the shuffle order, `generate(seed=)`) are seeded from their arguments.

This module imports only torch, numpy and the standard library, and never initialises CUDA:
`torch.cuda.manual_seed_all` only records the seed until CUDA is first used.
"""
from __future__ import annotations

import numbers
import os
import random

import numpy as np
import torch

__all__ = ["MAX_SEED", "check_seed", "seed_everything"]

MAX_SEED = 2**32 - 1  # numpy's legacy seed range is [0, 2**32 - 1]; torch and `random` take more


def check_seed(seed, where: str = "seed") -> int:
    """`seed` as a python int in [0, MAX_SEED] (numpy's range); `where` names it in the message.

    Raises:
        TypeError: `seed` is not an integer (a bool, a float such as 1.0, a string).
        ValueError: `seed` is negative or above 2**32 - 1.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{where} must be an int in [0, 2**32 - 1], got {seed!r} ({type(seed).__name__})")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{where} must be an int in [0, 2**32 - 1] = [0, {MAX_SEED}] (numpy's seed range), "
                         f"got {seed!r}")
    return int(seed)


def seed_everything(seed: int, *, deterministic: bool = False) -> int:
    """Seed python `random`, numpy's global RNG, torch's CPU generator and every CUDA device's.

    Two runs that call this with the same seed before any random draw, and then do the same work in
    the same order, draw the same numbers: on the CPU their results are bit-identical (see "Seeds and
    reproducibility" in docs/training.md for what else must match: torch version, thread count).

    Args:
        seed: an int in [0, 2**32 - 1] (numpy's accepted range; the same value seeds every RNG).
        deterministic: True also calls `torch.use_deterministic_algorithms(True)` (ops without a
            deterministic implementation then raise), turns cuDNN benchmarking off and, when unset,
            sets CUBLAS_WORKSPACE_CONFIG=":4096:8" (needed for deterministic cuBLAS; it must happen
            before the first CUDA matmul). False (the default) leaves all of these as they are.

    Returns:
        The seed, as a python int.

    Raises:
        TypeError: `seed` is not an int (bools refused), or `deterministic` is not a bool.
        ValueError: `seed` is outside [0, 2**32 - 1].
    """
    seed = check_seed(seed)
    if not isinstance(deterministic, bool):
        raise TypeError(f"seed_everything: deterministic must be True or False, got {deterministic!r} "
                        f"({type(deterministic).__name__})")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # the CPU generator (and, in torch, CUDA's as well: said again below)
    torch.cuda.manual_seed_all(seed)  # lazy: queued until CUDA is initialised, so none is started here
    if deterministic:
        _use_deterministic_algorithms()
    return seed


def _use_deterministic_algorithms() -> None:
    # cuBLAS picks a reduction order per workspace; a fixed small workspace makes it reproducible.
    # Read when the first cuBLAS handle is made, hence setdefault: a user's own value wins.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
