"""Command-line options shared by the subcommands, and the merge of a config file with the flags.

Every option is registered with `default=argparse.SUPPRESS`, so the parsed namespace holds only what the
user typed; `resolve` then layers DEFAULTS < config file < flags.
"""
from __future__ import annotations

import argparse
import json
import tomllib
from functools import partial
from pathlib import Path

from .. import _check
from ..rlhf import GRPO_LOSS_TYPES, LOSS_TYPES, DPOConfig, GRPOConfig
from ..rlhf.advantages import SCALES

METHODS = ("lora", "dora", "ia3", "adapter", "prefix", "prompt", "bitfit")
# the data formats of finetune's --task: four causal-LM formats (TrainConfig.task "causal_lm") and the two heads
LM_TASKS = ("text", "pairs", "instructions", "chats")
TASKS = LM_TASKS + ("classification", "ner")
DTYPES = ("fp32", "bf16", "fp16")
TEMPLATES = ("alpaca", "chatml", "llama3", "tokenizer")  # "tokenizer": the checkpoint's own chat template

DEFAULTS: dict[str, object] = {
    "method": "lora", "rank": 8, "alpha": 16.0, "dropout": 0.05, "targets": "all-linear", "rslora": False,
    "bottleneck": 64, "placement": "houlsby", "num_virtual_tokens": 20,
    "task": "instructions", "template": None, "max_length": None, "on_error": "raise", "tokenizer": None,
    "steps": 100, "lr": 2e-4, "batch_size": 8, "grad_accum": 1, "dtype": "fp32", "grad_checkpointing": False,
    "schedule": "constant", "warmup_steps": 0, "seed": 0, "log_every": 10, "device": "cpu",
    "progress": "auto", "report_to": "none",
    "seq_len": 256, "warmup": 2,
    "eval_data": None, "eval_every": 0, "save_every": 0, "labels": None, "center_coef": 0.0,
    "beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "precompute_ref": False, "sft_weight": 0.0,
}

# A command whose defaults differ from DEFAULTS: dpo's learning rate is DPOConfig's (5e-5; LoRA DPO wants a
# much lower rate than supervised tuning), never finetune's 2e-4 by accident.
COMMAND_DEFAULTS: dict[str, dict[str, object]] = {"dpo": {**DEFAULTS, "lr": DPOConfig.lr}}

# grpo's: GRPOConfig's learning rate (1e-5), loss type ("dapo"), beta (0.0) and sampling; --reward has none.
GRPO_FIELDS = ("lr", "group_size", "max_new_tokens", "temperature", "top_k", "top_p", "loss_type", "epsilon",
               "epsilon_high", "beta", "scale_rewards", "reward_weights", "mask_truncated_completions")
COMMAND_DEFAULTS["grpo"] = {**DEFAULTS, **{k: getattr(GRPOConfig, k) for k in GRPO_FIELDS}, "reward": None}


class CLIError(Exception):
    """A user error: printed as `tinytune <command>: error: <message>` with exit status 2."""


class ConfigFileError(CLIError, ValueError):
    """A bad `--config` file (unreadable, an unknown key, a value of the wrong type or out of range); the
    message names the file and the key. A CLIError (printed as one) and a ValueError."""


_int = partial(_check.integer, low=1)
_count = partial(_check.integer, low=0)
_optional_str = partial(_check.string, none=True)


def _resume(value, where: str):
    """`resume`: true (the latest checkpoint in out), false or null (start afresh), or a directory."""
    if value is None or isinstance(value, bool) or (isinstance(value, str) and value):
        return value
    raise _check.FieldError(f"{where} must be true, false, None or a directory, got {value!r} "
                            f"({type(value).__name__})")


