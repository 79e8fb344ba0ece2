"""From resolved options to objects: the model (checkpoint or preset), its tokenizer, the PEFT method,
the dataset and the `TrainConfig`. Each function raises `CLIError` naming the offending option."""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch

from .. import data as ttdata
from ..data.templates import ChatTemplate, get_template
from ..models import PRESETS, build, load_pretrained, load_tokenizer
from ..peft import adapter, freeze, ia3, lora, prefix, prompt
from ..peft.methods import for_config
from ..seeding import check_seed
from ..train import TrainConfig
from ..train.config import PROGRESS, REPORTERS
from .options import DTYPES, METHODS, TASKS, TEMPLATES, CLIError



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
        except _load_errors() as err:
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


def _load_errors() -> tuple[type[BaseException], ...]:
    """What loading a damaged or unreadable checkpoint raises (safetensors has its own error type)."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        return OSError, ValueError, KeyError
    return OSError, ValueError, KeyError, SafetensorError


def _load_tokenizer(directory: str):
    path = Path(directory)
    if not path.is_dir():
        what = "not a directory" if path.exists() else "no such directory"
        raise CLIError(f"--tokenizer: {what}: {path}")
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as err:
        raise CLIError(f"--tokenizer {path}: {err}") from None
    if tokenizer is None:
        raise CLIError(f"--tokenizer: {path} has no tokenizer.json")
    return tokenizer


def _targets(spec):
    if isinstance(spec, (list, tuple)):
        return list(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise CLIError(f"--targets: expected 'all-linear' or comma-separated module names, got {spec!r}")
    return spec if spec == "all-linear" else [s.strip() for s in spec.split(",") if s.strip()]


# each CLI method name -> the config its options make; the method itself is found from the config
_CONFIGS = {
    "lora": lambda o: lora.LoraConfig(rank=o["rank"], alpha=o["alpha"], dropout=o["dropout"],
                                      targets=_targets(o["targets"]), rslora=bool(o["rslora"])),
    "dora": lambda o: lora.LoraConfig(rank=o["rank"], alpha=o["alpha"], dropout=o["dropout"],
                                      targets=_targets(o["targets"]), rslora=bool(o["rslora"]), dora=True),
    "ia3": lambda o: ia3.IA3Config(),
    "adapter": lambda o: adapter.AdapterConfig(bottleneck=o["bottleneck"], placement=o["placement"]),
    "prefix": lambda o: prefix.PrefixConfig(num_virtual_tokens=o["num_virtual_tokens"]),
    "prompt": lambda o: prompt.PromptConfig(num_virtual_tokens=o["num_virtual_tokens"]),
    "bitfit": lambda o: freeze.FreezeConfig(mode="bitfit"),
}


def _apply(model, method: str, opts: dict) -> list[str]:
    cfg = _CONFIGS[method](opts)
    return for_config(cfg).apply(model, cfg)


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


def load_dataset(path: str, tokenizer, opts: dict, labels=None, flag: str = "DATA"):
    """Examples from a JSONL file for `opts["task"]` (text, pairs, instructions, chats; classification and
    ner with `labels`, see `tasks.load_task_data`); `flag` names the file in messages (DATA, --eval-data).

    Raises:
        CLIError: a missing file, an unknown task or template, a bad record (file:line from the loader).
    """
    file, task, max_length = Path(path), opts["task"], opts["max_length"]
    if task not in TASKS:
        raise CLIError(f"--task: unknown task {task!r}; choose from {list(TASKS)}")
    if task in ("classification", "ner"):
        from .tasks import load_task_data
        return load_task_data(file, tokenizer, task, labels, opts, flag)
    if not file.is_file():
        raise CLIError(f"{flag}: {'not a file' if file.exists() else 'file not found'}: {file}")
    template = opts.get("template")  # None: the tokenizer's chat template if it has one, else the loader's default
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
    except (OSError, ValueError) as err:
        raise CLIError(f"{flag} {file}: {err}") from None


def check_out_dir(path: str, flag: str = "--out") -> Path:
    """`path` as an output directory that exists or can be made: checked before any work is done.

    Raises:
        CLIError: `path` is an existing file, lies under a file, or its nearest existing parent is not writable.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"{flag} {out}: exists and is not a directory (give a directory to write the run into)")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise CLIError(f"{flag} {out}: {parent} is a file, not a directory")
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {out}: {parent} is not writable")
    return out


