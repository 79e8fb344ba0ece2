"""Saves as transactions: a directory is replaced as a whole, and what it holds is verified on load.

    with directory_transaction(path, owned=["adapter_*"], what="save_adapter") as staging:
        ...write the new files into `staging`...
    # here `path` is the complete new save; at every instant before, it was the complete old one

How: the new content is written into a hidden sibling (`.<name>.tt-new-<pid>-<random>`), every file
and the directory are fsynced, an integrity manifest (`tinytune_manifest.json`: every file's size
and SHA-256) is written last, and the sibling is swapped with `path` in one atomic
`renameat2(RENAME_EXCHANGE)` (Linux); the manifest itself lives in `tinytune._manifest`. The old content, now in the sibling, is removed only after
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
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Iterator

from ._files import file_mode, fsync_dir, fsync_file
from ._manifest import MANIFEST, manifest_entries, verify, write_manifest

_TAG = ".tt-"


class SaveError(OSError):
    """A save could not be completed (full disk, permissions, ...); the previous save is intact."""


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
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        code = err.errno if isinstance(err, OSError) else _rust_os_error(err) if isinstance(err, Exception) else None
        if code is None or isinstance(err, SaveError):
            raise
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise SaveError(code, f"{what}: writing {path} failed ({reason}); the previous save there, if any, "
                        "is intact") from err


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
    previous = manifest_entries(old)
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


def describe_missing(path) -> str:
    """A hint for a missing save: where an interrupted save left a complete copy, if it did."""
    path = Path(path).absolute()
    if path.exists() or not path.parent.is_dir():
        return ""
    for _, _, entry in _siblings(path):
        if (entry / MANIFEST).is_file():
            return f" (an interrupted save left a complete copy in {entry}: rename it to {path.name} to use it)"
    return ""
