"""What `fit` returns (`History`) and raises on a signal (`TrainingInterrupted`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class History:
    """What `fit` did.

    Attributes:
        losses: mean token loss of each optimizer step (NaN for a skipped step), steps 1..`step`.
        lrs: the learning rate each step used.
        metrics: the metrics of each step (a dict per step): "grad_norm" (the global gradient norm before
            clipping; the mean over the updates of a step with several), the task's (e.g. "rewards/margins"
            for DPO, means over the step's whole batch) and those callbacks' `on_step` returned.
        eval_steps, eval_losses: the steps evaluated at and the mean eval loss there.
        eval_metrics: the evaluation's metrics other than "loss" at each evaluation (a dict per entry of
            `eval_steps`: e.g. "perplexity", "accuracy"), and those callbacks' `on_evaluate` returned.
        skipped_steps: steps skipped for a non-finite loss or gradient norm (or nothing scored).
        step: optimizer steps done (counting those of a resumed run before this call).
        tokens_per_s: non-padding tokens per second of training in this call.
        stopped_reason: "completed", or why training stopped early.
        checkpoint: the last checkpoint written or resumed from (None without `out_dir`).
        stop_requested: set it to True in a callback to stop training after the current step.
    """

    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)
    eval_metrics: list[dict] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    step: int = 0
    tokens_per_s: float = 0.0
    stopped_reason: str = "completed"
    checkpoint: Path | None = None
    stop_requested: bool = False

    def _lists(self) -> dict:  # what a checkpoint keeps, so a resumed History is the whole run's
        return {k: list(getattr(self, k)) for k in ("losses", "lrs", "metrics", "eval_steps", "eval_losses",
                                                    "eval_metrics", "skipped_steps")}


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by `fit` after SIGINT/SIGTERM, once a checkpoint is saved; `.history` holds the run so far."""

    def __init__(self, message: str, history: History):
        super().__init__(message)
        self.history = history
