"""From resolved options to objects: the model (checkpoint or preset), its tokenizer, the PEFT method,
the dataset and the `TrainConfig`. Each function raises `CLIError` naming the offending option."""
from __future__ import annotations

from pathlib import Path

import torch

from .. import data as ttdata
from ..models import PRESETS, build, load_pretrained, load_tokenizer
from ..peft import adapter, freeze, ia3, lora, prefix, prompt
from ..train import TrainConfig
from .options import DTYPES, METHODS, TASKS, TEMPLATES, CLIError

_DEFAULT_TEMPLATE = {"instructions": "alpaca", "chats": "chatml"}


def load_model(name: str, tokenizer_dir: str | None = None, need_tokenizer: bool = False):
    """(model, tokenizer) from a checkpoint directory or a preset name.

    A preset gets random weights (`tt.models.build`); its tokenizer comes from `tokenizer_dir`, and the
    preset's vocabulary is resized to the tokenizer's. A checkpoint's own tokenizer.json is used unless
    `tokenizer_dir` is given.

    Raises:
        CLIError: `name` is neither a directory nor a preset; a tokenizer is needed and there is none.
    """
    path = Path(name)
    tokenizer = _load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    if path.is_dir():
        try:
            model, own = load_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as err:
            raise CLIError(f"checkpoint {path}: cannot load it: {err}") from None
        tokenizer = tokenizer or own
        where = f"checkpoint {path} has no tokenizer.json"
    elif name in PRESETS:
        overrides = {"vocab_size": tokenizer.vocab_size} if tokenizer is not None else {}
        model = build(name, **overrides)
        where = f"preset {name!r} has no tokenizer"
    else:
        looks_like_path = any(c in name for c in "/\\.") or path.exists()
        what = f"no such directory: {path}" if looks_like_path else f"unknown preset {name!r}"
        raise CLIError(f"{what}; give a checkpoint directory or one of the presets {sorted(PRESETS)}")
    if need_tokenizer and tokenizer is None:
        raise CLIError(f"{where}: pass --tokenizer DIR (a directory with tokenizer.json)")
    return model, tokenizer


def _load_tokenizer(directory: str):
    path = Path(directory)
    if not path.is_dir():
        raise CLIError(f"--tokenizer: no such directory: {path}")
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise CLIError(f"--tokenizer: {path} has no tokenizer.json")
    return tokenizer


def _targets(spec):
    if isinstance(spec, (list, tuple)):
        return list(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise CLIError(f"--targets: expected 'all-linear' or comma-separated module names, got {spec!r}")
    return spec if spec == "all-linear" else [s.strip() for s in spec.split(",") if s.strip()]


def _apply(model, method: str, opts: dict) -> list[str]:
    if method in ("lora", "dora"):
        cfg = lora.LoraConfig(rank=opts["rank"], alpha=opts["alpha"], dropout=opts["dropout"],
                              targets=_targets(opts["targets"]), rslora=bool(opts["rslora"]), dora=method == "dora")
        return lora.apply(model, cfg)
    if method == "ia3":
        return ia3.apply(model, ia3.IA3Config())
    if method == "adapter":
        return adapter.apply(model, adapter.AdapterConfig(bottleneck=opts["bottleneck"], placement=opts["placement"]))
    if method == "prefix":
        return prefix.apply(model, prefix.PrefixConfig(num_virtual_tokens=opts["num_virtual_tokens"]))
    if method == "prompt":
        return prompt.apply(model, prompt.PromptConfig(num_virtual_tokens=opts["num_virtual_tokens"]))
    return freeze.bitfit(model)


def apply_method(model, opts: dict) -> list[str]:
    """Apply `opts["method"]` with its options to `model` in place; returns the adapted module names.

    Raises:
        CLIError: an unknown method, or an invalid method option (the library's message, prefixed).
    """
    method = opts["method"]
    if method not in METHODS:
        raise CLIError(f"--method: unknown method {method!r}; choose from {list(METHODS)}")
    try:
        return _apply(model, method, opts)
    except (ValueError, TypeError) as err:
        raise CLIError(f"--method {method}: {err}") from None


def load_dataset(path: str, tokenizer, opts: dict):
    """Examples from a JSONL file for `opts["task"]` (text, pairs, instructions, chats).

    Raises:
        CLIError: a missing file, an unknown task or template, a bad record (file:line from the loader).
    """
    file, task, max_length = Path(path), opts["task"], opts["max_length"]
    if not file.is_file():
        raise CLIError(f"DATA: file not found: {file}")
    if task not in TASKS:
        raise CLIError(f"--task: unknown task {task!r}; choose from {list(TASKS)}")
    template = opts.get("template") or _DEFAULT_TEMPLATE.get(task)
    if template is not None and template not in TEMPLATES:
        raise CLIError(f"--template: unknown template {template!r}; choose from {list(TEMPLATES)}")
    common = dict(max_length=max_length, truncate=max_length is not None, on_error=opts["on_error"])
    try:
        if task == "text":
            return ttdata.load_text(file, tokenizer, max_length or 512, on_error=opts["on_error"])
        if task == "pairs":
            return ttdata.load_pairs(file, tokenizer, **common)
        if task == "instructions":
            return ttdata.load_instructions(file, tokenizer, template, **common)
        return ttdata.load_chats(file, tokenizer, template, **common)
    except ValueError as err:
        raise CLIError(f"DATA {file}: {err}") from None


def train_config(opts: dict, out_dir, pad_token_id: int | None) -> TrainConfig:
    """A `TrainConfig` from the resolved options.

    Raises:
        CLIError: a value `TrainConfig` rejects (its message names the field).
    """
    if opts["dtype"] not in DTYPES:
        raise CLIError(f"--dtype: unknown dtype {opts['dtype']!r}; choose from {list(DTYPES)}")
    keys = ("lr", "steps", "batch_size", "grad_accum", "dtype", "grad_checkpointing", "schedule",
            "warmup_steps", "seed", "log_every", "device")
    try:
        return TrainConfig(**{k: opts[k] for k in keys}, out_dir=out_dir, pad_token_id=pad_token_id or 0)
    except (ValueError, TypeError) as err:
        raise CLIError(str(err)) from None
