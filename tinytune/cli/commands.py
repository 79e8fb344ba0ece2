"""The `finetune`, `params` and `bench` subcommands: each takes resolved options and prints its report."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import _check
from ..peft import count_parameters, save_adapter
from ..seeding import seed_everything
from ..train import TrainConfig, fit
from .measure import measure_training_step
from .options import DTYPES, CLIError
from .reports import card_info, final_metrics
from .setup import (apply_method, check_device, check_out_dir, is_main_process, load_dataset, load_model,
                    resume_option, seed_option, train_config, where_line, world_line)
from .tasks import TRAIN_TASKS, check_task, labelled_task, parse_labels, task_model, task_record, write_task_file

METHOD_KEYS = {"method", "rank", "alpha", "dropout", "targets", "rslora", "bottleneck", "placement", "num_virtual_tokens"}
FINETUNE_KEYS = METHOD_KEYS | {"checkpoint", "data", "out", "task",
                 "template", "max_length", "on_error", "tokenizer", "steps", "lr", "batch_size", "grad_accum",
                 "dtype", "grad_checkpointing", "schedule", "warmup_steps", "seed", "log_every", "device", "resume",
                 "labels", "eval_data", "eval_every", "save_every", "progress", "report_to"}
PARAMS_KEYS = METHOD_KEYS | {"checkpoint", "tokenizer"}
BENCH_KEYS = PARAMS_KEYS | {"batch_size", "seq_len", "steps", "warmup", "dtype", "grad_checkpointing", "device"}


def _require(opts: dict, *names: str) -> None:
    """Each of `names` given as a non-empty string (a path or a preset name); `tokenizer` a string if given."""
    for name in names:
        if opts.get(name) in (None, ""):
            raise CLIError(f"missing {name.upper()}: give it on the command line or as {name!r} in --config")
    for name in (*names, "tokenizer"):
        if opts.get(name) is not None and not isinstance(opts[name], str):
            raise CLIError(f"{name!r} in --config must be a string (a path), got {opts[name]!r}")


@dataclass
class _Finetune:
    """What finetune checked and loaded before any training."""

    out_dir: Path
    cfg: TrainConfig
    model: object  # the decoder, or the head on it; the method not applied yet
    tokenizer: object
    examples: object
    eval_examples: object | None
    labels: list | None


def _check_options(opts: dict) -> tuple[str, list | None, dict]:
    """--task, --labels, --eval-data, --eval-every and --save-every, each under its flag's name, and the
    TrainConfig fields they make. Raises CLIError."""
    task = check_task(opts["task"])
    labels = parse_labels(opts.get("labels"), task)
    if opts.get("eval_data") is not None and not isinstance(opts["eval_data"], str):
        raise CLIError(f"'eval_data' in --config must be a string (a path), got {opts['eval_data']!r}")
    try:
        fields = {"eval_every": _check.integer(opts.get("eval_every", 0), "--eval-every", 0),
                  "save_every": _check.integer(opts.get("save_every", 0), "--save-every", 0)}
    except _check.FieldError as err:
        raise CLIError(str(err)) from None
    if fields["eval_every"] and opts.get("eval_data") is None:
        raise CLIError(f"--eval-every {fields['eval_every']}: there is nothing to evaluate; give --eval-data FILE")
    if task in ("classification", "ner") and opts.get("template") is not None:
        raise CLIError(f"--template {opts['template']}: --task {task} reads plain text and tokens, no template")
    if task in ("classification", "ner") and opts["method"] in ("prefix", "prompt"):
        raise CLIError(f"--method {opts['method']} with --task {task}: soft prompts and prefixes train causal "
                       "LMs only here; use lora, dora, ia3, adapter or bitfit for a classifier")
    return task, labels, {**fields, "task": TRAIN_TASKS[task]}


def _prepare(opts: dict, out) -> _Finetune:
    """Check every option and the --out directory, then load the model and the data; nothing is written."""
    _require(opts, "checkpoint", "data", "out")
    task, labels, fields = _check_options(opts)
    out_dir = check_out_dir(opts["out"])  # refused before anything is loaded or trained
    resume = resume_option(opts.get("resume"), out_dir)
    check_device(opts["device"])
    seed_option(opts["seed"])
    train_config(opts, out_dir, 0, resume, **fields)  # every config value, before loading
    model, tokenizer = load_model(opts["checkpoint"], opts.get("tokenizer"), need_tokenizer=True)
    examples = load_dataset(opts["data"], tokenizer, opts, labels)
    if not examples:
        raise CLIError(f"DATA {opts['data']}: no usable examples")
    labels = getattr(examples, "label_names", None) if task in ("classification", "ner") else None
    eval_examples = None
    if opts.get("eval_data") is not None:
        eval_examples = load_dataset(opts["eval_data"], tokenizer, opts, labels, "--eval-data")
        if not eval_examples:
            raise CLIError(f"--eval-data {opts['eval_data']}: no usable examples")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg = train_config(opts, out_dir, pad, resume, **{**fields, "task": labelled_task(task, labels)})
    out(world_line(cfg.batch_size, cfg.grad_accum))
    return _Finetune(out_dir, cfg, model, tokenizer, examples, eval_examples, labels)


def _save_adapter(model, path: Path, card: dict) -> Path:
    """`save_adapter` with the model card's `card_info` (training data, final metrics, hyperparameters)."""
    return save_adapter(model, path, card_info=card)


