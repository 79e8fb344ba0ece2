"""Per-token log-probabilities of a sequence under a causal LM: what every preference loss starts from.

`token_logprobs(model, ids)[:, t] = log p(ids[:, t + 1] | ids[:, :t + 1])`. On a tinytune `CausalLM`
whose head is a plain bias-free `nn.Linear` (`CausalLM.chunked_head_weight`) it runs the model to
its final hidden states and takes them to `tinytune.ops.linear_token_logprobs`, which never holds the
(B, T, V) logits in forward or backward. Any other causal LM (a module returning logits, or an object
with `.logits` as transformers models do) takes the plain `log_softmax(logits).gather` path.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..ops.token_logprobs import linear_token_logprobs
from ..train.losses import IGNORE_INDEX

DEFAULT_CHUNK = 512  # rows per chunk of the fused path


def _scored(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T-1) bool: position t is scored when its target t + 1 and its own token t are real tokens."""
    if attention_mask is None:
        return torch.ones_like(input_ids[:, 1:], dtype=torch.bool)
    real = attention_mask.bool()  # (B, T)
    return real[:, 1:] & real[:, :-1]


def chunked_head_weight(model: nn.Module) -> torch.Tensor | None:
    """The head weight to apply to `model(ids, return_hidden=True)` states, when the model offers it (a tinytune
    `CausalLM` with a plain head: `CausalLM.chunked_head_weight`); None: take the logits."""
    offer = getattr(model, "chunked_head_weight", None)
    return offer() if callable(offer) else None


def _check(input_ids, attention_mask, chunk_size) -> None:
    """Raise ValueError for ids that are not (B, T >= 2) integers, a mask of another shape, a bad chunk."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 2 \
            or input_ids.is_floating_point():
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer (B, T) tensor with T >= 2, got {shape}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must be (B, T) = {tuple(input_ids.shape)} (1 = token, 0 = padding), "
                         f"got {tuple(attention_mask.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")


def _logits_of(output) -> torch.Tensor:
    """The (B, T, V) logits of a model's output: the tensor itself or its `.logits`."""
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise TypeError(f"the model must return (B, T, V) logits or an object with .logits, got "
                        f"{type(output).__name__}{'' if logits is None else ' ' + str(tuple(logits.shape))}")
    return logits


def _from_logits(logits: torch.Tensor, input_ids: torch.Tensor, return_entropy: bool):
    """(B, T-1) log-probs (and entropies) from (B, T, V) logits, in fp32 (fp64 for fp64 logits)."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    logp = F.log_softmax(logits[:, :-1].to(acc), dim=-1)  # (B, T-1, V)
    lp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return (lp, -(logp.exp() * logp).sum(-1)) if return_entropy else (lp, None)


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   chunk_size: int | None = None, return_entropy: bool = False):
    """Log-probability of every next token: `out[:, t] = log p(input_ids[:, t + 1] | input_ids[:, :t + 1])`.

    Padding: with an `attention_mask` (1 = token, 0 = padding; left or right padding), position t is
    0 (log-prob and entropy, with no gradient) unless both token t and its target t + 1 are real, so a
    sum over t is the log-probability of the real continuation. Sum `out * completion_mask[:, 1:]` to
    score a completion only.

    Args:
        model: a tinytune `CausalLM` (fused, chunked path when its head is a plain bias-free Linear), or
            any module mapping `(input_ids, attention_mask=...)` to (B, T, V) logits or an object with
            `.logits` (the mask is passed only when given).
        input_ids: (B, T) token ids, T >= 2.
        attention_mask: (B, T), or None for no padding.
        chunk_size: rows of B*T per chunk on the fused path (None: 512); ignored on the logits path.
        return_entropy: also return the entropy (B, T-1) of each next-token distribution.

    Returns:
        logprobs (B, T-1) in fp32 (fp64 for an fp64 model), or (logprobs, entropy) when return_entropy.

    Raises:
        ValueError: input_ids not an integer (B, T >= 2) tensor, a mask of another shape, chunk_size < 1.
        TypeError: the model's output is neither (B, T, V) logits nor has `.logits`.
    """
    _check(input_ids, attention_mask, chunk_size)
    scored = _scored(input_ids, attention_mask)  # (B, T-1)
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    # a DistributedDataParallel wrapper is run (it syncs the gradients), its module's head is looked up
    weight = chunked_head_weight(model.module if isinstance(model, DistributedDataParallel) else model)
    if weight is not None:
        hidden = model(input_ids, return_hidden=True, **kwargs)  # (B, T, d)
        # shift on the targets, not on hidden (no (B, T-1, d) copy): the last column is ignored
        targets = F.pad(input_ids[:, 1:].masked_fill(~scored, IGNORE_INDEX), (0, 1), value=IGNORE_INDEX)
        out = linear_token_logprobs(hidden, weight, targets, chunk_size or DEFAULT_CHUNK,
                                    IGNORE_INDEX, return_entropy)
        lp, ent = out if return_entropy else (out, None)
        lp, ent = lp[:, :-1], None if ent is None else ent[:, :-1]
    else:
        lp, ent = _from_logits(_logits_of(model(input_ids, **kwargs)), input_ids, return_entropy)
        lp, ent = lp.masked_fill(~scored, 0.0), None if ent is None else ent.masked_fill(~scored, 0.0)
    return (lp, ent) if return_entropy else lp
