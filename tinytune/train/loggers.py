"""Experiment trackers `fit` reports to (`TrainConfig.report_to`): TensorBoard and Weights & Biases.

Each is one small object with `log(metrics, step)` and `close()`; names are "train/<metric>" and
"eval/<metric>". Their packages are imported only when asked for, and `check_available` runs at the
start of `fit`, before the model or any file changes, so a missing package fails the run at once.
"""
from __future__ import annotations

import importlib
import math
from pathlib import Path

REPORTERS = ("tensorboard", "wandb")
_PACKAGES = {"tensorboard": ("tensorboard", "torch.utils.tensorboard"), "wandb": ("wandb",)}


def _import(reporter: str):
    """Import what `reporter` needs; the last module imported is returned."""
    module = None
    for name in _PACKAGES[reporter]:
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            raise ImportError(f"TrainConfig.report_to includes {reporter!r}, but the {reporter} package is not "
                              f"installed ({err}): pip install {reporter}") from err
    return module


def check_available(report_to) -> None:
    """Raise ImportError (naming the package and the pip command) for a requested tracker that is missing."""
    for reporter in report_to:
        _import(reporter)


def _numbers(metrics: dict) -> dict:
    """The finite numbers of `metrics` as floats (trackers take scalars; NaN marks a skipped step)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


class TensorBoardLogger:
    """Scalars into a TensorBoard event file under `log_dir` (`torch.utils.tensorboard.SummaryWriter`).

    Args:
        log_dir: the run's directory (`out_dir/runs` by default in `fit`).
        purge_step: a resumed run's first new step: events a killed run wrote at or after it are dropped.
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        self.writer = _import("tensorboard").SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, metrics: dict, step: int) -> None:
        """Add each finite scalar of `metrics` at `step`."""
        for key, value in _numbers(metrics).items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run: `wandb.init(project, name, config, dir)`, then `wandb.log(metrics, step=step)`."""

    def __init__(self, project: str, name: str | None, config: dict, out_dir: str | Path | None):
        self.wandb = _import("wandb")
        self.run = self.wandb.init(project=project, name=name, config=config,
                                   dir=str(out_dir) if out_dir is not None else None)

    def log(self, metrics: dict, step: int) -> None:
        """Log the finite scalars of `metrics` at `step`."""
        numbers = _numbers(metrics)
        if numbers:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        """Finish the run (uploads what is left)."""
        self.wandb.finish()


def build_loggers(cfg, first_step: int = 0) -> list:
    """The trackers `cfg.report_to` asks for (main process only; `fit` calls it)."""
    loggers = []
    try:
        for reporter in cfg.report_to:
            if reporter == "tensorboard":
                log_dir = cfg.logging_dir if cfg.logging_dir is not None else Path(cfg.out_dir) / "runs"
                loggers.append(TensorBoardLogger(log_dir, purge_step=first_step + 1 if first_step else None))
            else:
                name = cfg.run_name or (Path(cfg.out_dir).name if cfg.out_dir is not None else None)
                loggers.append(WandbLogger(cfg.wandb_project, name, cfg.to_dict(), cfg.out_dir))
    except BaseException:
        for logger in loggers:
            logger.close()
        raise
    return loggers