# what a tinytune run writes into its --out (fit: checkpoints, metrics, the loss curve, tensorboard / wandb
# logs; the commands: their result)
RUN_ENTRIES = ("checkpoints", "metrics.jsonl", "loss.svg", "loss.png", "runs", "wandb", "adapter", "reward_model",
               "value_model")


def _listing(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f", ... ({len(names)} entries)" if len(names) > 6 else "")


def check_run_dir(out_dir: Path, resuming: bool) -> list[str]:
    """Refuse an --out that a run cannot use; returns the checkpoints it holds (see `_checkpoints`).

    An --out is new, empty, or a tinytune run (only RUN_ENTRIES, hidden leftovers of a killed save aside).
    A run with checkpoints is continued only with --resume (`resume_option`); a run without any (its
    metrics.jsonl, loss.svg or adapter, but nothing to go on from) is refused either way, since a fresh
    start there would mix two runs in one metrics.jsonl.

    Raises:
        CLIError: --out holds anything else (named), or a run that cannot be resumed.
    """
    if not out_dir.is_dir():
        return []
    entries = sorted(e.name for e in out_dir.iterdir() if not e.name.startswith("."))
    foreign = [name for name in entries if name not in RUN_ENTRIES]
    if foreign:
        raise CLIError(f"--out {out_dir} is not empty and is not a tinytune run: it holds {_listing(foreign)}; "
                       "give a new or empty directory (a run writes checkpoints/, metrics.jsonl, loss.png and "
                       "its adapter there)")
    found = _checkpoints(out_dir)
    if entries and not found:
        why = "--resume: nothing to resume from" if resuming else "a fresh start"
        raise CLIError(f"--out {out_dir} holds an earlier run ({_listing(entries)}) but no checkpoint; {why} would "
                       "write a second run into its metrics.jsonl: choose another --out (or remove this one)")
    return found


def resume_option(value, out_dir: Path):
    """`resume` for `TrainConfig`: None (start afresh), True (the latest checkpoint in --out, if any) or a
    directory that holds a checkpoint (a checkpoint itself or a run's --out). `fit` verifies it on load.
    --out itself is checked by `check_run_dir` first.

    Raises:
        CLIError: a value of another type, a directory with no checkpoint, a fresh start into an --out
            that holds another run's checkpoints (it would overwrite them), a checkpoint of one run
            resumed into the --out of another, an --out that is no run (`check_run_dir`); all before
            anything loads.
    """
    found = check_run_dir(out_dir, value is not None and value is not False)
    if value is None or value is False:
        if found:
            raise CLIError(f"--out {out_dir} already holds checkpoints of a run ({found[-1]}, ...): pass --resume "
                           "to continue it, or choose another --out")
        return None
    if value is True:
        return True
    if not isinstance(value, str) or not value:
        raise CLIError(f"--resume: expected nothing (the latest checkpoint in --out) or a directory, got {value!r}")
    if not Path(value).is_dir():
        raise CLIError(f"--resume: no such directory: {value}")
    if not _checkpoints(Path(value)):
        raise CLIError(f"--resume {value}: no checkpoint there (expected a checkpoint directory, or a run "
                       "directory with checkpoints/step-*)")
    mine = Path(value).resolve() in (out_dir.resolve(), *[p.resolve() for p in (out_dir / "checkpoints").glob("*")])
    if found and not mine:
        raise CLIError(f"--resume {value}: --out {out_dir} holds checkpoints of another run ({found[-1]}, ...); "
                       "resume a run into its own --out, or give a new --out")
    return value


def _checkpoints(directory: Path) -> list[str]:
    """Names of the checkpoints `directory` is or holds (those with a manifest; not verified here)."""
    from ..train.checkpoint import MANIFEST
    if (directory / MANIFEST).is_file():
        return [directory.name]
    return sorted(d.name for d in (directory / "checkpoints").glob("step-*") if (d / MANIFEST).is_file())


