"""From examples to device batches, in an order a checkpoint can resume exactly.

Padding itself is `tinytune.data.collate.pad_batch` (right padding, -100 labels, attention mask, and the
`position_ids` / `segment_ids` of packed rows); this module validates the examples, keeps the epoch
order and position, and moves batches to the device.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data.collate import pad_batch


def check_lm_example(example, index: int, where: str, task: str = "causal_lm") -> None:
    """Check one example of a built-in task (ValueError naming `where[index]`)."""
    target = "label" if task == "classification" else "labels"
    if not isinstance(example, dict) or "input_ids" not in example or target not in example:
        keys = sorted(example) if isinstance(example, dict) else type(example).__name__
        raise ValueError(f"{where}[{index}] must be a dict with 'input_ids' and {target!r}, got {keys} "
                         f"(TrainConfig.task={task!r})")
    if target == "label":
        label = example["label"]
        if isinstance(label, bool) or not isinstance(label, int) or label < 0 or not example["input_ids"]:
            raise ValueError(f"{where}[{index}]: 'label' must be a class id (int >= 0) and input_ids not "
                             f"empty; got label={label!r} and {len(example['input_ids'])} tokens")
        return
    n_ids, n_labels = len(example["input_ids"]), len(example["labels"])
    if n_ids != n_labels or n_ids == 0:
        raise ValueError(f"{where}[{index}]: input_ids has {n_ids} tokens, labels has {n_labels} "
                         "(they must be equally long and not empty)")


def check_data(data, where: str, task="causal_lm") -> int:
    """The number of examples in `data`, after checking each one for `task` (a `TrainConfig.task`: a
    built-in name or a `tt.train.Task`, whose `check_example` is used).

    Raises:
        ValueError: `data` is not a sequence or is empty, or an example does not fit the task: for the
            built-in tasks a dict with equally long, non-empty `input_ids` and `labels` (for
            "classification": non-empty `input_ids` and an int `label` >= 0); the message names `where[index]`.
    """
    from .tasks import resolve_task  # (tasks imports this module)

    check = resolve_task(task).check_example
    if not isinstance(data, Sequence) and not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise ValueError(f"{where} must be a sequence of examples (len and indexing), got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{where} is empty")
    for i in range(len(data)):
        check(data[i], i, where)
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


# `label` (one class id per example) is stacked into (B,); other keys (ids, text) stay behind.
_BATCH_KEYS = ("input_ids", "labels", "label", "position_ids", "segment_ids")


def collate(examples: list[dict], pad_token_id: int, device: str) -> dict[str, torch.Tensor]:
    """Right-pad `examples` (their batch keys only) into (B, T) LongTensors on `device`."""
    batch = pad_batch([{k: ex[k] for k in _BATCH_KEYS if k in ex} for ex in examples], pad_token_id)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
