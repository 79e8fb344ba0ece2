"""Reading JSONL records with per-record error handling: every bad record is either rejected (ValueError
naming file:line) or skipped and listed in a report, never dropped silently."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

ON_ERROR = ("raise", "skip")


@dataclass(frozen=True)
class BadRecord:
    """One rejected record: where it is and why it was rejected."""

    path: str
    line: int  # 1-based, as editors count
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class RecordError(ValueError):
    """Raised by a record builder to say "this record is bad, for this reason"; the reader adds file:line."""


class Examples(list):
    """A plain list of example dicts (usable wherever a sequence of examples is), plus what was skipped.

    Attributes:
        bad_records: every `BadRecord` skipped with `on_error="skip"` (empty with "raise").
        label_names: for classification / NER, the label list that ids index into; None otherwise.
    """

    def __init__(self, items=(), bad_records=(), label_names=None):
        super().__init__(items)
        self.bad_records: list[BadRecord] = list(bad_records)
        self.label_names: list | None = label_names

    def report(self) -> str:
        """A printable summary: counts, then one `path:line: reason` per skipped record."""
        head = f"{len(self)} examples, {len(self.bad_records)} bad records skipped"
        return "\n".join([head] + [f"  {bad}" for bad in self.bad_records])


def check_on_error(on_error: str) -> None:
    """Raises ValueError unless `on_error` is "raise" or "skip"."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def iter_records(path) -> Iterator[tuple[int, object]]:
    """Yield (line number, parsed JSON or the RecordError describing why the line is not a JSON object).

    Blank lines hold no record and are passed over. Raises FileNotFoundError when `path` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    with path.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                yield number, RecordError(f"not valid JSON ({err.msg} at column {err.colno})")
                continue
            if not isinstance(record, dict):
                yield number, RecordError(f"expected a JSON object, got {type(record).__name__}")
                continue
            yield number, record


def build_examples(path, build: Callable[[dict], dict | list[dict]], on_error: str = "raise",
                   label_names=None) -> Examples:
    """Read `path` and turn each record into example(s) with `build`.

    Args:
        path: a JSONL file, one JSON object per line.
        build: record -> example dict (or a list of them); raises `RecordError(reason)` for a bad record.
        on_error: "raise": the first bad record raises ValueError("path:line: reason");
            "skip": bad records are left out and listed in `Examples.bad_records` (and a warning says how many).
        label_names: stored on the result.
    Returns:
        `Examples`.
    Raises:
        ValueError: a bad record with on_error="raise", or a bad `on_error`.
        FileNotFoundError: `path` does not exist.
    """
    check_on_error(on_error)
    out, bad = [], []
    for line, record in iter_records(path):
        try:
            if isinstance(record, RecordError):
                raise record
            made = build(record)
        except RecordError as err:
            bad_record = BadRecord(str(path), line, str(err))
            if on_error == "raise":
                raise ValueError(f"{bad_record} (pass on_error='skip' to skip bad records)") from None
            bad.append(bad_record)
            continue
        out.extend(made if isinstance(made, list) else [made])
    if bad:  # the caller may never look at the report: say it out loud once
        warnings.warn(f"skipped {len(bad)} bad records in {path} (first: {bad[0]}); see .bad_records")
    return Examples(out, bad, label_names)


def text_field(record: dict, name: str, allow_empty: bool = False) -> str:
    """record[name] as a non-empty string; RecordError naming the field otherwise."""
    if name not in record:
        raise RecordError(f"missing field {name!r} (fields: {sorted(record)})")
    value = record[name]
    if not isinstance(value, str):
        raise RecordError(f"field {name!r} should be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(f"field {name!r} is empty")
    return value


def list_field(record: dict, name: str) -> list:
    """record[name] as a non-empty list; RecordError naming the field otherwise."""
    if name not in record:
        raise RecordError(f"missing field {name!r} (fields: {sorted(record)})")
    value = record[name]
    if not isinstance(value, list):
        raise RecordError(f"field {name!r} should be a list, got {type(value).__name__}")
    if not value:
        raise RecordError(f"field {name!r} is empty")
    return value
