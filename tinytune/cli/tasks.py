"""What `finetune --task` decides beyond the data format: the label names of classification and NER, the
head the decoder gets, and the small file that records the task beside the adapter so that `eval` and
`merge` read it back.

    OUT/adapter/tinytune_task.json   {"task": "classification", "template": null, "max_length": null,
                                      "labels": ["neg", "pos"], "id2label": {"0": "neg", "1": "pos"},
                                      "label2id": {"neg": 0, "pos": 1}}

`id2label` / `label2id` are the fields transformers' config.json uses for the same thing (string keys in
id2label, as JSON needs). Label ids are the positions in `labels`: `--labels a,b,c` in that order, or else
the sorted distinct labels of the training data (`tt.data.load_classification` / `load_ner`'s default).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .. import _check
from .._files import parse_json
from .._manifest import read_verified
from .._transaction import directory_transaction
from ..train.tasks import Task, resolve_task
from .options import LM_TASKS, TASKS, CLIError

TASK_FILE = "tinytune_task.json"
# finetune's --task -> TrainConfig.task
TRAIN_TASKS = {**{t: "causal_lm" for t in LM_TASKS}, "classification": "classification", "ner": "token_classification"}
# what each head task's records look like, for the message of a record the loader refuses
_RECORDS = {"classification": '{"text": ..., "label": ...}', "ner": '{"tokens": [words], "tags": [BIO tags]}'}
_HEAD_TYPES = {"SEQ_CLS": "classification", "TOKEN_CLS": "ner"}


def check_task(task) -> str:
    """`--task` as one of TASKS (CLIError naming the choices otherwise)."""
    if task not in TASKS:
        raise CLIError(f"--task: unknown task {task!r}; choose from {list(TASKS)}")
    return task


def parse_labels(value, task: str) -> list[str] | None:
    """`--labels a,b,c` (or a list from a config file) as a list of distinct non-empty names; None if not given.

    Raises:
        CLIError: --labels with a causal-LM task, an empty name, a duplicate, fewer than two labels.
    """
    if value is None:
        return None
    if task not in ("classification", "ner"):
        raise CLIError(f"--labels: only for --task classification or ner, not --task {task}")
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CLIError(f"--labels: expected comma-separated names, got {value!r}")
    names = [n.strip() for n in names]
    if any(not n for n in names):
        raise CLIError(f"--labels {value!r}: an empty label name (expected comma-separated names such as neg,pos)")
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise CLIError(f"--labels {value!r}: {dupes} given twice; each label once, in id order")
    if len(names) < 2:
        raise CLIError(f"--labels {value!r}: expected at least two labels")
    return names


def _match_types(names: list[str], path: Path, task: str) -> list:
    """--labels as the data holds them: ints when the data's labels are ints and every name is one."""
    from ..data.tasks import discover_labels
    try:
        found = discover_labels(path, "label" if task == "classification" else "tags")
    except (OSError, ValueError):
        return names  # the loader reports the file's problem with file:line
    if found and isinstance(found[0], int) and all(isinstance(n, str) and n.lstrip("-").isdigit() for n in names):
        return [int(n) for n in names]
    return names


def load_task_data(path, tokenizer, task: str, labels, opts: dict, flag: str):
    """Classification or NER examples (`.label_names` set) from the JSONL file `path`.

    Raises:
        CLIError: a missing file, or a bad record (file:line, with the record shape the task expects).
    """
    from .. import data as ttdata
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"{flag}: {'not a file' if file.exists() else 'file not found'}: {file}")
    if labels is not None:
        labels = _match_types(list(labels), file, task)
    loader = ttdata.load_classification if task == "classification" else ttdata.load_ner
    max_length = opts.get("max_length")
    try:
        return loader(file, tokenizer, labels, max_length=max_length, truncate=max_length is not None,
                      on_error=opts.get("on_error", "raise"))
    except (OSError, ValueError) as err:
        raise CLIError(f"{flag} {file}: {err} (--task {task} reads records {_RECORDS[task]})") from None


def task_model(decoder, task: str, labels):
    """`decoder` itself for a causal-LM task; a `SequenceClassifier` / `TokenClassifier` on it otherwise, with
    the label names (as strings: NER's entity scores read the BIO tags from them) where the head takes them."""
    import inspect

    from ..models import SequenceClassifier, TokenClassifier
    if task not in ("classification", "ner"):
        return decoder
    head = SequenceClassifier if task == "classification" else TokenClassifier
    names = {"label_names": [str(n) for n in labels]} if "label_names" in inspect.signature(head).parameters else {}
    return head(decoder, len(labels), **names)


def task_record(task: str, opts: dict, labels) -> dict:
    """The content of TASK_FILE for a finetune run."""
    record = {"task": task, "template": opts.get("template"), "max_length": opts.get("max_length")}
    if labels is not None:
        names = list(labels)
        record.update(labels=names, id2label={str(i): n for i, n in enumerate(names)},
                      label2id={str(n): i for i, n in enumerate(names)})
    return record


def write_task_file(adapter_dir: Path, record: dict) -> None:
    """Add TASK_FILE to the adapter directory (a transaction: the adapter's files are carried over whole)."""
    with directory_transaction(adapter_dir, owned=(TASK_FILE,), what="finetune") as staging:
        (Path(staging) / TASK_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_task_file(adapter_dir: Path) -> dict | None:
    """TASK_FILE of an adapter directory (verified against its manifest), or None when it has none.

    A directory without one (an adapter from `tt.save_adapter` or PEFT) is read from its adapter_config.json
    task_type: "SEQ_CLS" / "TOKEN_CLS" give {"task": "classification" / "ner"} without labels.

    Raises:
        ValueError: a damaged file, or one whose task or labels are not what finetune writes (named).
    """
    adapter_dir = Path(adapter_dir)
    file = adapter_dir / TASK_FILE
    if not file.is_file():
        return _from_adapter_config(adapter_dir)
    data = read_verified(adapter_dir, [TASK_FILE], "tinytune")[TASK_FILE]
    record = _check.mapping(parse_json(data, file, "tinytune"), str(file))
    _check.string(record.get("task"), f"{file}: 'task'", choices=TASKS)
    if record["task"] in ("classification", "ner"):
        labels = record.get("labels")
        if not isinstance(labels, list) or len(labels) < 1 or not all(isinstance(n, (str, int)) for n in labels):
            raise ValueError(f"{file}: 'labels' must be a list of label names, got {labels!r}")
    return record


def _from_adapter_config(adapter_dir: Path) -> dict | None:
    config = adapter_dir / "adapter_config.json"
    try:
        task_type = json.loads(config.read_text()).get("task_type")
    except (OSError, ValueError, AttributeError):
        return None  # load_adapter names what is wrong with it
    return {"task": _HEAD_TYPES[task_type]} if task_type in _HEAD_TYPES else None


def same_kind(a: str, b: str) -> bool:
    """Whether two --task values train the same model (every causal-LM format is one kind)."""
    return TRAIN_TASKS[a] == TRAIN_TASKS[b]


def labelled_task(task: str, labels) -> str | Task:
    """`TrainConfig.task` for `--task`: a head task carries its label names as the task's settings, so every
    checkpoint records them and a resume with another label order is refused by `fit` (the trained head's
    rows would then stand for other labels); a causal-LM task is its name."""
    name = TRAIN_TASKS[task]
    if task not in ("classification", "ner") or not labels:
        return name
    return dataclasses.replace(resolve_task(name), settings={"labels": [str(label) for label in labels]})
