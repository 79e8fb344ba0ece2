"""Rollouts for online RL (PPO, GRPO): completions sampled from the policy, with their log-probs and masks.

`generate_rollouts` repeats each prompt `group_size` times (adjacent rows, as GRPO groups them), left pads
the prompts and samples every chunk of rows with one batched `tt.generate` (KV cache, per-row stop, an early
exit once every row has stopped). The result is laid out for the trainers:

    input_ids       (N, P+T)  prompts left padded to P, then the T generated columns (pad after a stop)
    attention_mask  (N, P+T)  1 on real prompt tokens and on completion_mask
    completion_mask (N, P+T)  1 on generated tokens up to and including the first stop token
    logprobs        (N, T)    log p(input_ids[:, P + t]) under the model at temperature 1, 0 where masked

so that `token_logprobs(model, input_ids, attention_mask)[:, P - 1:]` recomputes `logprobs` on the mask: the
identity PPO's ratio relies on. The log-probs are those of the model's own distribution (raw logits), whatever
temperature / top-k / top-p drew the token, as `tt.generate` returns them.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..models.generate import generate
from .tasks import eval_mode


@dataclass
class Rollout:
    """Sampled completions of a batch of prompts (see the module docstring for the layout).

    Attributes:
        input_ids: (N, P+T) long, left-padded prompts then completions.
        attention_mask: (N, P+T) long, 1 on real prompt tokens and completion tokens up to the stop.
        completion_mask: (N, P+T) long, 1 on generated tokens up to and including the first stop token.
        logprobs: (N, T) float32, sampling log-prob of token `input_ids[:, P + t]` (0 where masked).
        prompt_length: P, the padded prompt width.
        ended: (N,) bool, the completion ended with a stop token within max_new_tokens.
        prompt_index: (N,) long, the prompt each row came from (row i * G + g for prompt i).
        completion_lengths: (N,) long, generated tokens per row (the stop token included).
        group_size: G, completions per prompt.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    prompt_length: int
    ended: torch.Tensor
    prompt_index: torch.Tensor
    completion_lengths: torch.Tensor
    group_size: int = 1


def completions(rollout: Rollout) -> list[list[int]]:
    """Each row's generated ids, up to and including its stop token (no padding)."""
    P = rollout.prompt_length
    ids = rollout.input_ids[:, P:].tolist()
    return [row[:n] for row, n in zip(ids, rollout.completion_lengths.tolist())]


def eos_penalty(rollout: Rollout, scores, penalty: float) -> torch.Tensor:
    """Scores with `penalty` subtracted on rows that did not end with a stop token (truncated completions).

    Args:
        rollout: the rollout the scores belong to.
        scores: (N,) numbers (tensor or sequence), one per row.
        penalty: a finite float >= 0.
    Returns:
        (N,) float32 tensor on the rollout's device: `scores - penalty` where `~rollout.ended`, else `scores`.
    Raises:
        ValueError: a bad penalty, or scores of another length than the rollout's rows.
    """
    if not _is_real(penalty) or not (math.isfinite(penalty) and penalty >= 0):
        raise ValueError(f"penalty must be a finite number >= 0, got {penalty!r}")
    scores = torch.as_tensor(scores, dtype=torch.float32, device=rollout.ended.device)
    if tuple(scores.shape) != tuple(rollout.ended.shape):
        raise ValueError(f"scores must be one per rollout row, shape {tuple(rollout.ended.shape)}, "
                         f"got {tuple(scores.shape)}")
    return torch.where(rollout.ended, scores, scores - float(penalty))


