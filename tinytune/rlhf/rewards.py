"""Rewards for online RL: Python reward functions (several, weighted, each free to abstain), named on the
command line as `module:function`, and a reward model's scores, normalised by its stored statistics and
optionally clipped.

    def exact(prompts, completions, answer=None, **_):            # one float (or None: no opinion) per row
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    r = tt.rlhf.combine_rewards([exact, length_penalty], prompts, completions, weights=[1.0, 0.1], answer=answers)

A function is called as `f(prompts, completions, **extra)`: `extra` carries the prompts' other fields
(e.g. "answer"), one list entry per completion, as TRL's `GRPOTrainer` passes its dataset columns.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

import torch

RewardFunction = Callable[..., Sequence]


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _one_function(fn, values, n: int) -> list[float]:
    """`values` as n floats (NaN for None); ValueError naming the function otherwise."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, Sequence) else type(values).__name__
        raise ValueError(f"reward function {_name(fn)} must return one float or None per completion ({n}), got {got}")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"reward function {_name(fn)} returned {v!r} for completion {i}: expected a finite "
                             "number or None (no opinion)")
        else:
            out.append(float(v))
    return out


def reward_matrix(functions: Sequence[RewardFunction], prompts: Sequence, completions: Sequence[str],
                  **extra) -> torch.Tensor:
    """(N, F) float32: every function's reward of every completion, NaN where a function returned None.

    Raises:
        ValueError: no functions, prompts and completions of different lengths, an `extra` field that is
            not one value per completion, or a function returning the wrong number of values or a
            non-finite / non-numeric one (named).
    """
    functions = list(functions)
    if not functions:
        raise ValueError("combine_rewards needs at least one reward function")
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} completions: pass each completion's prompt")
    for key, values in extra.items():
        if len(values) != n:
            raise ValueError(f"reward field {key!r} has {len(values)} values for {n} completions")
    columns = [_one_function(fn, fn(list(prompts), list(completions), **extra), n) for fn in functions]
    return torch.tensor(columns, dtype=torch.float32).T.reshape(n, len(functions))


def combine_rewards(functions: Sequence[RewardFunction], prompts: Sequence, completions: Sequence[str],
                    weights: Sequence[float] | None = None, **extra) -> torch.Tensor:
    """(N,) float32: the weighted sum over functions of each completion's rewards, a None counting as no
    opinion (left out of the sum, as TRL's `nansum`); a completion no function scored gets NaN.

    Args:
        functions: reward functions `f(prompts, completions, **extra) -> list[float | None]`.
        prompts, completions: one prompt per completion (repeat a prompt for its G completions), and the
            completions' text.
        weights: one finite weight per function (default: all 1.0).
        **extra: per-completion fields passed on to every function (e.g. answer=[...]).

    Raises:
        ValueError: as `reward_matrix`, or weights that are not one finite number per function.
    """
    matrix = reward_matrix(functions, prompts, completions, **extra)  # (N, F)
    weights = [1.0] * matrix.shape[1] if weights is None else list(weights)
    if len(weights) != matrix.shape[1] or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be {matrix.shape[1]} finite numbers (one per reward function), got {weights!r}")
    weighted = matrix * torch.tensor(weights, dtype=torch.float32)
    total = torch.nansum(weighted, dim=1)
    return total.masked_fill(torch.isnan(matrix).all(dim=1), math.nan)


def load_reward_function(spec: str) -> RewardFunction:
    """The callable named by `"package.module:function"` (the command line's form; `module:Class.method`
    works too). The module is imported, which runs its code: name only modules you trust.

    Raises:
        ValueError: a spec without exactly one ':', a module that cannot be imported, a missing attribute,
            or an attribute that is not callable (each named).
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise ValueError(f"a reward function is named as 'module:function', got {spec!r}")
    module_name, attr = spec.split(":")
    try:
        target = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r} ({err})") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"reward function {spec!r}: {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"reward function {spec!r} is a {type(target).__name__}, not a callable")
    return target


def normalized_scores(rm, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      normalize: bool = True, clip: float | None = None) -> torch.Tensor:
    """A reward model's scores of whole sequences (prompt + completion), without gradients and in eval mode:
    `rm.normalize(scores)` (its stored mean / std from `calibrate`) unless `normalize=False`, then clipped to
    [-clip, clip] when `clip` is given.

    Raises:
        ValueError: a clip that is not a finite number > 0.
    """
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                             or not 0 < clip < math.inf):
        raise ValueError(f"reward clip must be a finite number > 0 or None, got {clip!r}")
    was = rm.training
    rm.eval()
    try:
        with torch.no_grad():
            scores = rm(input_ids, attention_mask).float()
    finally:
        rm.train(was)
    if normalize:
        scores = rm.normalize(scores)
    return scores if clip is None else scores.clamp(-clip, clip)


def _texts(ids: list[list[int]], tokenizer) -> list:
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids] if tokenizer is not None else ids


def rollout_rewards(functions: Sequence[RewardFunction], prompts: list[dict], rollout, weights=None,
                    tokenizer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward functions' verdicts on a rollout's completions: ((N,) weighted sums, (N, F) matrix).

    Args:
        functions: reward functions (see the module docstring).
        prompts: the prompt examples the rollout sampled (`tt.data.load_prompts`), `rollout.group_size`
            completions each; their "prompt" text (else ids) is what the functions see as prompts, and
            every other field they all share (e.g. "answer") is passed on, one entry per completion.
        rollout: a `Rollout` of those prompts.
        weights: one weight per function (None: 1.0 each).
        tokenizer: decodes completions for the functions (None: they get token id lists).

    Returns:
        (rewards, matrix): the weighted `nansum` over functions (a None is no opinion; a completion no
        function scored gets 0), and each function's value (NaN for None).
    """
    from .rollout import completions  # (rollout imports the data layer; keep this module light)

    g = rollout.group_size
    prompt_texts = [p.get("prompt", p["prompt_ids"]) for p in prompts for _ in range(g)]
    extra_keys = sorted(set.intersection(*(set(p) for p in prompts)) - {"prompt", "prompt_ids"})
    extra = {k: [p[k] for p in prompts for _ in range(g)] for k in extra_keys}
    matrix = reward_matrix(functions, prompt_texts, _texts(completions(rollout), tokenizer), **extra)  # (N, F)
    w = torch.tensor(weights or [1.0] * matrix.shape[1], dtype=torch.float32)
    return torch.nansum(matrix * w, dim=1), matrix
