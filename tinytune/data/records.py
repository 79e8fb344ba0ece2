"""Reading JSONL records with per-record error handling: every bad record is either rejected (ValueError
naming file:line) or skipped and listed in a report, never dropped silently.

A line is a bad record like any other when it is not valid UTF-8, not valid JSON, not a JSON object, or
longer than `MAX_LINE_BYTES`: the file is read in binary and each line decoded on its own, so one such line
never stops the others from being read.
"""
from __future__ import annotations

import codecs
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

ON_ERROR = ("raise", "skip")
MAX_LINE_BYTES = 16 * 2**20  # longest line read (16 MiB, newline excluded); a longer one is a bad record
_CHUNK = 2**20  # how much of an over-long line is read at a time while passing over it


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
    """Yield (line number, parsed JSON object, or the RecordError saying why the line is not one).

    Blank lines hold no record and are passed over. A UTF-8 byte-order mark at the start is ignored.

    Raises:
        FileNotFoundError: `path` does not exist. IsADirectoryError: it is a directory.
        PermissionError / OSError: it cannot be opened (the message names the path).
    """
    path = Path(path)
    with _open(path) as handle:
        for number, raw in enumerate(_lines(handle), start=1):
            if number == 1 and isinstance(raw, bytes):
                raw = raw.removeprefix(codecs.BOM_UTF8)
            record = _parse(raw)
            if record is not None:
                yield number, record


def _open(path: Path):
    """`path` opened for reading in binary, or an error naming it."""
    if not path.exists():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected a JSONL file, got a directory: {path}")
    try:
        return path.open("rb")
    except PermissionError:
        raise PermissionError(f"cannot read JSONL file {path}: permission denied") from None
    except OSError as err:
        raise OSError(f"cannot read JSONL file {path}: {err.strerror or err}") from None


def _lines(handle) -> Iterator[bytes | int]:
    """Each line's bytes (newline included), or for a line over MAX_LINE_BYTES its length in bytes, having
    read past it a chunk at a time (never holding more than one line of the limit in memory)."""
    while line := handle.readline(MAX_LINE_BYTES + 1):
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            yield line
            continue
        length = len(line)
        while (more := handle.readline(_CHUNK)) and not more.endswith(b"\n"):
            length += len(more)
        yield length + len(more.rstrip(b"\n"))


def _parse(raw: bytes | int) -> object | None:
    """The JSON object on one line, a RecordError saying why it is none, or None for a blank line."""
    if isinstance(raw, int):
        return RecordError(f"line is {raw:,} bytes long, more than the {MAX_LINE_BYTES:,} bytes allowed "
                           "(records.MAX_LINE_BYTES)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return RecordError(f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})")
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        return RecordError(f"not valid JSON ({err.msg} at column {err.colno})")
    except (ValueError, RecursionError) as err:  # e.g. an integer of more digits than Python converts
        return RecordError(f"not valid JSON ({type(err).__name__}: {err})")
    if not isinstance(record, dict):
        return RecordError(f"expected a JSON object, got {type(record).__name__}")
    return record


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
        FileNotFoundError, IsADirectoryError, PermissionError: `path` cannot be read as a file (see `iter_records`).
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
