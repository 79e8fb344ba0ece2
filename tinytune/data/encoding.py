"""Tokenising rendered segments into (input_ids, labels) with exact loss masks, and the length policy.

The tokenizer is any object with `encode(text, add_special_tokens=...) -> list[int]` and `bos_token_id`,
`eos_token_id` attributes (`tinytune.models.Tokenizer` is one).
"""
from __future__ import annotations

from .records import RecordError
from .templates import Segment

IGNORE = -100  # label of a token that is not scored


def adds_bos(tokenizer) -> bool:
    """Whether `tokenizer.encode(text)` starts with BOS by default (Llama: yes, GPT-2: no)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    flag = getattr(tokenizer, "adds_bos_token", None)
    if isinstance(flag, bool):
        return flag
    try:  # a duck-typed tokenizer: probe it
        return tokenizer.encode("a", add_special_tokens=True)[:1] == [bos]
    except Exception:
        return False


def encode_segments(tokenizer, segments: list[Segment], add_bos: bool | None = None,
                    add_eos: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of the concatenated segments and labels that score exactly the `scored` segments.

    The ids equal `tokenizer.encode("".join(texts), add_special_tokens=False)`: the text is encoded prefix by
    prefix, and each new prefix's tokens past the common part with the previous encoding belong to the new
    segment. So a token that merges across a boundary (BPE can merge "x" + "y") belongs to the later segment,
    and masks never drift from the ids the model actually sees, as encoding segments separately would.

    Args:
        tokenizer: see the module docstring.
        segments: the rendered text pieces.
        add_bos: prepend `bos_token_id` (unscored) unless the text already starts with it; None: do so when
            the tokenizer adds BOS by default (`adds_bos`).
        add_eos: append `eos_token_id`, scored (the model learns to stop).
    Returns:
        (input_ids, labels), labels = id on scored tokens and -100 elsewhere.
    Raises:
        ValueError: add_eos with a tokenizer that has no `eos_token_id`.
    """
    ids: list[int] = []
    labels: list[int] = []
    text = ""
    for segment in segments:
        text += segment.text
        new = tokenizer.encode(text, add_special_tokens=False)
        keep = _common_prefix(ids, new)
        added = new[keep:]
        labels = labels[:keep] + (list(added) if segment.scored else [IGNORE] * len(added))
        ids = list(new)
    bos = getattr(tokenizer, "bos_token_id", None)
    if (adds_bos(tokenizer) if add_bos is None else add_bos) and bos is not None and ids[:1] != [bos]:
        ids, labels = [bos] + ids, [IGNORE] + labels
    if add_eos:
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError("add_eos needs a tokenizer with an eos_token_id, got None")
        ids, labels = ids + [eos], labels + [eos]
    return ids, labels


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def fit_length(example: dict, max_length: int | None, truncate: bool, per_token=("input_ids", "labels")) -> dict:
    """Apply the length policy to one example in place: cut its per-token lists to `max_length` when
    `truncate`, else reject it.

    Raises:
        RecordError: too long and not `truncate`; or, after truncation, no scored label is left (a row that
            would train nothing is a bad record, not a silent no-op).
    """
    n = len(example["input_ids"])
    if max_length is None or n <= max_length:
        return example
    if not truncate:
        raise RecordError(f"{n} tokens, more than max_length={max_length} (pass truncate=True to cut)")
    for key in per_token:
        if key in example:
            example[key] = example[key][:max_length]
    if "labels" in example and all(label == IGNORE for label in example["labels"]):
        raise RecordError(f"no scored tokens left after truncation to max_length={max_length} ({n} tokens)")
    return example