_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def check_device(device) -> None:
    """`--device` is "cpu", or "cuda" / "cuda:N" on a machine that has CUDA (refused here, not mid-run)."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise CLIError(f"--device: expected 'cpu' or 'cuda', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: no CUDA device is available here (torch.cuda.is_available() is False)")


def seed_option(value) -> int:
    """`--seed` as an int in [0, 2**32 - 1], checked before anything is loaded.

    Raises:
        CLIError: another type or a value outside numpy's seed range (named).
    """
    try:
        return check_seed(value, "--seed")
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from None


def train_config(opts: dict, out_dir, pad_token_id: int | None, resume=None, config_class=TrainConfig,
                 **fields) -> TrainConfig:
    """A `TrainConfig` (or `config_class`, a subclass such as `tt.rlhf.DPOConfig`) from the resolved options
    (`resume`: see `resume_option`); `fields` are the subclass's own (beta=..., eval_every=...).

    Raises:
        CLIError: a value the config rejects (its message names the field).
    """
    if opts["dtype"] not in DTYPES:
        raise CLIError(f"--dtype: unknown dtype {opts['dtype']!r}; choose from {list(DTYPES)}")
    if opts["progress"] not in PROGRESS:
        raise CLIError(f"--progress: unknown mode {opts['progress']!r}; choose from {list(PROGRESS)}")
    keys = ("lr", "steps", "batch_size", "grad_accum", "dtype", "grad_checkpointing", "schedule",
            "warmup_steps", "seed", "log_every", "device", "progress")
    try:
        return config_class(**{k: opts[k] for k in keys}, out_dir=out_dir, pad_token_id=pad_token_id or 0,
                            resume=resume, report_to=_reporters(opts.get("report_to", "none")), **fields)
    except (ValueError, TypeError) as err:  # named by its flag: TrainConfig.warmup_steps -> --warmup-steps
        raise CLIError(re.sub(r"TrainConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(err))) from None


def _reporters(value) -> tuple[str, ...]:
    """--report-to "tensorboard,wandb" (or a config file's list) as TrainConfig's tuple; "none": ()."""
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else list(value))]
    bad = [n for n in names if n not in REPORTERS + ("none", "")]
    if bad:
        raise CLIError(f"--report-to: unknown tracker {bad[0]!r}; choose from {list(REPORTERS)} (comma-separated) "
                       "or none")
    names = tuple(n for n in names if n and n != "none")
    for name in names:  # before anything loads, not as a traceback once training starts
        if importlib.util.find_spec(name) is None:
            raise CLIError(f"--report-to {name}: the {name} package is not installed (pip install {name})")
    return names


def world_size() -> int:
    """The processes of this run: torchrun's WORLD_SIZE (1 without torchrun); see `tt.train.distributed`."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """Rank 0 (or no torchrun): the process that prints and writes."""
    return os.environ.get("RANK", "0") in ("", "0")


def world_line(batch_size: int, grad_accum: int | None = None) -> str:
    """'world size W; global batch B x A x W = G examples per step' (training) or, without `grad_accum`
    (evaluation), 'world size W; global batch B x W = G examples'."""
    world = world_size()
    if grad_accum is None:
        return f"world size {world}; global batch {batch_size} x {world} = {batch_size * world} examples"
    return (f"world size {world}; global batch {batch_size} x {grad_accum} x {world} = "
            f"{batch_size * grad_accum * world} examples per step")


def where_line(out_dir: Path) -> str:
    """"loss curve: OUT/loss.png\nmetrics: OUT/metrics.jsonl" (the curve only when fit drew it: matplotlib)."""
    curve = out_dir / "loss.png"
    return (f"loss curve: {curve}\n" if curve.is_file() else "") + f"metrics: {out_dir / 'metrics.jsonl'}"


def stop_token_ids(tokenizer, template: str | None, has_chats: bool) -> list[int]:
    """Where generation stops: the tokenizer's EOS ids, plus a built-in chat template's end-of-turn token when
    it is one token (the named --template's; chatml's for chats when the tokenizer has no chat template of its
    own, as the loaders render them). With the tokenizer's own template its EOS ids are the stop."""
    ids = list(tokenizer.eos_token_ids)
    if template is None and has_chats and not ttdata.has_chat_template(tokenizer):
        template = "chatml"
    if template not in (None, "tokenizer"):
        named = get_template(template)
        turn_end = tokenizer.token_to_id(named.end_of_turn) if isinstance(named, ChatTemplate) else None
        if turn_end is not None and turn_end not in ids:
            ids.append(turn_end)
    return ids
