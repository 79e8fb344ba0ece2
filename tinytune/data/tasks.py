"""Classification datasets from JSONL: text classification (one label per text) and token classification
(NER with BIO tags aligned to sub-word tokens). The data side only: the classification head over the
decoder's last non-pad token belongs with the model; metrics are in `metrics.py`."""
from __future__ import annotations

from .encoding import IGNORE, adds_bos, fit_length
from .records import Examples, RecordError, build_examples, iter_records, list_field
from .records import text_field as read_text


def discover_labels(path, field: str) -> list:
    """The sorted distinct values of `field` in a JSONL file (flattened when the field holds lists).

    Records that are not JSON objects or lack the field are passed over here (the loaders report them).
    Strings and ints may not be mixed (they would not sort).

    Raises:
        ValueError: no label found, or labels of mixed types.
    """
    found = set()
    for _, record in iter_records(path):
        if isinstance(record, dict) and field in record:
            values = record[field] if isinstance(record[field], list) else [record[field]]
            found.update(v for v in values if isinstance(v, (str, int)) and not isinstance(v, bool))
    if not found:
        raise ValueError(f"no labels found in field {field!r} of {path}")
    if len({type(v) for v in found}) > 1:
        raise ValueError(f"labels in field {field!r} of {path} mix strings and numbers: {sorted(map(str, found))}")
    return sorted(found)


def _label_index(labels, path, field: str) -> tuple[list, dict]:
    names = discover_labels(path, field) if labels is None else list(labels)
    if not all(_is_label(name) for name in names):
        raise ValueError(f"labels must be strings or ints, got {names!r}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"labels must be a non-empty list without duplicates, got {names!r}")
    return names, {name: i for i, name in enumerate(names)}


def _is_label(value) -> bool:
    """A label is a string or an int (not a bool, not a float: 1.0 would silently equal 1)."""
    return isinstance(value, (str, int)) and not isinstance(value, bool)


def load_classification(path, tokenizer, labels=None, *, max_length: int | None = None, truncate: bool = False,
                        text_field: str = "text", label_field: str = "label", on_error: str = "raise",
                        add_bos: bool | None = None, add_eos: bool = True) -> Examples:
    """Text classification: records `{"text": ..., "label": ...}` -> `{"input_ids": [...], "label": id}`.

    Args:
        path: the JSONL file.
        tokenizer: `encode(text, add_special_tokens=...)`, `bos_token_id`, `eos_token_id`.
        labels: label names in id order; None: the sorted distinct labels of this file (pass the training
            set's `.label_names` when loading the evaluation set, so ids agree).
        max_length, truncate: length policy (truncation keeps the first `max_length` tokens).
        text_field, label_field: field names.
        on_error: "raise" or "skip" (an unknown label, a missing or empty text, too long: bad records).
        add_bos: prepend BOS; None: as the tokenizer does by default.
        add_eos: append EOS, so that the last token, which a head over the last non-pad token reads, is the
            same for every text.
    Returns:
        `Examples` with `.label_names`.
    Raises:
        ValueError: bad `labels`; a bad record with on_error="raise".
    """
    names, index = _label_index(labels, path, label_field)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    use_bos = adds_bos(tokenizer) if add_bos is None else add_bos

    def build(record: dict) -> dict:
        text = read_text(record, text_field)
        if label_field not in record:
            raise RecordError(f"missing field {label_field!r} (fields: {sorted(record)})")
        label = record[label_field]
        if not _is_label(label):
            raise RecordError(f"field {label_field!r} should be a string or an integer, got "
                              f"{type(label).__name__} {label!r}")
        if label not in index:
            raise RecordError(f"unknown label {label!r}; labels: {names}")
        ids = ([bos] if use_bos and bos is not None else []) + tokenizer.encode(text, add_special_tokens=False)
        ids += [eos] if add_eos and eos is not None else []
        return fit_length({"input_ids": ids, "label": index[label]}, max_length, truncate, ("input_ids",))

    return build_examples(path, build, on_error, label_names=names)


def check_bio(tag: str) -> None:
    """Raises RecordError unless `tag` is "O", "B-<type>" or "I-<type>"."""
    if tag != "O" and not (isinstance(tag, str) and tag[:2] in ("B-", "I-") and len(tag) > 2):
        raise RecordError(f"tag {tag!r} is not BIO (expected 'O', 'B-<type>' or 'I-<type>')")


def load_ner(path, tokenizer, tags=None, *, max_length: int | None = None, truncate: bool = False,
             tokens_field: str = "tokens", tags_field: str = "tags", on_error: str = "raise",
             add_bos: bool | None = None, add_eos: bool = False, word_prefix: str = " ") -> Examples:
    """Token classification (NER): records `{"tokens": [words], "tags": [BIO tags]}` -> `{"input_ids",
    "labels"}` where labels hold tag ids aligned to sub-word tokens: the first sub-token of each word gets the
    word's tag id, its other sub-tokens and BOS/EOS get -100.

    Words are encoded one at a time, each after the first with `word_prefix` in front, so that byte-level
    BPE tokenizers see the word as it appears mid-sentence (" word"), and word boundaries are exact.

    Args:
        path: the JSONL file.
        tokenizer: see `load_classification`.
        tags: tag names in id order; None: the sorted distinct tags of this file.
        max_length, truncate: length policy (truncation may cut a word's sub-tokens; its tag stays on the first).
        tokens_field, tags_field: field names.
        on_error: "raise" or "skip" (unequal lengths, a non-BIO or unknown tag, an empty word: bad records).
        add_bos, add_eos: special tokens around the words (unscored).
        word_prefix: text put before every word but the first.
    Returns:
        `Examples` with `.label_names` (the tags).
    Raises:
        ValueError: bad `tags`; a bad record with on_error="raise".
    """
    names, index = _label_index(tags, path, tags_field)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    use_bos = (adds_bos(tokenizer) if add_bos is None else add_bos) and bos is not None

    def build(record: dict) -> dict:
        words, word_tags = list_field(record, tokens_field), list_field(record, tags_field)
        for name, values in ((tokens_field, words), (tags_field, word_tags)):
            if (i := next((i for i, v in enumerate(values) if not isinstance(v, str)), None)) is not None:
                raise RecordError(f"field {name!r} should be a list of strings, item {i} is "
                                  f"{type(values[i]).__name__} {values[i]!r}")
        if len(words) != len(word_tags):
            raise RecordError(f"{len(words)} {tokens_field} but {len(word_tags)} {tags_field}")
        ids, labels = ([bos], [IGNORE]) if use_bos else ([], [])
        for i, (word, tag) in enumerate(zip(words, word_tags)):
            check_bio(tag)
            if tag not in index:
                raise RecordError(f"unknown tag {tag!r} at word {i}; tags: {names}")
            if not isinstance(word, str) or not word.strip():
                raise RecordError(f"word {i} is empty or not a string: {word!r}")
            pieces = tokenizer.encode(word if i == 0 else word_prefix + word, add_special_tokens=False)
            if not pieces:
                raise RecordError(f"word {i} {word!r} encodes to no tokens")
            ids += pieces
            labels += [index[tag]] + [IGNORE] * (len(pieces) - 1)
        if add_eos and eos is not None:
            ids, labels = ids + [eos], labels + [IGNORE]
        return fit_length({"input_ids": ids, "labels": labels}, max_length, truncate)

    return build_examples(path, build, on_error, label_names=names)
