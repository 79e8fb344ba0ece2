"""Autoregressive generation with a preallocated KV cache: greedy, or sampling with temperature,
top-k and top-p; batched with left padding; per-row EOS stop.

The decode loop is kept lean because on CPU the per-token Python overhead is a large share of a
small model's step: the cache, the output ids, the attention mask and the log-probabilities are
allocated once for the whole generation and only sliced or written in place afterwards; the
model computes logits for the last position only (`logits_to_keep=1`); positions of new tokens
are passed directly, so the model does not re-derive them from the mask each step; and with no
padding no mask is passed at all, so attention runs unmasked.
"""
from __future__ import annotations

import contextlib
import math
import numbers

import torch

from .._check import FieldError
from .transformer import CausalLM, check_token_ids


def generate(model: CausalLM, input_ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
             attention_mask: torch.Tensor | None = None, seed: int | None = None,
             pad_token_id: int | None = None, return_logprobs: bool = False, merge_lora: bool = True):
    """Continue each row of `input_ids` by up to `max_new_tokens` tokens.

    Args:
        model: a `CausalLM` (any dtype or device; the inputs are moved to its device). When it
            has an int attribute `num_virtual_tokens` = P (set by prompt or prefix tuning), the
            cache gets P more slots (a soft prompt is cached like tokens) and P more positions
            count against `max_position_embeddings`; the method's hooks do the rest.
        input_ids: (B, P) LongTensor of prompts. Batches of unequal prompts are left padded.
        max_new_tokens: the most tokens to add per row (>= 1).
        temperature: 0 for greedy decoding (argmax); > 0 divides the logits before sampling.
        top_k: sample only among the k most likely tokens (None: no limit).
        top_p: nucleus sampling: sample among the smallest set of most likely tokens whose
            probability reaches top_p (always at least one token). 1.0 disables it.
        eos_token_id: an id or a list of ids that end a row. None: `model.config.eos_token_ids`;
            pass `[]` to never stop early.
        attention_mask: (B, P) with 1 for real tokens and 0 for (left) padding. None: all real.
        seed: seeds a private `torch.Generator` so sampling is reproducible and leaves the global
            RNG untouched. None: sample from torch's global RNG.
        pad_token_id: written after a row's EOS. None: `model.config.pad_token_id`, else the
            first EOS id, else 0.
        return_logprobs: also return the log-probability of each generated token.
        merge_lora: enter each module's `generation_context()` for the whole call (a duck-typed
            protocol: LoRA layers then compute with `W + s B A` merged once, one matmul per step
            instead of three; base weights are not written). Costs one extra copy of each adapted
            weight during the call; False keeps the unmerged path (and that memory).

    Returns:
        ids: (B, P + n) LongTensor, the prompts followed by the n generated tokens, where n is
        `max_new_tokens`, or fewer when every row reached EOS earlier.
        With `return_logprobs=True`, `(ids, logprobs)` where logprobs (B, n) float32 holds
        `log_softmax(logits)[token]` of the *raw* logits, i.e. under the model's own distribution
        at temperature 1 before any top-k/top-p filtering (the policy log-probability PPO
        needs, whatever sampling settings produced the token); 0.0 after a row finished.

    Raises:
        ValueError: max_new_tokens or top_k not an int >= 1, temperature not a finite number >= 0,
            top_p not in (0, 1] (NaN included), seed not an int, eos/pad ids that are not ints (pad:
            in the vocabulary), input_ids not a 2-D integer tensor, ids outside the vocabulary,
            attention_mask not of input_ids' shape, or prompt (+ virtual tokens) + max_new_tokens
            beyond `config.max_position_embeddings` (learned positions and RoPE alike).
    """
    _check_arguments(model, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask, seed)
    if not isinstance(merge_lora, bool):
        raise FieldError(f"merge_lora must be True or False, got {merge_lora!r}")
    eos_ids = _eos_ids(model, eos_token_id)
    pad = _pad_id(model, pad_token_id, eos_ids)
    with torch.inference_mode(), _generation_contexts(model, merge_lora):
        return _generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_ids, attention_mask,
                         seed, pad, return_logprobs)


@contextlib.contextmanager
def _generation_contexts(model, enabled: bool):
    """Every module's `generation_context()` (a method some PEFT layers offer, found by duck typing:
    models never import peft), entered for the whole call; entered under inference mode, so a layer
    sees grad disabled and may cache what stays fixed while generating."""
    with contextlib.ExitStack() as stack:
        for module in model.modules() if enabled else ():
            context = getattr(module, "generation_context", None)
            if callable(context):
                stack.enter_context(context())
        yield


def _check_arguments(model, input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask,
                     seed=None) -> None:
    """Every argument checked before anything is allocated; ValueError naming the argument and its value."""
    _check_prompt(input_ids, attention_mask)
    _check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    cfg = model.config
    virtual = _virtual_tokens(model)
    total = input_ids.shape[1] + max_new_tokens + virtual
    # Learned positions (GPT-2) have no row past the table; RoPE models are refused past their trained
    # context too, as the model's forward does (it names the same limit).
    if total > cfg.max_position_embeddings:
        extra = f" + {virtual} virtual tokens" if virtual else ""
        raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}){extra} = {total} exceeds "
                         f"max_position_embeddings={cfg.max_position_embeddings} of this {cfg.model_type} model")


