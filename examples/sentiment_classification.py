"""Sentiment classification: a classification head on a small decoder, trained with LoRA.

Sentences are generated from positive and negative word lists, written to JSONL and loaded with
`tinytune.data.load_classification`. The model is a random `llama-tiny`; `SequenceClassifier` puts a
linear `score` on the hidden state of each text's last token. Runs in seconds on a CPU.

    python examples/sentiment_classification.py [--steps 60]
"""
import argparse
import json
import random
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer as Backend, models, pre_tokenizers

import tinytune as tt
import tinytune.train
from tinytune.models import SequenceClassifier, Tokenizer

POSITIVE = ["great", "wonderful", "brilliant", "lovely", "excellent", "moving", "funny", "charming"]
NEGATIVE = ["awful", "boring", "terrible", "dull", "weak", "clumsy", "painful", "bland"]
SUBJECTS = ["the movie", "the acting", "the plot", "this film", "the ending", "the soundtrack"]
FILLER = ["really", "quite", "very", "truly", "rather", "honestly", "just"]
LABELS = ["negative", "positive"]


def make_records(n: int, rng: random.Random) -> list[dict]:
    """Sentences whose label is the polarity of the one sentiment word they hold."""
    records = []
    for _ in range(n):
        label = rng.randrange(2)
        word = rng.choice(POSITIVE if label else NEGATIVE)
        text = f"{rng.choice(SUBJECTS)} was {rng.choice(FILLER)} {word} and {rng.choice(FILLER)} long"
        records.append({"text": text, "label": LABELS[label]})
    return records


def word_tokenizer(texts) -> Tokenizer:
    """A word-level tokenizer over the words of `texts` (ids 0-3: pad, BOS, EOS, unknown)."""
    words = sorted({w for t in texts for w in t.split()})
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer(backend, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def scores(clf, examples) -> tuple[float, float]:
    """Accuracy and macro-F1 of `clf` on `examples`."""
    batch = tt.data.pad_batch(list(examples), pad_token_id=0)
    clf.eval()
    with torch.no_grad():
        predicted = clf(batch["input_ids"], attention_mask=batch["attention_mask"]).argmax(-1)
    return tt.data.accuracy(predicted, batch["label"]), tt.data.macro_f1(predicted, batch["label"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    rng = random.Random(0)
    train_records, test_records = make_records(512, rng), make_records(200, rng)
    tok = word_tokenizer(r["text"] for r in train_records + test_records)

    with tempfile.TemporaryDirectory() as tmp:
        train = tt.data.load_classification(write_jsonl(Path(tmp, "train.jsonl"), train_records), tok,
                                            labels=LABELS)
        test = tt.data.load_classification(write_jsonl(Path(tmp, "test.jsonl"), test_records), tok,
                                           labels=train.label_names)
    print(f"{len(train)} training and {len(test)} test sentences, e.g. {test_records[0]}")

    clf = SequenceClassifier(tt.models.build("llama-tiny", vocab_size=tok.vocab_size), num_labels=len(LABELS))
    # LoRA on the body; the head (`score`) declares itself, so it trains whole and save_adapter keeps it
    tt.lora.apply(clf, tt.lora.LoraConfig(rank=8, alpha=16, targets="all-linear"))
    print(tt.count_parameters(clf), "\n")

    acc, f1 = scores(clf, test)
    print(f"before training: accuracy {acc:.3f}  macro-F1 {f1:.3f}")
    cfg = tt.train.TrainConfig(task="classification", lr=3e-3, steps=args.steps, batch_size=16,
                               warmup_steps=min(10, args.steps // 10), log_every=max(args.steps // 5, 1))
    tt.train.fit(clf, train, cfg)
    acc, f1 = scores(clf, test)
    print(f"after training:  accuracy {acc:.3f}  macro-F1 {f1:.3f}")


if __name__ == "__main__":
    main()
