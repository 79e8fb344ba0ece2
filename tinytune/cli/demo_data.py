"""What the demo ships: a character tokenizer, generated pre-training text and the letter-shift task.

Everything is generated from fixed seeds, so every run (and every machine) sees the same data.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from ..data import ALPACA
from ..models import Tokenizer

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]  # newline + printable ASCII
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TASK = "Replace each letter by the next one in the alphabet."
# Pre-training teaches the template, copying a word and mapping letters (capitals); the new mapping
# (a->b, ..., z->a) is left to the LoRA fine-tune.
PRETRAIN_TASKS = {
    "Repeat the word.": lambda w: w,
    "Write the word in capital letters.": lambda w: w.upper(),
    "Write the first letter of the word.": lambda w: w[0],
    "Write the word twice.": lambda w: f"{w} {w}",
}


def char_tokenizer() -> Tokenizer:
    """A character-level tokenizer (one id per ASCII character) that prepends <s>, built with `tokenizers`."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")  # every char
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.add_special_tokens(SPECIALS)
    return Tokenizer(backend, pad_token_id=0, bos_token_id=1, eos_token_id=2, unk_token_id=3)


def random_words(n: int, seed: int, min_len: int = 3, max_len: int = 5) -> list[str]:
    """`n` distinct random lowercase strings of 3..5 letters."""
    rng, seen = random.Random(seed), set()
    while len(seen) < n:
        seen.add("".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len))))
    return sorted(seen, key=lambda w: random.Random(f"{seed}{w}").random())


def pretraining_text(n_docs: int, seed: int = 1) -> list[str]:
    """Alpaca-formatted examples of the pre-training tasks, as plain text ending in a blank line."""
    rng, words = random.Random(seed), random_words(max(n_docs // 2, 50), seed + 1)
    docs = []
    for _ in range(n_docs):
        instruction, fn = rng.choice(list(PRETRAIN_TASKS.items()))
        word = rng.choice(words)
        docs.append(ALPACA.render(instruction, word, fn(word)))
    return docs


def shift(word: str) -> str:
    """Each letter replaced by the next one (z wraps to a): "cat" -> "dbu"."""
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in word)


def shift_task(n_train: int, n_eval: int, seed: int = 7) -> tuple[list[dict], list[dict]]:
    """(train, eval) records `{"instruction", "input", "output"}` of the letter-shift task; no eval word
    is in the train split."""
    words = random_words(n_train + n_eval, seed)
    records = [{"instruction": TASK, "input": w, "output": shift(w)} for w in words]
    return records[:n_train], records[n_train:]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
