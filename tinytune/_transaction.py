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
        owned: file-name patterns (fnmatch) of the old directory that belong to this kind of save and
            are dropped rather than carried over (e.g. stale shards); files listed in the old
            manifest are owned too.
        what: names the caller in errors ("save_adapter", ...).

    Raises:
        SaveError: writing failed (the old save is left intact; the message names the path).
        NotADirectoryError: `path` exists and is not a directory.
    """
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what}: {path} exists and is not a directory")
    if path.exists() and path.samefile(Path.cwd()) or path.resolve() in Path.cwd().resolve().parents:
        raise ValueError(f"{what}: {path} is the current directory or holds it; a save replaces its directory "
                         "as a whole, so save into a subdirectory (e.g. ./adapter)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SaveError(err.errno, f"{what}: cannot create {path.parent}: {err.strerror or err}") from None
    remove_leftovers(path)
    staging = path.parent / f".{path.name}{_TAG}new-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
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
    write_manifest(staging, written)
    if path.is_dir():
        _carry_over(path, staging, set(written) | {MANIFEST}, owned)
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


def _carry_over(old: Path, new: Path, written: set[str], owned) -> None:
    """Hard-link the old directory's entries that this save neither wrote nor owns into `new`."""
    previous = set(_manifest_files(old))
    for entry in old.iterdir():
        name = entry.name
        if name in written or name in previous or any(fnmatch.fnmatch(name, pattern) for pattern in owned):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / name)
        elif entry.is_dir():
            shutil.copytree(entry, new / name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / name)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _manifest_files(directory: Path) -> list[str]:
    try:
        return list(json.loads((directory / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


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
    for entry in sorted(path.parent.glob(f".{_glob_escape(path.name)}{_TAG}*")):
        kind, _, rest = entry.name[len(path.name) + 1 + len(_TAG):].partition("-")
        pid = rest.split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
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


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def write_manifest(directory: Path, names: list[str]) -> None:
    """Write `directory/tinytune_manifest.json` recording each named file's size, SHA-256 (files up to
    `FULL_HASH_MAX_BYTES`) and, for safetensors, the header's SHA-256."""
    files = {}
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


def verify(directory, what: str, required: bool = False) -> dict[str, Path] | None:
    """Check a saved directory against its manifest; None when it has none (written elsewhere), or,
    with `required` (tinytune's own formats, such as training checkpoints), an IntegrityError.

    Returns:
        {file name: path} of every file the manifest lists, all checked.

    Raises:
        IntegrityError: the manifest is damaged, or a file is missing, has another size or hash
            (named, with the expected and found values).
    """
    directory = Path(directory)
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
        return {name: _verify_file(directory, name, entry, what) for name, entry in entries.items()}
    except IntegrityError:
        raise
    except ValueError as err:
        raise IntegrityError(f"{err} (the manifest is damaged: the save cannot be trusted)") from None


def _verify_file(directory: Path, name: str, entry, what: str) -> Path:
    file = contained_file(directory, name, f"{what}: {directory / MANIFEST}")
    where = f"{what}: {directory / MANIFEST} entry {name!r}"
    entry = _check.mapping(entry, where)
    size = _check.integer(entry.get("size"), f"{where} field 'size'", low=0)
    # the whole file's hash up to FULL_HASH_MAX_BYTES; above it, the safetensors header's (if any)
    field, digest = ("sha256", _sha256) if size <= FULL_HASH_MAX_BYTES else ("header_sha256", _header_sha256)
    expected = _check.optional(_check.string, entry.get(field), f"{where} field {field!r}")
    if expected is None and field == "sha256":
        raise IntegrityError(f"{where} lacks the field 'sha256' (the manifest is damaged)")
    if not file.is_file():
        raise IntegrityError(f"{what}: {file} is listed in {MANIFEST} but missing: the save is incomplete")
    found = file.stat().st_size
    if found != size:
        raise IntegrityError(f"{what}: {file} has {found} bytes, {MANIFEST} records {size}: the file is truncated "
                             f"or belongs to another save (if another tool rewrote it on purpose, delete {MANIFEST} "
                             "to load it unchecked)")
    if expected is not None and digest(file) != expected:
        raise IntegrityError(f"{what}: {file} does not match its SHA-256 in {MANIFEST}: it was changed or damaged "
                             f"after the save (if you edited it on purpose, delete {MANIFEST} to load it unchecked)")
    return file


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _header_sha256(file: Path) -> str:
    """SHA-256 of a safetensors file's length prefix and JSON header (names, dtypes, shapes, offsets)."""
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
    for entry in sorted(path.parent.glob(f".{_glob_escape(path.name)}{_TAG}*")):
        if (entry / MANIFEST).is_file():
            return f" (an interrupted save left a complete copy in {entry}: rename it to {path.name} to use it)"
    return ""
