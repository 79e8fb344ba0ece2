"""Parameter accounting: how many parameters a model has and how many of them train."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn


@dataclass
class ParameterCount:
    """Counts for one model; shared (tied) parameters are counted once.

    Attributes:
        trainable, total, frozen: parameter counts (`frozen = total - trainable`).
        rows: (top-level module name, trainable, total) for each top-level child with
            parameters; "(root)" holds parameters registered on the model itself.
    """

    trainable: int
    total: int
    rows: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def frozen(self) -> int:
        return self.total - self.trainable

    @property
    def trainable_fraction(self) -> float:
        """trainable / total (0.0 for a model without parameters)."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        width = max([len("module")] + [len(name) for name, _, _ in self.rows] + [len("total")])
        line = f"{{:<{width}}}  {{:>15}}  {{:>15}}  {{:>9}}"
        out = [line.format("module", "trainable", "total", "% trained")]
        out.append("-" * len(out[0]))
        for name, trainable, total in self.rows:
            out.append(line.format(name, f"{trainable:,}", f"{total:,}", _percent(trainable, total)))
        out.append("-" * len(out[0]))
        out.append(line.format("total", f"{self.trainable:,}", f"{self.total:,}", _percent(self.trainable, self.total)))
        out.append(f"frozen: {self.frozen:,}")
        return "\n".join(out)


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.4g}%" if whole else "-"


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count `model`'s parameters: trainable (requires_grad), total and frozen, per top-level module.

    Example: a bias-free `nn.Linear(512, 64)` has 32,768; with LoRA rank 8 it trains
    8 * (512 + 64) = 4,608.
    """
    seen: set[int] = set()
    rows = []

    def tally(params) -> tuple[int, int]:
        trainable = total = 0
        for p in params:
            if id(p) in seen:
                continue  # tied weights count once, under the first module that holds them
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    own = tally(model.parameters(recurse=False))
    if own[1]:
        rows.append(("(root)", *own))
    for name, child in model.named_children():
        trainable, total = tally(child.parameters())
        if total:
            rows.append((name, trainable, total))
    return ParameterCount(sum(r[1] for r in rows), sum(r[2] for r in rows), rows)