def generate_rollouts(model, prompts: list[list[int]], group_size: int = 1, max_new_tokens: int = 64,
                      temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                      stop_token_ids: list[int] | None = None, pad_token_id: int | None = None,
                      seed: int | None = None, batch_size: int | None = None) -> Rollout:
    """Sample `group_size` completions of every prompt with `tt.generate`, in eval mode, without gradients.

    Args:
        model: a tinytune `CausalLM` (its train/eval mode is restored afterwards).
        prompts: token ids of each prompt (e.g. `[ex["prompt_ids"] for ex in tt.data.load_prompts(...)]`).
        group_size: completions per prompt G (rows i * G .. i * G + G - 1 belong to prompt i).
        max_new_tokens, temperature, top_k, top_p: as in `tt.generate` (temperature 0 is greedy).
        stop_token_ids: ids that end a completion (None: `model.config.eos_token_ids`; `[]`: never stop).
            For chat prompts pass the template's end-of-turn id too (e.g. `<|im_end|>` for chatml).
        pad_token_id: the id left-padding prompts and written after a stop (None: the config's pad id, else
            the first stop id, else 0); padding is masked, so it only has to be in the vocabulary.
        seed: seeds sampling (the global RNG is untouched); chunk c is sampled with seed + c, so a result
            depends on `batch_size` as well as on the seed (greedy decoding does not).
        batch_size: rows per `generate` call (None: all N = len(prompts) * group_size at once).
    Returns:
        a `Rollout`.
    Raises:
        ValueError: prompts not a non-empty list of non-empty lists of token ids in the vocabulary; group_size,
            batch_size or max_new_tokens not an int >= 1; temperature not finite >= 0; bad stop or pad ids;
            prompt + max_new_tokens beyond the model's positions; anything else `tt.generate` refuses.
    """
    _check_arguments(model, prompts, group_size, max_new_tokens, temperature, batch_size)
    stops = _stop_ids(model, stop_token_ids)
    pad = _pad_id(model, pad_token_id, stops)
    rows = [list(p) for p in prompts for _ in range(group_size)]  # adjacent rows per prompt
    chunk = batch_size or len(rows)
    with eval_mode(model), torch.no_grad():
        parts = [_sample_chunk(model, rows[i:i + chunk], pad, stops, max_new_tokens, temperature, top_k, top_p,
                               None if seed is None else seed + i // chunk)
                 for i in range(0, len(rows), chunk)]
    return _assemble(parts, stops, pad, group_size)


def _sample_chunk(model, rows, pad, stops, max_new_tokens, temperature, top_k, top_p, seed):
    """(prompt ids (B, P_c), prompt mask, generated ids (B, T_c), log-probs (B, T_c)) of one chunk."""
    device = model.model.embed_tokens.weight.device
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):  # left padding
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    ids, mask = ids.to(device), mask.to(device)
    out, logprobs = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, eos_token_id=stops, attention_mask=mask, seed=seed, pad_token_id=pad,
                             return_logprobs=True)
    # generate runs under inference_mode: clone into ordinary tensors that autograd may later read
    return ids.clone(), mask.clone(), out[:, width:].clone(), logprobs.clone()


def _assemble(parts, stops: list[int], pad: int, group_size: int) -> Rollout:
    """One Rollout from the chunks: prompts left padded to the widest, completions right padded to the longest."""
    P = max(p[0].shape[1] for p in parts)
    T = max(p[2].shape[1] for p in parts)
    N = sum(p[0].shape[0] for p in parts)
    device = parts[0][0].device
    input_ids = torch.full((N, P + T), pad, dtype=torch.long, device=device)
    prompt_mask = torch.zeros(N, P, dtype=torch.long, device=device)
    generated = torch.full((N, T), pad, dtype=torch.long, device=device)  # pad past a chunk's early exit
    logprobs = torch.zeros(N, T, dtype=torch.float32, device=device)
    start = 0
    for ids, mask, gen, lp in parts:
        rows = slice(start, start + ids.shape[0])
        input_ids[rows, P - ids.shape[1]:P] = ids
        prompt_mask[rows, P - ids.shape[1]:] = mask
        generated[rows, :gen.shape[1]] = gen
        logprobs[rows, :gen.shape[1]] = lp
        start += ids.shape[0]
    lengths, ended = _completion_lengths(generated, stops)
    keep = torch.arange(T, device=device)[None, :] < lengths[:, None]  # (N, T)
    input_ids[:, P:] = generated
    completion_mask = torch.cat([torch.zeros_like(prompt_mask), keep.long()], dim=1)
    return Rollout(input_ids=input_ids, attention_mask=torch.cat([prompt_mask, keep.long()], dim=1),
                   completion_mask=completion_mask, logprobs=logprobs * keep, prompt_length=P, ended=ended,
                   prompt_index=torch.arange(N, device=device) // group_size, completion_lengths=lengths,
                   group_size=group_size)


