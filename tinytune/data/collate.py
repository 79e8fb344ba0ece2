"""Batching: dynamic padding, length-grouped batches, and packing short examples into full rows with
attention that does not cross example boundaries."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .encoding import IGNORE

# Per-token keys and their padding value. Segment 0 is padding; packed examples are numbered from 1.
PAD_VALUES = {"labels": IGNORE, "attention_mask": 0, "position_ids": 0, "segment_ids": 0}


def pad_batch(examples: list[dict], pad_token_id: int, *, pad_to_multiple_of: int | None = None,
              padding_side: str = "right", max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a list of example dicts to the longest one (rounded up to `pad_to_multiple_of`).

    Per-token keys (lists as long as `input_ids`) are padded: `input_ids` with `pad_token_id`, `labels` with
    -100, `attention_mask`/`position_ids`/`segment_ids` with 0, others with 0. An `attention_mask` is made
    when absent. Scalar keys (e.g. a classification `label`) are stacked.

    Args:
        examples: dicts with at least `input_ids`.
        pad_token_id: id for padded positions (never scored: labels there are -100).
        pad_to_multiple_of: round the padded length up to a multiple (tensor-core friendly shapes).
        padding_side: "right" (training) or "left" (generation).
        max_length: pad to exactly this length instead (rows longer than it raise).
    Returns:
        dict of (B, T) LongTensors for per-token keys and (B,) tensors for scalar keys.
    Raises:
        ValueError: no examples, pad_token_id None, a row longer than max_length, a per-token key whose
            length differs from input_ids, keys differing between examples, a bad padding_side.
    """
    if not examples:
        raise ValueError("pad_batch got no examples")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set one (e.g. the tokenizer's eos_token_id)")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    keys = set(examples[0])
    for i, ex in enumerate(examples):
        if set(ex) != keys:
            raise ValueError(f"example {i} has keys {sorted(ex)}, example 0 has {sorted(keys)}")
    lengths = [len(ex["input_ids"]) for ex in examples]
    target = _target_length(max(lengths), pad_to_multiple_of, max_length)
    batch = {}
    for key in sorted(keys | {"attention_mask"}):
        if key == "attention_mask" and key not in keys:
            rows = [[1] * n for n in lengths]
        else:
            rows = [ex[key] for ex in examples]
        if not isinstance(rows[0], (list, tuple)):
            batch[key] = torch.tensor(rows)
            continue
        fill = pad_token_id if key == "input_ids" else PAD_VALUES.get(key, 0)
        batch[key] = torch.tensor([_pad_row(row, n, target, fill, padding_side, key, i)
                                   for i, (row, n) in enumerate(zip(rows, lengths))], dtype=torch.long)
    return batch


def _target_length(longest: int, multiple: int | None, max_length: int | None) -> int:
    if max_length is not None:
        if longest > max_length:
            raise ValueError(f"a row has {longest} tokens, more than max_length={max_length}")
        return max_length
    if multiple is not None:
        if multiple < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {multiple}")
        return math.ceil(longest / multiple) * multiple
    return longest


def _pad_row(row, n: int, target: int, fill: int, side: str, key: str, index: int) -> list[int]:
    if len(row) != n:
        raise ValueError(f"example {index}: {key!r} has {len(row)} entries but input_ids has {n}")
    gap = [fill] * (target - n)
    return gap + list(row) if side == "left" else list(row) + gap


@dataclass
class Collator:
    """`pad_batch` as a DataLoader `collate_fn`: `DataLoader(ds, batch_size=8, collate_fn=Collator(pad_id))`."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_side: str = "right"

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return pad_batch(examples, self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of,
                         padding_side=self.padding_side)


class LengthGroupedSampler:
    """A batch sampler that puts examples of similar length together, so padding wastes little.

    Indices are shuffled (seeded), cut into mega-batches of `batch_size * group_factor`, each sorted by
    length and cut into batches; the batch order is then shuffled, so long and short batches interleave and
    the first batch is not always the longest. Use with `DataLoader(ds, batch_sampler=sampler, ...)`.

    Args:
        lengths: length of each example (e.g. `[len(ex["input_ids"]) for ex in ds]`).
        batch_size: examples per batch.
        seed: seeds the generator; call `set_epoch(e)` for a different, reproducible order each epoch.
        group_factor: batches per mega-batch (larger: tighter length grouping, less randomness).
        drop_last: drop the final smaller batch.
    """

    def __init__(self, lengths, batch_size: int, seed: int = 0, group_factor: int = 50, drop_last: bool = False):
        if batch_size < 1 or group_factor < 1:
            raise ValueError(f"batch_size and group_factor must be >= 1, got {batch_size} and {group_factor}")
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.group_factor, self.drop_last, self.epoch = group_factor, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        mega = self.batch_size * self.group_factor
        batches = []
        for start in range(0, len(order), mega):
            group = sorted(order[start:start + mega], key=lambda i: -self.lengths[i])
            batches += [group[i:i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.batch_size * self.group_factor)
        # only the last mega-batch can leave a short batch
        last = rest // self.batch_size if self.drop_last else math.ceil(rest / self.batch_size)
        return full * self.group_factor + last


def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Pack examples, in order, into rows of at most `max_length` tokens (greedy: a row is closed when the
    next example does not fit).

    Each packed row has `input_ids`, `labels`, `position_ids` (restarting at 0 for each example, so RoPE
    sees the same positions as unpacked) and `segment_ids` (1, 2, ... per example; padding gets 0). Attend
    with `segment_mask(batch["segment_ids"])` so no token sees another example. The first label of every
    example is set to -100: with the usual shifted loss it would be predicted from the previous example's
    last token, and unpacked it is never scored either.

    Raises:
        ValueError: an example longer than `max_length` (truncate or filter first), or without labels.
    """
    rows, current = [], None
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length={max_length}")
        if "labels" not in ex:
            raise ValueError(f"example {i} has no 'labels' (keys: {sorted(ex)})")
        if current is None or len(current["input_ids"]) + n > max_length:
            current = {"input_ids": [], "labels": [], "position_ids": [], "segment_ids": []}
            rows.append(current)
        segment = (current["segment_ids"][-1] if current["segment_ids"] else 0) + 1
        current["input_ids"] += ex["input_ids"]
        current["labels"] += [IGNORE] + list(ex["labels"][1:])
        current["position_ids"] += list(range(n))
        current["segment_ids"] += [segment] * n
    return rows


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask from (B, T) segment ids: True where query t may attend key s, i.e.
    s <= t and both are in the same segment. Returns a bool (B, 1, T, T) tensor (SDPA's `attn_mask` form).

    Padding (segment 0) forms its own block, so every query row keeps at least itself and SDPA never sees an
    all-False row (which would give NaN).
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be (batch, seq), got shape {tuple(segment_ids.shape)}")
    T = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return (same & causal)[:, None]  # (B, 1, T, T)
