"""Task metrics, from scratch: accuracy and macro-F1 for classification; entity-level precision, recall and
F1 over BIO tag sequences (exact span match, as seqeval's default mode and conlleval score them)."""
from __future__ import annotations

from dataclasses import dataclass

from .encoding import IGNORE


def _as_list(values) -> list:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _paired(predictions, targets) -> tuple[list, list]:
    preds, golds = _as_list(predictions), _as_list(targets)
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions but {len(golds)} targets")
    if not golds:
        raise ValueError("no targets to score")
    return preds, golds


def accuracy(predictions, targets) -> float:
    """Fraction of positions where prediction == target (lists or 1-D tensors).

    Raises:
        ValueError: different lengths, or empty.
    """
    preds, golds = _paired(predictions, targets)
    return sum(p == g for p, g in zip(preds, golds)) / len(golds)


def _f1(tp: int, fp: int, fn: int) -> float:
    # 2tp / (2tp + fp + fn) equals 2PR/(P+R), and is 0 (not NaN) when the class never occurs on either side.
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def macro_f1(predictions, targets, labels=None) -> float:
    """Unweighted mean of per-class F1.

    Args:
        predictions, targets: class ids or names (lists or 1-D tensors).
        labels: the classes to average over; None: every class seen in targets or predictions (as
            scikit-learn does). A listed class absent from both sides scores F1 = 0, as in scikit-learn.
    Raises:
        ValueError: different lengths, or empty.
    """
    preds, golds = _paired(predictions, targets)
    classes = list(labels) if labels is not None else sorted(set(golds) | set(preds), key=str)
    scores = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(preds, golds))
        fp = sum(p == c and g != c for p, g in zip(preds, golds))
        fn = sum(p != c and g == c for p, g in zip(preds, golds))
        scores.append(_f1(tp, fp, fn))
    return sum(scores) / len(scores)


def bio_spans(tags) -> set[tuple[str, int, int]]:
    """Entities of one BIO sequence as (type, start, end) with `end` exclusive.

    An entity starts at "B-X", or at "I-X" after "O" or after a different type (the lenient reading of
    conlleval/seqeval); it runs over the following "I-X" tags.

    Raises:
        ValueError: a tag that is not "O", "B-<type>" or "I-<type>".
    """
    spans, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):  # the sentinel closes a trailing entity
        if tag != "O" and (not isinstance(tag, str) or tag[:2] not in ("B-", "I-") or len(tag) < 3):
            raise ValueError(f"tag {i} {tag!r} is not BIO (expected 'O', 'B-<type>' or 'I-<type>')")
        prefix, tag_kind = (tag[0], tag[2:]) if tag != "O" else ("O", None)
        continues = prefix == "I" and tag_kind == kind
        if kind is not None and not continues:
            spans.add((kind, start, i))
            kind = None
        if prefix != "O" and not continues:
            start, kind = i, tag_kind
    return spans


@dataclass(frozen=True)
class EntityScores:
    """Micro-averaged entity scores over all sentences, and per entity type."""

    precision: float
    recall: float
    f1: float
    per_type: dict  # type -> {"precision", "recall", "f1", "support"}


def _prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    return precision, recall, _f1(tp, n_pred - tp, n_gold - tp)


def entity_scores(predicted_tags, gold_tags) -> EntityScores:
    """Entity-level precision/recall/F1: an entity counts only when its type and both ends match exactly,
    so a partially overlapping span is one false positive and one false negative.

    Args:
        predicted_tags, gold_tags: lists of BIO tag sequences, one per sentence, of equal lengths.
    Raises:
        ValueError: different numbers of sentences, different sentence lengths, or a non-BIO tag.
    """
    if len(predicted_tags) != len(gold_tags):
        raise ValueError(f"{len(predicted_tags)} predicted sentences but {len(gold_tags)} gold sentences")
    pred, gold = set(), set()
    for n, (p, g) in enumerate(zip(predicted_tags, gold_tags)):
        if len(p) != len(g):
            raise ValueError(f"sentence {n}: {len(p)} predicted tags but {len(g)} gold tags")
        pred |= {(n, *span) for span in bio_spans(p)}
        gold |= {(n, *span) for span in bio_spans(g)}
    hits = pred & gold
    per_type = {}
    for kind in sorted({s[1] for s in pred | gold}):
        counts = [sum(s[1] == kind for s in group) for group in (hits, pred, gold)]
        p, r, f = _prf(*counts)
        per_type[kind] = {"precision": p, "recall": r, "f1": f, "support": counts[2]}
    return EntityScores(*_prf(len(hits), len(pred), len(gold)), per_type)


def word_predictions(predicted_ids, labels, label_names=None) -> tuple[list, list]:
    """Pick the scored positions (labels != -100: each word's first sub-token) of one NER example.

    Args:
        predicted_ids: per-token predicted tag ids (list or 1-D tensor, e.g. `logits.argmax(-1)[i]`).
        labels: the example's aligned labels.
        label_names: map ids to tag names when given.
    Returns:
        (predicted, gold) per word, ready for `entity_scores`.
    """
    preds, golds = _as_list(predicted_ids), _as_list(labels)
    pairs = [(p, g) for p, g in zip(preds, golds) if g != IGNORE]
    names = (lambda i: label_names[i]) if label_names is not None else (lambda i: i)
    return [names(p) for p, _ in pairs], [names(g) for _, g in pairs]
