"""Named-entity recognition: a token-classification head on a small decoder, trained with LoRA.

Sentences with PER and LOC entities (some of two words, so I- tags occur) are generated from name
lists, written to JSONL with BIO tags and loaded with `tinytune.data.load_ner`, which puts each word's
tag on its first sub-token. `TokenClassifier` puts a linear `classifier` on every position; scores are
entity-level precision / recall / F1 (exact spans). Runs in seconds on a CPU.

    python examples/ner.py [--steps 50]
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
from tinytune.models import Tokenizer, TokenClassifier

PEOPLE = ["Alice", "Bob", "Maria Lopez", "Chen Wei", "Omar", "Grace Hopper", "Ivan", "Sara Berg"]
PLACES = ["Paris", "Lima", "New York", "Oslo", "Cape Town", "Kyoto", "Rome", "San Diego"]
PATTERNS = ["{PER} lives in {LOC}", "{PER} flew to {LOC} with {PER}", "yesterday {PER} visited {LOC}",
            "in {LOC} the weather was cold", "{PER} met {PER} near {LOC}", "the train to {LOC} was late"]
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def make_records(n: int, rng: random.Random) -> list[dict]:
    """Sentences from PATTERNS with names filled in, as {"tokens": words, "tags": BIO tags}."""
    records = []
    for _ in range(n):
        words, tags = [], []
        for part in rng.choice(PATTERNS).split():
            if part in ("{PER}", "{LOC}"):
                kind = part[1:4]
                name = rng.choice(PEOPLE if kind == "PER" else PLACES).split()
                words += name
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(name) - 1)
            else:
                words.append(part)
                tags.append("O")
        records.append({"tokens": words, "tags": tags})
    return records


def word_tokenizer(sentences) -> Tokenizer:
    """A word-level tokenizer over the words of `sentences` (ids 0-3: pad, BOS, EOS, unknown)."""
    words = sorted({w for s in sentences for w in s})
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def entity_scores(model, examples, tags):
    """Entity-level scores of `model` on `examples` (each word judged by its first sub-token)."""
    batch = tt.data.pad_batch([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples], 0)
    model.eval()
    with torch.no_grad():
        predicted = model(batch["input_ids"], attention_mask=batch["attention_mask"]).argmax(-1)  # (B, T)
    pairs = [tt.data.word_predictions(p, e["labels"], tags) for p, e in zip(predicted, examples)]
    return tt.data.entity_scores([p for p, _ in pairs], [g for _, g in pairs])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    rng = random.Random(0)
    train_records, test_records = make_records(400, rng), make_records(100, rng)
    tok = word_tokenizer(r["tokens"] for r in train_records + test_records)

    with tempfile.TemporaryDirectory() as tmp:
        train = tt.data.load_ner(write_jsonl(Path(tmp, "train.jsonl"), train_records), tok, tags=TAGS)
        test = tt.data.load_ner(write_jsonl(Path(tmp, "test.jsonl"), test_records), tok, tags=TAGS)
    print(f"{len(train)} training and {len(test)} test sentences, e.g. {test_records[0]}")

    model = TokenClassifier(tt.models.build("llama-tiny", vocab_size=tok.vocab_size), num_labels=len(TAGS))
    # LoRA on the body; the head (`classifier`) declares itself, so it trains whole and save_adapter keeps it
    tt.lora.apply(model, tt.lora.LoraConfig(rank=8, alpha=16, targets="all-linear"))
    print(tt.count_parameters(model), "\n")

    before = entity_scores(model, test, TAGS)
    print(f"before training: precision {before.precision:.3f}  recall {before.recall:.3f}  F1 {before.f1:.3f}")
    cfg = tt.train.TrainConfig(task="token_classification", lr=3e-3, steps=args.steps, batch_size=16,
                               warmup_steps=min(10, args.steps // 10), log_every=max(args.steps // 4, 1))
    tt.train.fit(model, train, cfg)
    after = entity_scores(model, test, TAGS)
    print(f"after training:  precision {after.precision:.3f}  recall {after.recall:.3f}  F1 {after.f1:.3f}")
    for kind, row in after.per_type.items():
        print(f"  {kind}: F1 {row['f1']:.3f} over {row['support']} entities")


if __name__ == "__main__":
    main()
