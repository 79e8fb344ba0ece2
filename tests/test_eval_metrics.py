"""`tt.train.evaluate` reports the task's metrics: perplexity, accuracy and macro-F1, entity P/R/F1.

Every number is checked against the from-scratch references of `tinytune.data.metrics` (themselves tested
against the definitions in tests/test_data.py) computed from the model's own predictions; sums over batches
must not depend on the batch size (exact counts, so the tolerance is float rounding only).
"""
import io
import json
import math

import pytest
import torch

import tinytune as tt
from tinytune.data.metrics import accuracy, entity_scores, macro_f1, word_predictions
from tinytune.models import SequenceClassifier, TokenClassifier
from tinytune.train import TrainConfig, fit
from tinytune.train.eval_metrics import bio_label_names

TAGS = ["O", "B-PER", "I-PER", "B-LOC"]


def _cfg(task, batch_size=8, **kw):
    return TrainConfig(task=task, lr=1e-2, steps=2, batch_size=batch_size, log_every=1000, shuffle=False, **kw)


def _cls_data(n=13, classes=3):
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 256, (3 + i % 4,), generator=gen).tolist() + [2], "label": i % classes}
            for i in range(n)]


def _tag_data(n=9):
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(3, 256, (4 + i % 3,), generator=gen).tolist()
        labels = torch.randint(0, len(TAGS), (len(ids),), generator=gen).tolist()
        labels[1] = -100  # a second sub-token: not scored
        out.append({"input_ids": ids, "labels": labels})
    return out


def _model(cls, n, names=None):
    torch.manual_seed(2)
    return cls(tt.models.build("llama-tiny"), n, label_names=names).eval()


def test_nothing_scored_gives_nan_metrics_under_the_tasks_names():
    cfg = TrainConfig(batch_size=2)
    lm = tt.train.evaluate(tt.models.build("llama-tiny"), [{"input_ids": [1, 2, 3], "labels": [-100] * 3}], cfg)
    assert set(lm) == {"loss", "perplexity"} and all(math.isnan(v) for v in lm.values())
    clf = tt.train.evaluate(_model(SequenceClassifier, 2), [], _cfg("classification"))
    assert set(clf) == {"loss", "accuracy", "macro_f1"} and all(math.isnan(v) for v in clf.values())


def test_causal_lm_reports_perplexity_of_its_loss():
    model = tt.models.build("llama-tiny")
    data = [{"input_ids": list(range(3, 12)), "labels": [-100] + list(range(4, 12))}] * 3
    metrics = tt.train.evaluate(model, data, TrainConfig(batch_size=2))
    assert set(metrics) == {"loss", "perplexity"}
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-12)


@pytest.mark.parametrize("batch_size", [8, 3])
def test_classification_accuracy_and_macro_f1_equal_the_references(batch_size):
    model, data = _model(SequenceClassifier, 3), _cls_data()
    with torch.no_grad():
        preds = [int(model(torch.tensor([ex["input_ids"]])).argmax(-1)) for ex in data]
    golds = [ex["label"] for ex in data]
    metrics = tt.train.evaluate(model, data, _cfg("classification", batch_size))
    assert set(metrics) == {"loss", "accuracy", "macro_f1"}
    assert metrics["accuracy"] == pytest.approx(accuracy(preds, golds), abs=1e-12)
    assert metrics["macro_f1"] == pytest.approx(macro_f1(preds, golds), abs=1e-12)


@pytest.mark.parametrize("batch_size", [8, 2])
def test_tagging_reports_entity_scores_with_bio_names(batch_size):
    model, data = _model(TokenClassifier, len(TAGS), TAGS), _tag_data()
    pred_tags, gold_tags, flat_p, flat_g = [], [], [], []
    with torch.no_grad():
        for ex in data:
            pred = model(torch.tensor([ex["input_ids"]])).argmax(-1)[0].tolist()
            p, g = word_predictions(pred, ex["labels"], TAGS)
            pred_tags.append(p), gold_tags.append(g), flat_p.extend(p), flat_g.extend(g)
    expected = entity_scores(pred_tags, gold_tags)
    metrics = tt.train.evaluate(model, data, _cfg("token_classification", batch_size))
    assert metrics["accuracy"] == pytest.approx(accuracy(flat_p, flat_g), abs=1e-12)
    assert metrics["macro_f1"] == pytest.approx(macro_f1(flat_p, flat_g), abs=1e-12)
    assert expected.precision + expected.recall > 0  # the case has hits to count
    assert (metrics["entity_precision"], metrics["entity_recall"], metrics["entity_f1"]) == \
        pytest.approx((expected.precision, expected.recall, expected.f1), abs=1e-12)


def test_tags_that_are_not_bio_give_tag_metrics_only():
    model = _model(TokenClassifier, 4, ["NOUN", "VERB", "ADJ", "X"])
    assert bio_label_names(model) is None and bio_label_names(_model(TokenClassifier, 4, TAGS)) == tuple(TAGS)
    metrics = tt.train.evaluate(model, _tag_data(), _cfg("token_classification"))
    assert set(metrics) == {"loss", "accuracy", "macro_f1"}


def test_fit_records_every_evaluation_metric(tmp_path):
    model, data = _model(SequenceClassifier, 3).train(), _cls_data()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets="all-linear"))
    stream = io.StringIO()
    history = fit(model, data, _cfg("classification", eval_every=1, out_dir=tmp_path), eval_data=data, stream=stream)
    assert len(history.eval_metrics) == 2 and all({"accuracy", "macro_f1"} <= set(m) for m in history.eval_metrics)
    assert not any(k.startswith("count/") for m in history.eval_metrics for k in m)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2]
    assert [r["eval_accuracy"] for r in evals] == [m["accuracy"] for m in history.eval_metrics]
    assert "macro_f1" in stream.getvalue()  # and on the progress output
