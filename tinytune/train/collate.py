"""From examples to device batches, in an order a checkpoint can resume exactly.

Padding itself is `tinytune.data.collate.pad_batch` (right padding, -100 labels, attention mask, and the
`position_ids` / `segment_ids` of packed rows); this module validates the examples, keeps the epoch
order and position, and moves batches to the device.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.collate import pad_batch


def _check_example(example, index: int, where: str) -> None:
    if not isinstance(example, dict) or "input_ids" not in example or "labels" not in example:
        keys = sorted(example) if isinstance(example, dict) else type(example).__name__
        raise ValueError(f"{where}[{index}] must be a dict with 'input_ids' and 'labels', got {keys}")
    n_ids, n_labels = len(example["input_ids"]), len(example["labels"])
    if n_ids != n_labels or n_ids == 0:
        raise ValueError(f"{where}[{index}]: input_ids has {n_ids} tokens, labels has {n_labels} "
                         "(they must be equally long and not empty)")


def check_data(data, where: str) -> int:
    """The number of examples in `data`, after checking each one.

    Raises:
        ValueError: `data` is not a sequence or is empty, or an example is not a dict with equally long,
            non-empty `input_ids` and `labels`; the message names `where[index]`.
    """
    if not isinstance(data, Sequence) and not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise ValueError(f"{where} must be a sequence of examples (len and indexing), got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{where} is empty")
    for i in range(len(data)):
        _check_example(data[i], i, where)
    return len(data)


class DataStream:
    """Endless example indices over epochs; epoch `e`'s order depends only on (seed, e), so a
    position (epoch, index) is all a checkpoint needs to continue exactly."""

    def __init__(self, n: int, seed: int, shuffle: bool, epoch: int = 0, index: int = 0):
        self.n, self.seed, self.shuffle, self.epoch, self.index = n, seed, shuffle, epoch, index
        self._order = self._epoch_order(epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)  # its own RNG: global state untouched
        return torch.randperm(self.n, generator=gen).tolist()

    def take(self, k: int) -> list[int]:
        """The next `k` example indices, running on into the next epoch when this one ends."""
        out = []
        while len(out) < k:
            if self.index == self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            out.append(self._order[self.index])
            self.index += 1
        return out

    def position(self) -> dict:
        """Where the stream stands: what a checkpoint stores to continue from here."""
        return {"epoch": self.epoch, "index": self.index, "num_examples": self.n}


_BATCH_KEYS = ("input_ids", "labels", "position_ids", "segment_ids")  # other keys (ids, text) stay behind


def collate(examples: list[dict], pad_token_id: int, device: str) -> dict[str, torch.Tensor]:
    """Right-pad `examples` (their batch keys only) into (B, T) LongTensors on `device`."""
    batch = pad_batch([{k: ex[k] for k in _BATCH_KEYS if k in ex} for ex in examples], pad_token_id)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