def finetune(opts: dict, out=print) -> dict:
    """Load, apply the method (on a classification head for --task classification / ner), train with `fit`
    (evaluating --eval-data), save the adapter and its task (labels too) into `opts["out"]`/adapter.

    Returns a summary dict (adapter path, final loss, tokens/s, trainable count, final eval metrics or
    None). Under `torchrun` every process trains (`fit` shards the data) and rank 0 alone prints and writes.
    """
    is_main = is_main_process()
    out = out if is_main else (lambda *args, **kwargs: None)
    run = _prepare(opts, out)
    # Seeded after loading (which may or may not draw numbers) and before every random init that follows
    # (the head's, then the method's weights): the adapter depends on --seed and nothing else.
    seed_everything(run.cfg.seed)
    model = task_model(run.model, opts["task"], run.labels)
    apply_method(model, opts)
    pc = count_parameters(model)
    out(pc)
    held_out = f", {len(run.eval_examples)} held out" if run.eval_examples is not None else ""
    out(f"training {opts['method']} on {len(run.examples)} examples from {opts['data']}{held_out} for "
        f"{run.cfg.steps} steps")
    history = fit(model, run.examples, run.cfg, eval_data=run.eval_examples)
    metrics = final_metrics(model, run.eval_examples, run.cfg) if run.eval_examples is not None else None
    adapter = run.out_dir / "adapter"
    if is_main:
        _save_adapter(model, adapter, card_info(opts, metrics, run.cfg))
        write_task_file(adapter, task_record(opts["task"], opts, run.labels))
    final = history.losses[-1] if history.losses else float("nan")
    out(f"final loss: {final:.4f} after {history.step} steps ({history.stopped_reason}); "
        f"{history.tokens_per_s:,.0f} tokens/s")
    if metrics is not None:
        out("held-out: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    out(f"adapter: {adapter}\n{where_line(run.out_dir)}")
    return {"adapter": adapter, "final_loss": final, "tokens_per_s": history.tokens_per_s,
            "trainable": pc.trainable, "metrics": metrics}


def params(opts: dict, out=print):
    """Print the parameter table the method config gives on the checkpoint or preset; returns the count."""
    _require(opts, "checkpoint")
    model, _ = load_model(opts["checkpoint"], opts.get("tokenizer"))
    names = apply_method(model, opts)
    pc = count_parameters(model)
    out(f"{opts['method']} on {len(names)} modules of {opts['checkpoint']} "
        f"(rank {opts['rank']}, alpha {opts['alpha']}, targets {opts['targets']})")
    out(pc)
    return pc


def bench(opts: dict, out=print):
    """Time training steps on random tokens; print tokens/s and peak memory. Returns the `StepStats`."""
    _require(opts, "checkpoint")
    for name in ("batch_size", "seq_len", "steps"):
        if not isinstance(opts[name], int) or isinstance(opts[name], bool) or opts[name] < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be an int >= 1, got {opts[name]!r}")
    if not isinstance(opts["warmup"], int) or isinstance(opts["warmup"], bool) or opts["warmup"] < 0:
        raise CLIError(f"--warmup must be an int >= 0, got {opts['warmup']!r}")
    if opts["dtype"] not in DTYPES:
        raise CLIError(f"--dtype: unknown dtype {opts['dtype']!r}; choose from {list(DTYPES)}")
    check_device(opts["device"])
    model, _ = load_model(opts["checkpoint"], opts.get("tokenizer"))
    apply_method(model, opts)
    if opts["grad_checkpointing"]:
        model.set_gradient_checkpointing(True)
    stats = measure_training_step(model, opts["batch_size"], opts["seq_len"], model.config.vocab_size,
                                  opts["steps"], opts["warmup"], opts["dtype"], opts["device"])
    pc = count_parameters(model)
    peak = "n/a" if stats.peak_bytes is None else f"{stats.peak_bytes / 2**20:,.1f} MiB"
    out(f"{opts['checkpoint']} + {opts['method']} (rank {opts['rank']}, targets {opts['targets']}): "
        f"{pc.trainable:,} trainable of {pc.total:,}")
    out(f"batch {opts['batch_size']} x {opts['seq_len']} tokens, {opts['dtype']}, grad checkpointing "
        f"{'on' if opts['grad_checkpointing'] else 'off'}, {opts['steps']} timed steps after {opts['warmup']} warmup")
    out(f"tokens/s: {stats.tokens_per_s:,.0f} (median step {sorted(stats.step_seconds)[len(stats.step_seconds) // 2]:.3f} s)")
    out(f"peak memory: {peak} ({stats.memory_method})")
    return stats
