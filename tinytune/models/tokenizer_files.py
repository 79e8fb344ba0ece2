"""Reading a Hugging Face tokenizer directory's files (tokenizer.json and its json configs) for
`tinytune.models.tokenizer`, every error naming the file, no symlink leading out of the directory."""
from __future__ import annotations

import json
from pathlib import Path

import tokenizers

from .._files import contained_file

TOKENIZER_FILE = "tokenizer.json"
_NAMES = ("bos", "eos", "pad", "unk")
_TEMPLATE_NAMES = ("sep", "cls", "mask")  # read only as strings for chat templates (transformers' variables)


def _read_json(path: Path) -> dict:
    """Return the json object stored at `path`, or {} when the file does not exist (a symlink leading out
    of the tokenizer's directory is refused)."""
    if not path.is_file():
        return {}
    contained_file(path.parent, path.name, "tokenizer")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"could not read {path}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a json object, got {type(data).__name__}")
    return data


def _token_content(value, where: str) -> str | None:
    """A special token as written in a config: a string, an AddedToken dict {"content": ...}, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where} should be a string or a dict with a 'content' string, got {value!r}")


def _named_tokens(directory: Path, config: dict, json_pad: dict | None,
                  names=_NAMES) -> dict[str, tuple[str, str]]:
    """Map each of `names` ("bos"/"eos"/"pad"/"unk") to (token, source file) as transformers does:
    special_tokens_map.json beats tokenizer_config.json unless the latter has `added_tokens_decoder` (always,
    since transformers 4.34)."""
    sources = [("tokenizer_config.json", config)]
    if "added_tokens_decoder" not in config:
        sources.append(("special_tokens_map.json", _read_json(directory / "special_tokens_map.json")))
    found = {}
    if json_pad and json_pad.get("pad_token") and "pad" in names:  # padding in tokenizer.json: the weakest source
        found["pad"] = (json_pad["pad_token"], TOKENIZER_FILE)
    for file, data in sources:
        for name in names:
            key = f"{name}_token"
            if key in data:  # an explicit null unsets the token, as in transformers
                found[name] = (_token_content(data[key], f"{file} '{key}'"), file)
    return {name: hit for name, hit in found.items() if hit[0] is not None}


def _template_tokens(directory: Path, config: dict) -> dict[str, str]:
    """{"sep_token": ..., "cls_token": ..., "mask_token": ...} as named in the configs (those set), the strings
    transformers passes to chat templates besides bos/eos/pad/unk."""
    return {f"{n}_token": t for n, (t, _) in _named_tokens(directory, config, None, _TEMPLATE_NAMES).items()}


def _config_ids(directory: Path) -> list[tuple[str, dict[str, list]]]:
    """Special-token ids written as numbers, per file: generation_config.json first, then config.json."""
    out = []
    for file in ("generation_config.json", "config.json"):
        raw = {name: _read_json(directory / file).get(f"{name}_token_id") for name in ("bos", "eos", "pad")}
        out.append((file, {n: [v for v in (x if isinstance(x, list) else [x]) if v is not None]
                           for n, x in raw.items()}))
    return out


def _load_backend(directory: Path) -> tokenizers.Tokenizer:
    """Read `directory/tokenizer.json`, raising with the path and a hint when it is missing or broken."""
    if not directory.exists():
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    if not directory.is_dir():
        raise NotADirectoryError(f"expected a tokenizer directory, got a file: {directory}")
    file = directory / TOKENIZER_FILE
    if not file.is_file():
        others = sorted(p.name for p in directory.iterdir() if p.name in ("tokenizer.model", "vocab.json"))
        hint = f" (found {', '.join(others)}: convert once with transformers' AutoTokenizer)" if others else ""
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {directory}{hint}")
    contained_file(directory, TOKENIZER_FILE, "tokenizer")  # no symlink leading out of the directory
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust side raises a bare Exception for any parse error
        raise ValueError(f"could not read {file} as a `tokenizers` file: {err}") from err