def _completion_lengths(generated: torch.Tensor, stops: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(lengths up to and including the first stop token, whether a stop token came): (N, T) -> (N,), (N,)."""
    N, T = generated.shape
    if not stops:
        return torch.full((N,), T, dtype=torch.long, device=generated.device), \
            torch.zeros(N, dtype=torch.bool, device=generated.device)
    is_stop = torch.isin(generated, torch.tensor(stops, dtype=torch.long, device=generated.device))
    ended = is_stop.any(-1)
    first = is_stop.long().argmax(-1)  # the first True (0 when none: overridden below)
    return torch.where(ended, first + 1, T), ended


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_arguments(model, prompts, group_size, max_new_tokens, temperature, batch_size) -> None:
    """ValueError naming the argument, before anything is sampled (the rest is checked by `tt.generate`,
    on the first chunk, before any work)."""
    for name, value in (("group_size", group_size), ("max_new_tokens", max_new_tokens)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
    if not _is_real(temperature) or not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(prompts, (list, tuple)) or not prompts:
        got = repr(prompts) if isinstance(prompts, (list, tuple)) else type(prompts).__name__
        raise ValueError(f"prompts must be a non-empty list of token-id lists, got {got}")
    vocab = model.config.vocab_size
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, (list, tuple)) or not all(_is_int(t) for t in prompt):
            raise ValueError(f"prompts[{i}] must be a list of int token ids, got {type(prompt).__name__}")
        if not prompt:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        if not all(0 <= t < vocab for t in prompt):
            bad = next(t for t in prompt if not 0 <= t < vocab)
            raise ValueError(f"prompts[{i}] holds token id {bad}, outside the vocabulary [0, {vocab})")
    longest = max(len(p) for p in prompts) + int(getattr(model, "num_virtual_tokens", 0) or 0)
    if longest + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_position_embeddings={model.config.max_position_embeddings}")


def _stop_ids(model, stop_token_ids) -> list[int]:
    """The stop ids: the given list (ints in the vocabulary), or the config's EOS ids."""
    if stop_token_ids is None:
        return list(model.config.eos_token_ids)
    ids = [stop_token_ids] if _is_int(stop_token_ids) else stop_token_ids
    vocab = model.config.vocab_size
    if not isinstance(ids, (list, tuple, set, frozenset)) or not all(_is_int(i) and 0 <= i < vocab for i in ids):
        raise ValueError(f"stop_token_ids must be None, an id or a list of ids in [0, {vocab}), got {stop_token_ids!r}")
    return sorted(int(i) for i in ids)


def _pad_id(model, pad_token_id, stops: list[int]) -> int:
    """The padding id: given, the config's, the first stop id, else 0 (checked in the vocabulary)."""
    if pad_token_id is None:
        pad_token_id = model.config.pad_token_id
        pad_token_id = pad_token_id if pad_token_id is not None else (stops[0] if stops else 0)
    vocab = model.config.vocab_size
    if not _is_int(pad_token_id) or not 0 <= pad_token_id < vocab:
        raise ValueError(f"pad_token_id must be a token id in [0, {vocab}), got {pad_token_id!r}")
    return int(pad_token_id)
