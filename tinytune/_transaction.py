"""Saves as transactions: a directory is replaced as a whole, and what it holds is verified on load.

    with directory_transaction(path, owned=["adapter_*"], what="save_adapter") as staging:
        ...write the new files into `staging`...
    # here `path` is the complete new save; at every instant before, it was the complete old one

How: the new content is written into a hidden sibling (`.<name>.tt-new-<pid>-<random>`), every file
and the directory are fsynced, an integrity manifest (`tinytune_manifest.json`: every file's size
and SHA-256) is written last, and the sibling is swapped with `path` in one atomic
`renameat2(RENAME_EXCHANGE)` (Linux). The old content, now in the sibling, is removed only after
the swap is on disk. Where the exchange is not available (another OS, a filesystem without it),
two renames are used and the old save survives in `.<name>.tt-old-*` for the instant between them.

Entries of the old directory that this save does not own (a user's README, tokenizer files when
none is written this time, subdirectories) are carried into the new one by hard links, so a save
never deletes what it did not write. Leftovers of a killed save are hidden siblings: loaders never
look at them, and the next save of the same path removes them (unless their process still runs).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Iterator

from . import _check
from ._files import contained_file, file_mode, fsync_dir, fsync_file, read_json

MANIFEST = "tinytune_manifest.json"
FORMAT = "tinytune-save"
VERSION = 1
# Files above this size are checked by size and safetensors header on load, not by a full hash:
# hashing runs at ~1 GB/s, which would add seconds to every load of a multi-GB model.
FULL_HASH_MAX_BYTES = 1 << 30
_TAG = ".tt-"


class SaveError(OSError):
    """A save could not be completed (full disk, permissions, ...); the previous save is intact."""


class IntegrityError(ValueError):
    """A saved directory does not match its manifest: a file is missing, truncated or changed."""


@contextlib.contextmanager
def directory_transaction(path, owned=(), what: str = "save") -> Iterator[Path]:
    """Yield an empty staging directory; on a clean exit it becomes `path`, atomically.

    Args:
        path: the directory the save replaces (created when absent; its parents too).
        owned: exact file-name patterns (fnmatch) of the old directory that this kind of save
            supersedes and drops rather than carries over (e.g. stale shards of another count);
            everything else is carried over, with its manifest entry when it had one.
        what: names the caller in errors ("save_adapter", ...).

    Raises:
        SaveError: writing failed (the old save is left intact; the message names the path), or
            `path` is a mount point or its parent is not writable (it cannot be swapped there).
        NotADirectoryError: `path` exists and is not a directory.
    """
    path = Path(path).absolute()
    if path.is_symlink():
        path = path.resolve()  # save into the directory the link names; the link stays a link
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what}: {path} exists and is not a directory")
    if path.exists() and path.samefile(Path.cwd()) or path.resolve() in Path.cwd().resolve().parents:
        raise ValueError(f"{what}: {path} is the current directory or holds it; a save replaces its directory "
                         "as a whole, so save into a subdirectory (e.g. ./adapter)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SaveError(err.errno, f"{what}: cannot create {path.parent}: {err.strerror or err}") from None
    if os.path.ismount(path):
        raise SaveError(errno.EBUSY, f"{what}: {path} is a mount point, which cannot be swapped as a whole; "
                        "save into a subdirectory of it")
    remove_leftovers(path)
    staging = path.parent / f".{path.name}{_TAG}new-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        staging.mkdir()
    except OSError as err:
        raise SaveError(err.errno, f"{what}: cannot stage the save beside {path} ({err.strerror or err}); a save "
                        "needs to write in the directory that holds it") from None
    try:
        yield staging
        _commit(staging, path, owned)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, SaveError):
            raise
        raise SaveError(err.errno, f"{what}: writing {path} failed ({err.strerror or err}); the previous save "
                        "there, if any, is intact") from err
    except Exception as err:
        shutil.rmtree(staging, ignore_errors=True)
        code = _rust_os_error(err)
        if code is None:
            raise
        raise SaveError(code, f"{what}: writing {path} failed ({err}); the previous save "
                        "there, if any, is intact") from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _rust_os_error(err: Exception) -> int | None:
    """The errno of an I/O error that a Rust-backed writer raised as a non-OSError (safetensors'
    SafetensorError, tokenizers' bare Exception: "... File too large (os error 27)"), else None."""
    match = re.search(r"\(os error (\d+)\)", str(err))
    return int(match.group(1)) if match else None


def _commit(staging: Path, path: Path, owned) -> None:
    written = sorted(p.name for p in staging.iterdir())
    if any(not (staging / name).is_file() or (staging / name).is_symlink() for name in written):
        raise ValueError(f"internal: a save may only write plain files, found {written} in {staging}")
    inherited = _carry_over(path, staging, set(written) | {MANIFEST}, owned) if path.is_dir() else {}
    write_manifest(staging, written, inherited)
    mode = file_mode()
    for name in written + [MANIFEST]:
        os.chmod(staging / name, mode)
        fsync_file(staging / name)
    fsync_dir(staging)
    if path.is_dir():
        _swap(staging, path)
    else:
        os.rename(staging, path)
        fsync_dir(path.parent)


def _carry_over(old: Path, new: Path, written: set[str], owned) -> dict:
    """Hard-link the old directory's entries that this save neither wrote nor owns into `new`; return
    the old manifest's entries of the carried files (another kind of save wrote them: a model's
    files stay verified after a tokenizer is saved beside them)."""
    previous = _manifest_entries(old)
    inherited = {}
    for entry in old.iterdir():
        name = entry.name
        if name in written or any(fnmatch.fnmatch(name, pattern) for pattern in owned):
            continue
        if name in previous:
            inherited[name] = previous[name]
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / name)
        elif entry.is_dir():
            shutil.copytree(entry, new / name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / name)
    return inherited


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _manifest_entries(directory: Path) -> dict:
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
        return files if isinstance(files, dict) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _swap(staging: Path, path: Path) -> None:
    """Exchange `staging` (new) and `path` (old) atomically, then remove the old content."""
    if _exchange(staging, path):
        fsync_dir(path.parent)
        shutil.rmtree(staging, ignore_errors=True)  # holds the old save now
        return
    old = path.parent / f".{path.name}{_TAG}old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(path, old)  # between these two renames a reader finds no `path`; `old` is complete
    os.rename(staging, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """renameat2(a, b, RENAME_EXCHANGE); False where the call or the flag is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def remove_leftovers(path: Path) -> None:
    """Remove the hidden siblings a killed save of `path` left (not those of a save still running).

    When `path` itself is missing because a save was killed between its two renames (systems without
    an atomic exchange), the complete copy is first put back as `path`: the new one if it verifies,
    else the old one.
    """
    path = Path(path).absolute()
    if not path.parent.is_dir():
        return
    leftovers = []
    for kind, pid, entry in _siblings(path):
        if _alive(pid):  # a save still running (this process's own too: another thread)
            continue
        leftovers.append((kind, entry))
    if not path.exists():
        for kind, entry in sorted(leftovers, key=lambda item: item[0] != "new"):
            if _verifies(entry):
                os.rename(entry, path)
                fsync_dir(path.parent)
                break
    for _, entry in leftovers:
        shutil.rmtree(entry, ignore_errors=True)


def _verifies(directory: Path) -> bool:
    try:
        return verify(directory, "recover") is not None
    except (ValueError, OSError):
        return False


def _siblings(path: Path) -> list[tuple[str, int, Path]]:
    """(kind "new"/"old", pid, directory) of every staging sibling a save of `path` made (exact names only:
    a user's `.name.tt-notes` or another path's siblings never match)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}{re.escape(_TAG)}(new|old)-(\d+)-[0-9a-f]{{8}}")
    found = []
    for entry in sorted(path.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            found.append((match.group(1), int(match.group(2)), entry))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def write_manifest(directory: Path, names: list[str], inherited: dict | None = None) -> None:
    """Write `directory/tinytune_manifest.json` recording each named file's size, SHA-256 (files up to
    `FULL_HASH_MAX_BYTES`) and, for safetensors, the header's SHA-256; `inherited` entries (files
    carried over from the previous save) are kept as they were recorded."""
    files = dict(inherited or {})
    for name in names:
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


def describe_missing(path) -> str:
    """A hint for a missing save: where an interrupted save left a complete copy, if it did."""
    path = Path(path).absolute()
    if path.exists() or not path.parent.is_dir():
        return ""
    for _, _, entry in _siblings(path):
        if (entry / MANIFEST).is_file():
            return f" (an interrupted save left a complete copy in {entry}: rename it to {path.name} to use it)"
    return ""
