"""The integrity record of a save: `tinytune_manifest.json` lists every file's size and SHA-256 (and, for
safetensors, the header's hash); `verify` and `read_verified` check a directory, or the very bytes a
loader read, against it. Written by `tinytune._transaction` as the last file of every save.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from . import _check
from ._files import contained_file, read_json

MANIFEST = "tinytune_manifest.json"
FORMAT = "tinytune-save"
VERSION = 1
# Files above this size are checked by size and safetensors header on load, not by a full hash:
# hashing runs at ~1 GB/s, which would add seconds to every load of a multi-GB model.
FULL_HASH_MAX_BYTES = 1 << 30
# Deliberately never recorded: a model card is documentation meant to be edited (here or on the Hub), no
# loader reads it, and a recorded hash would make every edit look like damage to `verify`.
UNRECORDED = ("README.md",)


class IntegrityError(ValueError):
    """A saved directory does not match its manifest: a file is missing, truncated or changed."""


def manifest_entries(directory: Path) -> dict:
    """The `files` entries of a directory's manifest ({} when it has none or it is unreadable)."""
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_manifest(directory: Path, names: list[str], inherited: dict | None = None) -> None:
    """Write `directory/tinytune_manifest.json` recording each named file's size, SHA-256 (files up to
    `FULL_HASH_MAX_BYTES`) and, for safetensors, the header's SHA-256; `inherited` entries (files
    carried over from the previous save) are kept as they were recorded. Names in `UNRECORDED` (the
    model card) are left out, written or inherited."""
    files = {name: entry for name, entry in (inherited or {}).items() if name not in UNRECORDED}
    for name in (n for n in names if n not in UNRECORDED):
        file = directory / name
        size = file.stat().st_size
        files[name] = {"size": size}
        if size <= FULL_HASH_MAX_BYTES:  # (bigger files: size + header, as verify checks them)
            files[name]["sha256"] = _sha256(file)
        if name.endswith(".safetensors"):
            files[name]["header_sha256"] = _header_sha256(file)
    manifest = {"format": FORMAT, "version": VERSION, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def verify(directory, what: str, required: bool = False, listed=()) -> dict[str, Path] | None:
    """Check a saved directory against its manifest; None when it has none (written elsewhere), or,
    with `required` (tinytune's own formats, such as training checkpoints), an IntegrityError.

    Args:
        listed: names the manifest must list (the files the caller will read): a manifest that
            leaves them out protects nothing.

    Returns:
        {file name: path} of every file the manifest lists, all checked.

    Raises:
        IntegrityError: the manifest is damaged, or a file is missing, has another size or hash
            (named, with the expected and found values).
    """
    directory = Path(directory)
    entries = _read_entries(directory, what, required, listed)
    if entries is None:
        return None
    return {name: _verify_file(directory, name, entry, what) for name, entry in entries.items()}


def read_verified(directory, names, what: str) -> dict[str, bytes]:
    """The bytes of the files `names`, each checked against the directory's manifest (when it has one) AS
    READ: a save swapped in while reading shows as a changed manifest and the files are read again, so
    the result is never a mix of two saves.

    Raises:
        FileNotFoundError: a file is missing. IntegrityError: a file does not match the manifest.
    """
    directory = Path(directory)
    for _ in range(3):
        before = _manifest_bytes(directory)
        data = {name: contained_file(directory, name, what).read_bytes() for name in names}
        if _manifest_bytes(directory) != before:
            continue  # a save landed in between: read again
        entries = _read_entries(directory, what, False, names)
        for name, blob in data.items():
            if entries is not None:
                _verify_file(directory, name, entries[name], what, blob)
        return data
    raise IntegrityError(f"{what}: {directory} changed three times while it was read (another process is "
                         "saving into it): try again when it is done")


def _manifest_bytes(directory: Path) -> bytes | None:
    try:
        return (directory / MANIFEST).read_bytes()
    except FileNotFoundError:
        return None


def _read_entries(directory: Path, what: str, required: bool, listed) -> dict | None:
    if not (directory / MANIFEST).exists() and not (directory / MANIFEST).is_symlink():
        if required:
            raise IntegrityError(f"{what}: {directory} has no {MANIFEST}: it is incomplete, or was changed after "
                                 "the save")
        return None
    manifest_file = contained_file(directory, MANIFEST, what)
    try:
        manifest = _check.mapping(read_json(manifest_file, what), f"{what}: {manifest_file}")
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise ValueError(f"{what}: {manifest_file} is not a {FORMAT} manifest of version {VERSION}")
        entries = _check.mapping(manifest.get("files"), f"{what}: {manifest_file} field 'files'")
    except ValueError as err:
        raise IntegrityError(f"{err} (the manifest is damaged: the save cannot be trusted)") from None
    for name in entries:  # an entry naming a file outside is a hostile manifest, whatever the caller reads
        contained_file(directory, name, f"{what}: {manifest_file}")
    missing = [name for name in listed if name not in entries]
    if missing:
        raise IntegrityError(f"{what}: {manifest_file} does not list {missing}, which the save should hold (the "
                             "manifest is damaged or foreign: the save cannot be trusted)")
    return entries


def _verify_file(directory: Path, name: str, entry, what: str, data: bytes | None = None) -> Path:
    """Check one file (or the bytes `data` read from it) against its manifest entry."""
    file = contained_file(directory, name, f"{what}: {directory / MANIFEST}")
    where = f"{what}: {directory / MANIFEST} entry {name!r}"
    entry = _check.mapping(entry, where)
    size = _check.integer(entry.get("size"), f"{where} field 'size'", low=0)
    # the whole file's hash up to FULL_HASH_MAX_BYTES; above it, the safetensors header's (if any)
    field, digest = ("sha256", _sha256) if size <= FULL_HASH_MAX_BYTES else ("header_sha256", _header_sha256)
    expected = _check.optional(_check.string, entry.get(field), f"{where} field {field!r}")
    if expected is None and field == "sha256":
        raise IntegrityError(f"{where} lacks the field 'sha256' (the manifest is damaged)")
    if data is None and not file.is_file():
        raise IntegrityError(f"{what}: {file} is listed in {MANIFEST} but missing: the save is incomplete")
    found = len(data) if data is not None else file.stat().st_size
    if found != size:
        raise IntegrityError(f"{what}: {file} has {found} bytes, {MANIFEST} records {size}: the file is truncated "
                             f"or belongs to another save (if another tool rewrote it on purpose, delete {MANIFEST} "
                             "to load it unchecked)")
    if expected is not None and digest(data if data is not None else file) != expected:
        raise IntegrityError(f"{what}: {file} does not match its SHA-256 in {MANIFEST}: it was changed or damaged "
                             f"after the save (if you edited it on purpose, delete {MANIFEST} to load it unchecked)")
    return file


def _sha256(file: Path | bytes) -> str:
    if isinstance(file, bytes):
        return hashlib.sha256(file).hexdigest()
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _header_sha256(file: Path | bytes) -> str:
    """SHA-256 of a safetensors file's length prefix and JSON header (names, dtypes, shapes, offsets)."""
    if isinstance(file, bytes):
        length = int.from_bytes(file[:8], "little") if len(file) >= 8 else 0
        return hashlib.sha256(file[:8 + min(length, 100 << 20)]).hexdigest()
    with open(file, "rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
        header = f.read(min(length, 100 << 20))
    return hashlib.sha256(prefix + header).hexdigest()
