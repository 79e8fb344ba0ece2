"""The `finetune`, `params` and `bench` subcommands: each takes resolved options and prints its report."""
from __future__ import annotations

import os

from ..peft import count_parameters, save_adapter
from ..seeding import seed_everything
from ..train import fit
from .measure import measure_training_step
from .options import DTYPES, CLIError
from .setup import (apply_method, check_device, check_out_dir, load_dataset, load_model, resume_option, seed_option,
                    train_config)

METHOD_KEYS = {"method", "rank", "alpha", "dropout", "targets", "rslora", "bottleneck", "placement", "num_virtual_tokens"}
FINETUNE_KEYS = METHOD_KEYS | {"checkpoint", "data", "out", "task",
                 "template", "max_length", "on_error", "tokenizer", "steps", "lr", "batch_size", "grad_accum",
                 "dtype", "grad_checkpointing", "schedule", "warmup_steps", "seed", "log_every", "device", "resume"}
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


def finetune(opts: dict, out=print) -> dict:
    """Load, apply the method, train with `fit`, save the adapter into `opts["out"]`.

    Returns a summary dict (adapter path, final loss, tokens/s, trainable count). Under `torchrun` every
    process trains (`fit` shards the data) and rank 0 alone prints and writes the adapter.
    """
    _require(opts, "checkpoint", "data", "out")
    out_dir = check_out_dir(opts["out"])  # refused before anything is loaded or trained
    resume = resume_option(opts.get("resume"), out_dir)
    check_device(opts["device"])
    seed = seed_option(opts["seed"])
    is_main = int(os.environ.get("RANK", "0")) == 0
    out = out if is_main else (lambda *args, **kwargs: None)
    model, tokenizer = load_model(opts["checkpoint"], opts.get("tokenizer"), need_tokenizer=True)
    examples = load_dataset(opts["data"], tokenizer, opts)
    if not examples:
        raise CLIError(f"DATA {opts['data']}: no usable examples")
    # Seeded after loading (which may or may not draw numbers) and before every random init that follows
    # (the method's weights; a head belongs here too): the adapter depends on --seed and nothing else.
    seed_everything(seed)
    apply_method(model, opts)
    pc = count_parameters(model)
    out(pc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg = train_config(opts, out_dir, pad, resume)
    out(f"training {opts['method']} on {len(examples)} examples from {opts['data']} for {cfg.steps} steps")
    history = fit(model, examples, cfg)
    adapter = save_adapter(model, out_dir / "adapter") if is_main else out_dir / "adapter"
    final = history.losses[-1] if history.losses else float("nan")
    out(f"final loss: {final:.4f} after {history.step} steps ({history.stopped_reason}); "
        f"{history.tokens_per_s:,.0f} tokens/s")
    out(f"adapter: {adapter}\nloss curve: {out_dir / 'loss.svg'}\nmetrics: {out_dir / 'metrics.jsonl'}")
    return {"adapter": adapter, "final_loss": final, "tokens_per_s": history.tokens_per_s,
            "trainable": pc.trainable}


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