def _check_prompt(input_ids, attention_mask) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 2-D (batch, seq) tensor, got {shape}")
    check_token_ids(input_ids)
    if input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must hold at least one token per row, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or tuple(attention_mask.shape) != tuple(input_ids.shape)):
        is_tensor = isinstance(attention_mask, torch.Tensor)
        shape = tuple(attention_mask.shape) if is_tensor else type(attention_mask).__name__
        raise ValueError(f"attention_mask shape {shape} does not match input_ids shape {tuple(input_ids.shape)}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_sampling(max_new_tokens, temperature, top_k, top_p, seed) -> None:
    if not _is_int(max_new_tokens):
        raise FieldError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r} "
                         f"({type(max_new_tokens).__name__})")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    # Written so that NaN fails every test: `nan < 0` is False, `not nan >= 0` is True.
    if not _is_real(temperature) or not (math.isfinite(temperature) and temperature >= 0):
        raise FieldError(f"temperature must be >= 0 (0 = greedy) and finite, got {temperature!r}")
    if top_k is not None and not _is_int(top_k):
        raise FieldError(f"top_k must be an int >= 1 or None, got {top_k!r} ({type(top_k).__name__})")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if not _is_real(top_p) or not 0.0 < top_p <= 1.0:  # NaN fails the comparison
        raise FieldError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and not (_is_int(seed) and -2**63 <= seed < 2**64):
        raise FieldError(f"seed must be an int (a torch.Generator seed) or None, got {seed!r} ({type(seed).__name__})")


def _virtual_tokens(model) -> int:
    """`model.num_virtual_tokens`: positions a PEFT method (prompt or prefix tuning) puts before the real
    tokens; they take positions 0..P-1, and a soft prompt's take KV-cache slots too. 0 when unset."""
    return int(getattr(model, "num_virtual_tokens", 0) or 0)


def _eos_ids(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        return model.config.eos_token_ids
    ids = [eos_token_id] if not isinstance(eos_token_id, (list, tuple)) else list(eos_token_id)
    if not all(_is_int(i) for i in ids):
        raise FieldError(f"eos_token_id must be an int, a list of ints, or None, got {eos_token_id!r}")
    return [int(i) for i in ids]


def _pad_id(model, pad_token_id, eos_ids: list[int]) -> int:
    """The id written after a row's EOS; it is fed back to the model, so it must be a token id."""
    if pad_token_id is not None:
        pad, source = pad_token_id, "pad_token_id"
    elif model.config.pad_token_id is not None:
        pad, source = model.config.pad_token_id, "model.config.pad_token_id"
    else:
        pad, source = (eos_ids[0], "the first eos_token_id") if eos_ids else (0, "")
    vocab = model.config.vocab_size
    if not _is_int(pad) or not 0 <= pad < vocab:
        raise FieldError(f"{source} must be a token id in [0, {vocab}) (the padding written after EOS), got {pad!r}")
    return int(pad)


def _generate(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_ids, attention_mask, seed, pad,
              return_logprobs):
    device = model.model.embed_tokens.weight.device
    B, P = input_ids.shape
    S = P + max_new_tokens
    out = torch.full((B, S), pad, dtype=torch.long, device=device)  # prompts, then new tokens
    out[:, :P] = input_ids
    mask = _mask_buffer(attention_mask, B, P, S, device)
    logprobs = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device) if return_logprobs else None
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None and temperature > 0 else None
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    pick = _Sampler(temperature, top_k, top_p, generator)
    cache = model.new_cache(B, S + _virtual_tokens(model))  # a soft prompt's virtual tokens are cached too
    # Prefill: the model derives positions from the mask (left padding counts nothing).
    logits = model(out[:, :P], attention_mask=None if mask is None else mask[:, :P], cache=cache,
                   logits_to_keep=1)[:, -1]
    # Position of the next token = real tokens before it; kept in one tensor advanced in place.
    position = (mask[:, :P].sum(-1, keepdim=True) if mask is not None
                else torch.full((B, 1), P, dtype=torch.long, device=device))
    steps = 0
    for t in range(max_new_tokens):
        token = pick(logits)  # (B,)
        if logprobs is not None:
            logprobs[:, t] = torch.where(unfinished, _token_logprobs(logits, token), 0.0)
        if eos is not None:
            token = torch.where(unfinished, token, pad)
            unfinished &= ~torch.isin(token, eos)
        out[:, P + t] = token
        steps = t + 1
        if t + 1 == max_new_tokens or (eos is not None and not bool(unfinished.any())):
            break
        logits = model(out[:, P + t:P + t + 1], attention_mask=None if mask is None else mask[:, :P + t + 1],
                       position_ids=position, cache=cache, logits_to_keep=1)[:, -1]
        position += 1
    ids = out[:, :P + steps]
    return (ids, logprobs[:, :steps]) if return_logprobs else ids


def _mask_buffer(attention_mask, B: int, P: int, S: int, device) -> torch.Tensor | None:
    """(B, S) mask: the prompt's, then ones for every new token; None when nothing is padded."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    mask = torch.ones(B, S, dtype=torch.long, device=device)
    mask[:, :P] = attention_mask
    return mask


def _token_logprobs(logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[token] per row, in fp32: (B, V), (B,) -> (B,)."""
    logits = logits.float()
    return logits.gather(-1, token[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


class _Sampler:
    """Next token from last-position logits (B, V): argmax at temperature 0, else a filtered sample."""

    def __init__(self, temperature: float, top_k: int | None, top_p: float, generator):
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return logits.argmax(-1)
        scores = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[:, -1:]  # (B, 1) smallest kept score
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            scores = _top_p_filter(scores, self.top_p)
        probs = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """-inf outside the nucleus: keep a token while the mass of the more likely ones is < top_p."""
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_scores, dim=-1)
    mass_before = probs.cumsum(-1) - probs  # 0 for the most likely token: it is always kept
    drop_sorted = mass_before >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))