# What each config-file key holds (the flags get the same types from argparse). Ranges are the library's
# (LoraConfig, TrainConfig, ...), checked here too so that the message names the file.
FILE_VALUES = {
    "method": partial(_check.string, choices=METHODS), "rank": _int,
    "alpha": partial(_check.number, low=0, low_open=True),
    "dropout": partial(_check.number, low=0, high=1, high_open=True),
    "targets": _check.string_or_list, "rslora": _check.boolean, "bottleneck": _int, "placement": _check.string,
    "num_virtual_tokens": _int,
    "checkpoint": _optional_str, "data": _optional_str, "out": _optional_str, "tokenizer": _optional_str,
    "task": partial(_check.string, choices=TASKS), "template": partial(_check.string, choices=TEMPLATES, none=True),
    "max_length": partial(_check.integer, low=1, none=True),
    "on_error": partial(_check.string, choices=("raise", "skip")),
    "steps": _int, "lr": partial(_check.number, low=0, low_open=True), "batch_size": _int, "grad_accum": _int,
    "dtype": partial(_check.string, choices=DTYPES), "grad_checkpointing": _check.boolean,
    "schedule": partial(_check.string, choices=("constant", "linear", "cosine")), "warmup_steps": _count,
    "seed": _count, "log_every": _int, "device": _check.string, "seq_len": _int, "warmup": _count,
    "progress": partial(_check.string, choices=("auto", "bar", "lines", "none")), "report_to": _check.string_or_list,
    "resume": _resume,
    "eval_data": _optional_str, "eval_every": _count, "save_every": _count, "labels": _check.string_or_list,
    "center_coef": partial(_check.number, low=0),
    "beta": partial(_check.number, low=0, low_open=True), "loss_type": partial(_check.string, choices=LOSS_TYPES),
    "label_smoothing": partial(_check.number, low=0, high=0.5, high_open=True), "precompute_ref": _check.boolean,
    "sft_weight": partial(_check.number, low=0),
}


def _weights(value, where: str):
    """`reward_weights`: None, comma-separated numbers ("1.0,0.5") or a list of numbers."""
    if value is None or isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in value):
        return value
    raise _check.FieldError(f"{where} must be comma-separated numbers or a list of numbers, got {value!r}")


# grpo's config-file keys (FILE_VALUES has them too); loss_type and beta differ from dpo's, see COMMAND_FILE_VALUES.
FILE_VALUES.update({
    "reward": _check.string_or_list, "reward_weights": _weights, "group_size": _int, "max_new_tokens": _int,
    "temperature": partial(_check.number, low=0, low_open=True), "top_k": partial(_check.integer, low=1, none=True),
    "top_p": partial(_check.number, low=0, high=1, low_open=True), "epsilon": partial(_check.number, low=0, low_open=True),
    "epsilon_high": partial(_check.number, low=0, low_open=True, none=True),
    "scale_rewards": partial(_check.string, choices=SCALES), "mask_truncated_completions": _check.boolean,
})
COMMAND_FILE_VALUES: dict[str, dict] = {"grpo": {"loss_type": partial(_check.string, choices=GRPO_LOSS_TYPES),
                                                 "beta": partial(_check.number, low=0)}}


def _flag(parser, name: str, help: str, defaults: dict = DEFAULTS, **kwargs) -> None:
    key = name.lstrip("-").replace("-", "_")
    if key in defaults and kwargs.get("action") not in ("store_true",):
        help = f"{help} (default: {defaults[key]})"
    parser.add_argument(name, default=argparse.SUPPRESS, help=help, **kwargs)


def add_method_options(parser: argparse.ArgumentParser) -> None:
    """--method and its hyper-parameters (LoRA/DoRA: rank, alpha, dropout, targets, rslora; adapter:
    bottleneck, placement; prefix/prompt: num_virtual_tokens; ia3 and bitfit take none: (IA)3 adapts
    k_proj, v_proj and down_proj, BitFit trains the biases)."""
    g = parser.add_argument_group("method")
    _flag(g, "--method", f"PEFT method, one of {', '.join(METHODS)}", metavar="NAME")
    _flag(g, "--rank", "LoRA rank r", type=int)
    _flag(g, "--alpha", "LoRA alpha (scaling = alpha / rank)", type=float)
    _flag(g, "--dropout", "dropout on the adapter input, in [0, 1)", type=float)
    _flag(g, "--targets", "modules to adapt: 'all-linear', or comma-separated names/suffixes such as "
          "q_proj,v_proj", metavar="SPEC")
    _flag(g, "--rslora", "rank-stabilised scaling alpha / sqrt(rank)", action="store_true")
    _flag(g, "--bottleneck", "adapter: bottleneck size", type=int)
    _flag(g, "--placement", "adapter: houlsby, pfeiffer or parallel", metavar="NAME")
    _flag(g, "--num-virtual-tokens", "prefix / prompt: virtual tokens P", type=int)


