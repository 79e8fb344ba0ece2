"""The metrics evaluation reports for the built-in tasks, beside the loss:

| task | metrics |
|---|---|
| "causal_lm" | perplexity = exp(mean token loss) |
| "classification" | accuracy, macro_f1 (unweighted mean of per-class F1 over the classes that occur in targets or predictions, as scikit-learn's default) |
| "token_classification" | accuracy (of scored tokens), macro_f1 (over tags); with BIO label names on the model (`TokenClassifier(label_names=[...])`): entity_precision, entity_recall, entity_f1 (exact span match, as seqeval's default and conlleval) |

Each batch adds counts (`{name: (sum, n)}`: correct predictions, per-class true/false positives and false
negatives, entity hits) that sum exactly over batches and processes; `summarize` turns the totals into the
reported numbers. The counts' names start with "count/" and are not reported themselves.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..data.metrics import bio_spans, word_predictions
from .forward import _logits
from .losses import IGNORE_INDEX, task_loss
from .metric_sums import Metrics, metric_means


def _class_counts(pred: torch.Tensor, gold: torch.Tensor, num_classes: int) -> Metrics:
    """Correct predictions and per-class tp / fp / fn of 1-D predicted and gold class ids."""
    out: Metrics = {"count/correct": (int((pred == gold).sum()), int(gold.numel()))}
    for c in range(num_classes):
        p, g = pred == c, gold == c
        out[f"count/tp/{c}"] = (int((p & g).sum()), 1)
        out[f"count/fp/{c}"] = (int((p & ~g).sum()), 1)
        out[f"count/fn/{c}"] = (int((~p & g).sum()), 1)
    return out


def _entity_counts(pred: torch.Tensor, labels: torch.Tensor, names) -> Metrics:
    """Entity hits, predicted and gold entities of every row's scored positions (BIO tag names)."""
    hits = n_pred = n_gold = 0
    for row_pred, row_gold in zip(pred.tolist(), labels.tolist()):
        p_tags, g_tags = word_predictions(row_pred, row_gold, names)
        p_spans, g_spans = bio_spans(p_tags), bio_spans(g_tags)
        hits, n_pred, n_gold = hits + len(p_spans & g_spans), n_pred + len(p_spans), n_gold + len(g_spans)
    return {"count/entity_hits": (hits, 1), "count/entity_pred": (n_pred, 1), "count/entity_gold": (n_gold, 1)}


def bio_label_names(module: nn.Module) -> tuple[str, ...] | None:
    """The model's label names when they are BIO tags ("O", "B-X", "I-X"), else None."""
    names = getattr(module, "label_names", None)
    if not names or not all(n == "O" or (isinstance(n, str) and n[:2] in ("B-", "I-") and len(n) > 2) for n in names):
        return None
    return tuple(names)


def classification_eval(model: nn.Module, batch: dict, count: int, module: nn.Module, accepted: set[str]):
    """(loss, counts) of one classification batch: the training loss and the prediction counts."""
    logits = _logits(model, batch, accepted, "classification")  # (B, C)
    loss = task_loss("classification", logits, batch, count)
    return loss, _class_counts(logits.argmax(-1), batch["label"], logits.shape[-1])


def token_classification_eval(model: nn.Module, batch: dict, count: int, module: nn.Module, accepted: set[str]):
    """(loss, counts) of one tagging batch: tag counts over scored tokens, and entity counts with BIO names."""
    logits = _logits(model, batch, accepted, "token_classification")  # (B, T, C)
    loss = task_loss("token_classification", logits, batch, count)
    pred, labels = logits.argmax(-1), batch["labels"]
    scored = labels != IGNORE_INDEX
    counts = _class_counts(pred[scored], labels[scored], logits.shape[-1])
    names = bio_label_names(module)
    if names is not None:
        counts.update(_entity_counts(pred, labels, names))
    return loss, counts


def _f1(tp: float, fp: float, fn: float) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def summarize(loss: float, metrics: Metrics, task: str) -> dict[str, float]:
    """The reported metrics of `task` from the summed counts: {"loss", ...} (see the module table)."""
    out = {"loss": loss}
    if task == "causal_lm":
        out["perplexity"] = math.nan if math.isnan(loss) else math.exp(loss) if loss < 700 else math.inf
    if task in ("classification", "token_classification") and "count/correct" not in metrics:
        out.update(accuracy=math.nan, macro_f1=math.nan)  # nothing was evaluated: the same keys, no numbers
    if "count/correct" in metrics:
        correct, n = metrics["count/correct"]
        classes = sorted({k.rsplit("/", 1)[1] for k in metrics if k.startswith("count/tp/")}, key=int)
        per_class = [[metrics[f"count/{what}/{c}"][0] for what in ("tp", "fp", "fn")] for c in classes]
        seen = [_f1(*c) for c in per_class if any(c)]  # classes in targets or predictions
        out.update(accuracy=correct / n if n else math.nan, macro_f1=sum(seen) / len(seen) if seen else math.nan)
    if "count/entity_hits" in metrics:
        hits, n_pred, n_gold = (metrics[f"count/entity_{k}"][0] for k in ("hits", "pred", "gold"))
        out.update(entity_precision=hits / n_pred if n_pred else 0.0, entity_recall=hits / n_gold if n_gold else 0.0,
                   entity_f1=_f1(hits, n_pred - hits, n_gold - hits))
    out.update(metric_means({k: v for k, v in metrics.items() if not k.startswith("count/")}))
    return out
