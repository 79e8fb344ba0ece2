"""Evaluation: a task's loss and metrics over a whole data set, in eval mode, without gradients."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .config import TrainConfig
from .distributed import Distributed
from .precision import Precision
from .tasks import Metrics, add_metrics, metric_means, resolve_task


@torch.no_grad()
def evaluate_task(model: nn.Module, data, cfg: TrainConfig, precision: Precision | None = None,
                  dist: Distributed | None = None) -> dict[str, float]:
    """The loss of `cfg.task` over `data` (as training averages it) and the task's metrics.

    Args:
        model: the model, on `cfg.device`; put in eval mode for the call, its mode restored after.
        data: a sequence of examples of the task (`input_ids` and `labels` / `label` for the built-in ones).
        cfg: task, batch_size, device, dtype and pad_token_id are read.
        precision: the run's `Precision` (default: one built from cfg).
        dist: with several processes, each evaluates every world_size-th example and the sums are
            all-reduced, so every rank returns the same numbers. Pass the plain module (or an FSDP one),
            not a DDP wrapper.

    Returns:
        {"loss": summed loss / the task's count (scored tokens, examples, groups) over all of `data`,
        **the task's metrics}: "perplexity" for "causal_lm"; "accuracy", "macro_f1" for "classification";
        "accuracy", "macro_f1" and, with BIO label names on the model, "entity_precision", "entity_recall",
        "entity_f1" for "token_classification" (see `eval_metrics.py`); the task's own metrics (e.g.
        "rewards/accuracies" for DPO). NaN loss when nothing was scored.
    """
    task = resolve_task(cfg.task)
    task_loss = task.evaluate or task.loss
    precision = precision or Precision(cfg.dtype, cfg.device)
    dist = dist or Distributed()
    was_training = model.training
    model.eval()
    total, scored, metrics = 0.0, 0, {}
    mine = list(range(dist.rank, len(data), dist.world_size))
    try:
        # An FSDP model gathers its weights in every forward, so every rank runs the same number of
        # batches: a rank out of examples runs example 0 once more and does not count it.
        for start in range(0, math.ceil(len(data) / dist.world_size), cfg.batch_size):
            ids = mine[start:start + cfg.batch_size]
            batch = task.collate([data[i] for i in ids or [0]], cfg.pad_token_id, cfg.device)
            n = task.count(batch) if ids else 0
            with precision.autocast():
                loss, more = task_loss(model, batch, max(n, 1), model)
            if ids:
                total, scored, metrics = total + float(loss) * n, scored + n, add_metrics(metrics, more)
            else:  # the same metric names on every rank (one all-reduce of them all), counting nothing
                metrics = add_metrics(metrics, {k: (0.0, 0) for k in more})
    finally:
        model.train(was_training)
    (total, scored), metrics = reduce_sums([total, scored], metrics, dist, cfg.device)
    loss = total / scored if scored else float("nan")
    return task.summarize(loss, metrics) if task.summarize is not None else {"loss": loss, **metric_means(metrics)}


def reduce_sums(values: list[float], metrics: Metrics, dist: Distributed, device: str) -> tuple[list[float], Metrics]:
    """`values` and `metrics` summed over all processes, in one all-reduce (as given with one process).
    Every process must hold the same metric names (they come from the same task)."""
    keys = sorted(metrics)
    flat = dist.sum(list(values) + [float(v) for k in keys for v in metrics[k]], device)
    n = len(values)
    return flat[:n], {k: (flat[n + 2 * i], int(flat[n + 2 * i + 1])) for i, k in enumerate(keys)}


def evaluate(model: nn.Module, data, cfg: TrainConfig, precision: Precision | None = None,
             dist: Distributed | None = None) -> dict[str, float]:
    """The metrics of `model` on `data` for `cfg.task`: {"loss", ...by task} (`evaluate_task`, which has
    the arguments and the list of metrics).

    `metrics["loss"]` is the training loss (per token, per example, per preference group);
    `metrics["perplexity"]` for a causal LM, `metrics["accuracy"]` and `metrics["macro_f1"]` for a
    classifier, `metrics["entity_f1"]` (with precision and recall) for a BIO tagger.
    """
    return evaluate_task(model, data, cfg, precision, dist)