def add_train_options(parser: argparse.ArgumentParser, defaults: dict = DEFAULTS) -> None:
    """The `TrainConfig` fields a user sets most often (`defaults`: the command's, shown in the help)."""
    g = parser.add_argument_group("training")
    _flag(g, "--steps", "optimizer steps", type=int)
    _flag(g, "--lr", "peak learning rate", defaults, type=float)
    _flag(g, "--batch-size", "examples per micro-batch", type=int)
    _flag(g, "--grad-accum", "micro-batches per optimizer step", type=int)
    _flag(g, "--dtype", f"compute precision, one of {', '.join(DTYPES)}", metavar="DTYPE")
    _flag(g, "--grad-checkpointing", "recompute activations per block in backward", action="store_true")
    _flag(g, "--schedule", "learning-rate schedule: constant, linear or cosine", metavar="NAME")
    _flag(g, "--warmup-steps", "linear warmup steps", type=int)
    _flag(g, "--seed", "seeds the method's initial weights and training (tt.seed_everything; 0 to 2**32-1): "
          "the same seed gives a byte-identical adapter on the CPU", type=int)
    _flag(g, "--log-every", "print a progress line every N steps (when not on a terminal)", type=int)
    _flag(g, "--progress", "auto (a tqdm bar on a terminal, lines otherwise), bar, lines or none", metavar="MODE")
    _flag(g, "--report-to", "experiment trackers: tensorboard, wandb, both comma-separated, or none", metavar="NAMES")
    _flag(g, "--device", "cpu or cuda", metavar="DEVICE")


def read_config(path: str, known: set[str] | None = None, values: dict | None = None) -> dict:
    """A flat dict from a TOML or JSON file; one level of tables (`[train]`, `[lora]`) is flattened.

    Keys may use dashes or underscores (`batch-size` or `batch_size`). Each value must have the type
    (and range) of its option, see `FILE_VALUES`.

    Args:
        path: the .toml or .json file.
        known: the keys the command takes; None: any key of `FILE_VALUES`.
        values: the command's own checks of some keys, replacing FILE_VALUES' (`COMMAND_FILE_VALUES`).

    Raises:
        ConfigFileError: (a CLIError and a ValueError, naming the file) the file is missing, unreadable,
            not .toml/.json, or not a table/object; a table nested in a table; a key given twice; an
            unknown key (with the closest known one and all of them); a value of the wrong type or range.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigFileError(f"--config: file not found: {file}")
    try:
        if file.suffix == ".toml":
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        elif file.suffix == ".json":
            data = json.loads(file.read_text(encoding="utf-8"))
        else:
            raise ConfigFileError(f"--config: {file} must end in .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigFileError(f"--config: cannot parse {file}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"--config: {file} must hold a table/object of options, got {type(data).__name__}")
    flat = _flatten(data, file)
    checks = {**FILE_VALUES, **(values or {})}
    try:
        _check.known_keys(flat, FILE_VALUES if known is None else known, f"--config {file}")
        for key, value in flat.items():
            if key in checks:
                checks[key](value, f"--config {file}: key {key!r}")
    except _check.FieldError as err:
        raise ConfigFileError(str(err)) from None
    return flat


def _flatten(data: dict, file: Path) -> dict:
    """{option: value} from the file's top level and its tables; a key given twice is an error."""
    flat: dict = {}
    given: dict[str, str] = {}  # option -> where the file gave it, for the "twice" message
    for key, value in data.items():
        items = [(f"{key}.{k}", k, v) for k, v in value.items()] if isinstance(value, dict) else [(key, key, value)]
        for shown, k, v in items:
            if isinstance(v, dict):
                raise ConfigFileError(f"--config {file}: {shown!r} is a table inside a table; one level of "
                                      "tables ([train], [lora]) is flattened, deeper ones are not")
            option = k.replace("-", "_")
            if option in given:
                raise ConfigFileError(f"--config {file}: key {option!r} is given twice ({given[option]!r} and "
                                      f"{shown!r})")
            flat[option], given[option] = v, shown
    return flat


def resolve(args: argparse.Namespace, known: set[str], defaults: dict = DEFAULTS) -> dict:
    """`defaults` (DEFAULTS, or the command's from COMMAND_DEFAULTS) < config file (`args.config`) < flags
    typed on the command line.

    Raises:
        ConfigFileError: a bad config file (see `read_config`): among others a key that this command
            does not know (named, with the closest and all known keys) or a value of the wrong type.
    """
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "func")}
    checks = COMMAND_FILE_VALUES.get(getattr(args, "command", None))
    config = read_config(args.config, known, checks) if getattr(args, "config", None) else {}
    values = {k: v for k, v in defaults.items() if k in known}
    values.update(config)
    values.update({k: v for k, v in given.items() if v is not None})
    return values
