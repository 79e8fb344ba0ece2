"""Small file helpers shared by every reader and writer: atomic single-file writes, named read errors,
paths contained in their directory, and size strings.

Readers here never execute pickles, and every error names the file (and what was expected).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new names, renames) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def file_mode() -> int:
    """The mode `open()` gives a new file under the current umask (some writers, e.g. safetensors and
    mkstemp, create files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write) -> None:
    """Call `write(tmp_path)` on a temporary file beside `path`, fsync it, then rename it onto `path`.

    For single files that stand alone (metrics, pictures); a save of several files that must agree
    uses `tinytune._transaction.directory_transaction` instead.
    """
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, file_mode())  # mkstemp makes 0600 (and writers may recreate it)
        fsync_file(Path(tmp))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        _remove(tmp)
        raise OSError(err.errno, f"writing {path} failed ({err.strerror or err}); the previous file, if any, "
                      "is intact") from err
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp) -> None:
    if tmp is not None and os.path.exists(tmp):
        os.remove(tmp)


def read_json(file: Path, what: str) -> object:
    """Parse a JSON file; ValueError naming `what` and the file for bad JSON or bad UTF-8.

    Raises:
        FileNotFoundError: the file does not exist. ValueError: it is not valid UTF-8 JSON.
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{what}: {file} not found" + (" (it is a directory)" if file.is_dir() else ""))
    return parse_json(file.read_bytes(), file, what)


def parse_json(data: bytes, file: Path, what: str) -> object:
    """`read_json` on bytes already read from `file` (named in the errors)."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{what}: {file} is not valid UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what}: {file} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                         "the file may be truncated or hand-edited") from None


def read_safetensors(file: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; ValueError naming the file when it is damaged or truncated."""
    from safetensors.torch import load_file

    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{what}: {file} not found")
    return _safetensors_or_error(lambda: load_file(str(file)), file, what)


def parse_safetensors(data: bytes, file: Path, what: str) -> dict[str, torch.Tensor]:
    """`read_safetensors` on bytes already read from `file` (named in the errors)."""
    from safetensors.torch import load

    return _safetensors_or_error(lambda: load(data), file, what)


def _safetensors_or_error(read, file: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    try:
        return read()
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"{what}: {file} is not a readable safetensors file ({err}); it may be truncated "
                         "or damaged") from None


def contained_file(directory: Path, name, what: str) -> Path:
    """`directory / name`, refused unless `name` is a relative path that stays inside `directory`.

    Files named by an index or manifest (shard names, manifest entries) must not reach outside their
    directory: no absolute path, no `..`, no symlink leading out. One layout is allowed to point out:
    a Hugging Face hub cache snapshot (`<repo>/snapshots/<rev>/`), whose files are symlinks into the
    same repository's `blobs/` folder.

    Raises:
        ValueError: naming `what` and the offending entry.
    """
    directory = Path(directory)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{what}: file entry {name!r} is not a file name")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise ValueError(f"{what}: file entry {name!r} is an absolute path; entries must name files inside {directory}")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise ValueError(f"{what}: file entry {name!r} leaves {directory} ('..'); entries must name files inside it")
    target = (directory / name).resolve()
    home = directory.resolve()
    if target != home and home in target.parents:
        return directory / name
    if _hub_blob(directory, target):
        return directory / name
    raise ValueError(f"{what}: file entry {name!r} resolves to {target}, outside {home} (a symlink leading out "
                     "of the directory is refused)")


def _hub_blob(directory: Path, target: Path) -> bool:
    """Whether `target` is a blob of the hub-cache repository whose snapshot `directory` is."""
    snapshot = directory.resolve()
    if snapshot.parent.name != "snapshots":
        return False
    blobs = snapshot.parent.parent / "blobs"
    return target.parent == blobs


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "200MB", "1GiB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"max_shard_size must be >= 1 byte, got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r}: expected bytes or a string like '5GB' / '200MB'")
    return max(1, int(float(match.group(1)) * _UNITS[match.group(2)]))
