"""The `reward` and `dpo` subcommands: preference learning from a JSONL file of preferences, with the
options, config files, progress, checkpoints, metrics and resume of `finetune`.

    tinytune reward CHECKPOINT prefs.jsonl --eval-data held_out.jsonl --steps 200 --out runs/rm
    tinytune dpo CHECKPOINT prefs.jsonl --beta 0.1 --loss-type sigmoid --steps 200 --out runs/dpo

`reward` wraps the model in `tt.rlhf.RewardModel`, applies the method to it and trains it with
`tt.rlhf.train_reward_model`; OUT/reward_model is `tt.rlhf.save_reward_model`'s. `dpo` applies the method
to the causal LM and trains it with `tt.rlhf.dpo` (the reference is the base: the adapters disabled);
OUT/adapter is `tt.save_adapter`'s, as finetune's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .. import _check
from .. import data as ttdata
from ..peft import count_parameters, save_adapter
from ..rlhf import (LOSS_TYPES, DPOConfig, RewardConfig, RewardModel, dpo as train_dpo, evaluate_reward_model,
                    preference_accuracy, save_reward_model, train_reward_model)
from ..seeding import seed_everything
from .commands import METHOD_KEYS, _require
from .options import TEMPLATES, CLIError
from .setup import (apply_method, check_device, check_out_dir, load_model, resume_option, seed_option, train_config,
                    where_line, world_line)

PREFERENCE_KEYS = METHOD_KEYS | {
    "checkpoint", "data", "out", "tokenizer", "template", "max_length", "on_error", "eval_data", "eval_every",
    "steps", "lr", "batch_size", "grad_accum", "dtype", "grad_checkpointing", "schedule", "warmup_steps", "seed",
    "log_every", "device", "resume", "progress", "report_to"}
REWARD_KEYS = PREFERENCE_KEYS | {"center_coef"}
DPO_KEYS = PREFERENCE_KEYS | {"beta", "loss_type", "label_smoothing", "precompute_ref", "sft_weight"}


def _objective(opts: dict, command: str) -> dict:
    """The objective's own config fields from the options, each checked under its flag's name.

    Raises:
        CLIError: an unknown --loss-type or --template, or a number out of its range (the flag named).
    """
    template = opts.get("template")
    if template is not None and template not in TEMPLATES:
        raise CLIError(f"--template: unknown template {template!r}; choose from {list(TEMPLATES)}")
    try:
        fields = {"eval_every": _check.integer(opts["eval_every"], "--eval-every", 0)}
        if command == "reward":
            return {**fields, "center_coef": _check.number(opts["center_coef"], "--center-coef", 0)}
        if opts["loss_type"] not in LOSS_TYPES:
            raise CLIError(f"--loss-type: unknown loss type {opts['loss_type']!r}; choose from {list(LOSS_TYPES)}")
        return {**fields, "beta": _check.number(opts["beta"], "--beta", 0, low_open=True),
                "loss_type": opts["loss_type"],
                "label_smoothing": _check.number(opts["label_smoothing"], "--label-smoothing", 0, 0.5,
                                                 high_open=True),
                "precompute_ref": _check.boolean(opts["precompute_ref"], "--precompute-ref"),
                "sft_weight": _check.number(opts["sft_weight"], "--sft-weight", 0)}
    except _check.FieldError as err:
        raise CLIError(str(err)) from None


def load_records_file(loader, path, tokenizer, opts: dict, flag: str, what: str):
    """Examples from the JSONL file `path` through `loader` (`tt.data.load_preferences` or `load_prompts`)
    with the --template, --max-length and --on-error options.

    Raises:
        CLIError: a missing file, a bad record (file:line, from the loader) or no usable example; `flag`
            (DATA or --eval-data) names which file, `what` the examples ("preference examples", "prompts").
    """
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"{flag}: {'not a file' if file.exists() else 'file not found'}: {file}")
    try:
        examples = loader(file, tokenizer, template=opts.get("template"), max_length=opts["max_length"],
                          on_error=opts["on_error"])
    except (OSError, ValueError) as err:
        raise CLIError(f"{flag} {file}: {err}") from None
    if not examples:
        raise CLIError(f"{flag} {file}: no usable {what}")
    return examples


def load_preference_file(path, tokenizer, opts: dict, flag: str):
    """Preference examples from `path` (`load_records_file` with `tt.data.load_preferences`)."""
    return load_records_file(ttdata.load_preferences, path, tokenizer, opts, flag, "preference examples")


@dataclass
class _Run:
    """What both commands set up from the options before any training."""

    out_dir: Path
    cfg: object  # a RewardConfig or DPOConfig, with the tokenizer's pad id
    model: object  # the causal LM, without a method yet
    pairs: object
    eval_pairs: object | None
    is_main: bool  # rank 0 (or no torchrun): prints and writes


def _prepare(opts: dict, command: str, config_class) -> _Run:
    """Check every option, then load the model and the preference files; nothing is written here.

    Raises:
        CLIError: the first bad option or file, named.
    """
    _require(opts, "checkpoint", "data", "out")
    if opts.get("eval_data") is not None and not isinstance(opts["eval_data"], str):
        raise CLIError(f"'eval_data' in --config must be a string (a path), got {opts['eval_data']!r}")
    out_dir = check_out_dir(opts["out"])  # refused before anything is loaded or trained
    resume = resume_option(opts.get("resume"), out_dir)
    check_device(opts["device"])
    seed_option(opts["seed"])
    fields = _objective(opts, command)
    train_config(opts, out_dir, 0, resume, config_class, **fields)  # every config value, before loading
    model, tokenizer = load_model(opts["checkpoint"], opts.get("tokenizer"), need_tokenizer=True)
    pairs = load_preference_file(opts["data"], tokenizer, opts, "DATA")
    eval_pairs = None
    if opts.get("eval_data") is not None:
        eval_pairs = load_preference_file(opts["eval_data"], tokenizer, opts, "--eval-data")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg = train_config(opts, out_dir, pad, resume, config_class, **fields)
    return _Run(out_dir, cfg, model, pairs, eval_pairs, int(os.environ.get("RANK", "0")) == 0)


def _final_line(history) -> str:
    final = history.losses[-1] if history.losses else float("nan")
    return (f"final loss: {final:.4f} after {history.step} steps ({history.stopped_reason}); "
            f"{history.tokens_per_s:,.0f} tokens/s")


def _trained_on(run: _Run, opts: dict, what: str) -> str:
    held_out = f", {len(run.eval_pairs)} held out from {opts['eval_data']}" if run.eval_pairs is not None else ""
    return (f"training {what} with {opts['method']} on {len(run.pairs)} preference examples from {opts['data']}"
            f"{held_out} for {run.cfg.steps} steps")


def reward(opts: dict, out=print) -> dict:
    """Train a reward model (`tt.rlhf.RewardModel` on the checkpoint, the method applied to it) on a
    preference file; save it into `opts["out"]`/reward_model and report accuracy and margin on --eval-data
    (the training data without it).

    Returns:
        {"reward_model" (path), "final_loss", "metrics" (`evaluate_reward_model`'s), "trainable"}.
    """
    run = _prepare(opts, "reward", RewardConfig)
    out = out if run.is_main else (lambda *args, **kwargs: None)
    out(world_line(run.cfg.batch_size, run.cfg.grad_accum))
    seed_everything(run.cfg.seed)  # before the head's and the method's random init: they follow --seed alone
    rm = RewardModel(run.model)
    apply_method(rm, opts)
    pc = count_parameters(rm)
    out(pc)
    out(_trained_on(run, opts, "a reward model"))
    history = train_reward_model(rm, run.pairs, run.cfg, eval_pairs=run.eval_pairs)
    path = run.out_dir / "reward_model"
    if run.is_main:
        save_reward_model(rm, path)
    held_out = run.eval_pairs is not None
    metrics = evaluate_reward_model(rm, run.eval_pairs if held_out else run.pairs, run.cfg)
    out(_final_line(history))
    out(f"{'held-out' if held_out else 'training'} accuracy {metrics['accuracy']:.2f}, margin "
        f"{metrics['margin']:.2f}; reward statistics: mean {rm.reward_mean.item():.4f}, std "
        f"{rm.reward_std.item():.4f}")
    out(f"reward model: {path}\n{where_line(run.out_dir)}")
    final = history.losses[-1] if history.losses else float("nan")
    return {"reward_model": path, "final_loss": final, "metrics": metrics, "trainable": pc.trainable}


def dpo(opts: dict, out=print) -> dict:
    """Train a policy with DPO (or IPO, hinge, SimPO: --loss-type): the method applied to the checkpoint,
    its base as the reference; save the adapter into `opts["out"]`/adapter and report the preference
    accuracy on --eval-data before and after (the last step's reward metrics without it).

    Returns:
        {"adapter" (path), "final_loss", "before" and "after" (`preference_accuracy`'s; None without
        --eval-data), "trainable"}.
    """
    run = _prepare(opts, "dpo", DPOConfig)
    out = out if run.is_main else (lambda *args, **kwargs: None)
    out(world_line(run.cfg.batch_size, run.cfg.grad_accum))
    seed_everything(run.cfg.seed)
    apply_method(run.model, opts)
    pc = count_parameters(run.model)
    out(pc)
    out(_trained_on(run, opts, f"a policy ({run.cfg.loss_type}, beta {run.cfg.beta})"))
    before = after = None
    if run.eval_pairs is not None:
        before = preference_accuracy(run.model, run.eval_pairs, run.cfg, beta=run.cfg.beta)
    history = train_dpo(run.model, run.pairs, run.cfg, eval_pairs=run.eval_pairs)
    adapter = save_adapter(run.model, run.out_dir / "adapter") if run.is_main else run.out_dir / "adapter"
    out(_final_line(history))
    if before is not None:
        after = preference_accuracy(run.model, run.eval_pairs, run.cfg, beta=run.cfg.beta)
        out(f"held-out preference accuracy before {before['accuracy']:.2f} -> after {after['accuracy']:.2f}, "
            f"margin {before['margin']:.3f} -> {after['margin']:.3f}")
    elif history.metrics:
        last = history.metrics[-1]
        out(f"last step: rewards/accuracies {last.get('rewards/accuracies', float('nan')):.2f}, "
            f"rewards/margins {last.get('rewards/margins', float('nan')):.3f}")
    out(f"adapter: {adapter}\n{where_line(run.out_dir)}")
    final = history.losses[-1] if history.losses else float("nan")
    return {"adapter": adapter, "final_loss": final, "before": before, "after": after, "trainable": pc.trainable}
