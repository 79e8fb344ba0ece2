"""The `eval` and `merge` subcommands, and loading a base with a trained adapter (what `generate` uses too).

    tinytune eval CHECKPOINT --adapter runs/x/adapter --data held_out.jsonl [--json]
    tinytune merge CHECKPOINT runs/x/adapter merged/

The adapter's task and labels come from the `tinytune_task.json` that `finetune` writes beside it (see
`tasks.py`); an adapter from elsewhere takes --task (and --labels for a classifier). `merge` folds LoRA or
(IA)3 into the weights with `tt.save_pretrained` and refuses what does not fold (prompts, prefixes,
bottleneck adapters) and classifier heads (save_pretrained writes causal LMs only).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .. import _check
from ..models import save_pretrained
from ..peft import load_adapter
from ..peft.methods import METHODS, by_peft_type
from ..train import TrainConfig
from .options import DTYPES, CLIError
from .reports import final_metrics
from .setup import check_device, is_main_process, load_dataset, load_model, world_line
from .tasks import TRAIN_TASKS, check_task, parse_labels, read_task_file, same_kind, task_model

HEADS = ("classification", "ner")


@dataclass
class Adapted:
    """A base with its adapter loaded, and what the adapter directory says of its task."""

    model: object  # the CausalLM, or the head on it
    tokenizer: object
    task: str  # a finetune --task value
    labels: list | None
    record: dict  # tinytune_task.json's content ({} when there is none)


def _adapter_task(adapter: Path, task_flag, labels_flag) -> tuple[str, list | None, dict]:
    """(task, labels, task record) from --task / --labels and the adapter's own record, which wins where the
    flags say nothing and must agree where they do."""
    try:
        record = read_task_file(adapter) or {}
    except ValueError as err:
        raise CLIError(f"--adapter {adapter}: {err}") from None
    saved = record.get("task")
    task = check_task(task_flag) if task_flag is not None else (saved or "instructions")
    if saved is not None and not same_kind(task, saved):
        raise CLIError(f"--task {task}: the adapter {adapter} was trained for --task {saved} (its tinytune_task.json"
                       " or adapter_config.json task_type); leave --task out or give a matching one")
    labels = parse_labels(labels_flag, task)
    if labels is not None and record.get("labels") is not None and [str(n) for n in record["labels"]] != labels:
        raise CLIError(f"--labels {','.join(labels)}: the adapter {adapter} was trained with labels "
                       f"{record['labels']} (in id order); leave --labels out")
    labels = record.get("labels") if labels is None else labels
    if task in HEADS and labels is None:
        raise CLIError(f"--adapter {adapter}: no labels saved with it (no tinytune_task.json): give --labels a,b,c "
                       "in id order")
    return task, labels, record


def load_adapted(checkpoint, adapter_dir, tokenizer_dir=None, task_flag=None, labels_flag=None) -> Adapted:
    """Load CHECKPOINT (a directory or preset), build the adapter's head on it if it has one, load the adapter.

    Raises:
        CLIError: a missing adapter directory, a task or labels that contradict the adapter's, or an adapter
            that does not load onto this base (load_adapter's message, prefixed with --adapter).
    """
    adapter = Path(adapter_dir)
    if not adapter.is_dir():
        raise CLIError(f"--adapter: {'not a directory' if adapter.exists() else 'no such directory'}: {adapter}")
    task, labels, record = _adapter_task(adapter, task_flag, labels_flag)
    decoder, tokenizer = load_model(str(checkpoint), tokenizer_dir, need_tokenizer=True)
    model = task_model(decoder, task, labels)
    try:
        load_adapter(model, adapter)
    except (OSError, ValueError, TypeError) as err:
        raise CLIError(f"--adapter {adapter}: {err}") from None
    return Adapted(model, tokenizer, task, labels, record)


def evaluate_adapter(opts: dict, out=print) -> dict[str, float]:
    """`tinytune eval`: the task metrics of base + adapter on --data (`tt.train.evaluate`), printed one
    `name value` line each, or as one JSON object with --json. Returns the metrics."""
    out = out if is_main_process() else (lambda *args, **kwargs: None)
    batch_size = _positive(opts["batch_size"], "--batch-size")
    check_device(opts["device"])
    if opts["dtype"] not in DTYPES:
        raise CLIError(f"--dtype: unknown dtype {opts['dtype']!r}; choose from {list(DTYPES)}")
    if not Path(opts["data"]).is_file():
        raise CLIError(f"--data: {'not a file' if Path(opts['data']).exists() else 'file not found'}: {opts['data']}")
    run = load_adapted(opts["checkpoint"], opts["adapter"], opts.get("tokenizer"), opts.get("task"),
                       opts.get("labels"))
    data_opts = {"task": run.task, "template": opts.get("template") or run.record.get("template"),
                 "max_length": opts.get("max_length") or run.record.get("max_length"), "on_error": "raise"}
    data = load_dataset(opts["data"], run.tokenizer, data_opts, run.labels, "--data")
    if not data:
        raise CLIError(f"--data {opts['data']}: no usable examples")
    pad = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else run.tokenizer.eos_token_id
    cfg = TrainConfig(task=TRAIN_TASKS[run.task], batch_size=batch_size, device=opts["device"], dtype=opts["dtype"],
                      pad_token_id=pad or 0)
    # the world line goes to stderr with --json, so that stdout is one JSON object
    out(world_line(batch_size), **({"file": _stderr()} if opts.get("json") else {}))
    metrics = final_metrics(run.model.to(opts["device"]), data, cfg)
    if opts.get("json"):
        out(json.dumps(metrics))
    else:
        for name, value in metrics.items():
            out(f"{name} {value:.6g}")
    return metrics


def _stderr():
    import sys
    return sys.stderr


def _positive(value, flag: str) -> int:
    try:
        return _check.integer(value, flag, 1)
    except _check.FieldError as err:
        raise CLIError(str(err)) from None


def _check_mergeable(adapter: Path) -> None:
    """Refuse an adapter whose method does not fold into weights, before anything loads."""
    try:
        kind = json.loads((adapter / "adapter_config.json").read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return  # load_adapter names the problem
    method = by_peft_type(kind)
    if method is not None and method.merged_state is None:
        foldable = [m.peft_type for m in METHODS if m.merged_state is not None]
        raise CLIError(f"ADAPTER {adapter}: a {kind} adapter ({method.name}) does not fold into the weights of a "
                       f"plain checkpoint (merge takes {foldable}); use it as it is: tinytune generate CHECKPOINT "
                       f"--adapter {adapter}")


def merge(opts: dict, out=print) -> Path:
    """`tinytune merge`: base + adapter written as a Hugging Face checkpoint directory OUT (LoRA / (IA)3
    merged in by `tt.save_pretrained`, the tokenizer's files with it). Returns OUT.

    Raises:
        CLIError: OUT exists and is not an empty directory; the adapter does not merge (named) or is a
            classifier (save_pretrained writes causal LMs); the adapter does not load onto CHECKPOINT.
    """
    target, adapter = Path(opts["out"]), Path(opts["adapter"])
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        what = "is not a directory" if not target.is_dir() else "is not empty"
        raise CLIError(f"OUT {target} {what}: merge writes a new checkpoint directory; give a new or empty one")
    if not adapter.is_dir():
        raise CLIError(f"ADAPTER: {'not a directory' if adapter.exists() else 'no such directory'}: {adapter}")
    _check_mergeable(adapter)
    try:
        task = (read_task_file(adapter) or {}).get("task")
    except ValueError as err:
        raise CLIError(f"ADAPTER {adapter}: {err}") from None
    if task in HEADS:
        raise CLIError(f"ADAPTER {adapter}: a --task {task} adapter (a classifier head); merge writes causal "
                       "LM checkpoints (tt.save_pretrained), not *ForSequenceClassification / "
                       "*ForTokenClassification ones: evaluate it with tinytune eval")
    run = load_adapted(opts["checkpoint"], adapter, opts.get("tokenizer"), None, None)
    save_pretrained(run.model, target, tokenizer=run.tokenizer)
    out(f"merged {adapter} into {opts['checkpoint']}: {target}")
    return target
