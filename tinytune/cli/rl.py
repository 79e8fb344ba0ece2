"""The `grpo` subcommand: online RL from a JSONL file of prompts and reward functions named `module:function`,
with the options, config files, progress, checkpoints, metrics and resume of `dpo`.

    tinytune grpo CHECKPOINT prompts.jsonl --reward my_rewards:exact --group-size 8 --steps 100 --out runs/grpo

The method is applied to the causal LM and trained with `tt.rlhf.grpo` (with --beta > 0 the reference is the
base: the adapters disabled); OUT/adapter is `tt.save_adapter`'s, as dpo's. Completions stop at the
tokenizer's EOS ids and, with a chat template (chatml for chat prompts without --template), at the template's
end-of-turn token when the tokenizer has it as one token.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from .. import _check
from .. import data as ttdata
from ..peft import count_parameters, save_adapter
from ..rlhf import GRPO_LOSS_TYPES, GRPOConfig, grpo as train_grpo, load_reward_function
from ..rlhf.advantages import SCALES
from ..seeding import seed_everything
from .commands import _require
from .options import TEMPLATES, CLIError
from .preference import PREFERENCE_KEYS, _final_line, load_records_file
from .setup import (apply_method, check_device, check_out_dir, load_model, resume_option, seed_option, train_config,
                    stop_token_ids, where_line, world_line)

# what every online command (grpo, ppo) takes: the preference commands' options, sampling and reward functions
ONLINE_KEYS = PREFERENCE_KEYS | {"reward", "reward_weights", "max_new_tokens", "temperature", "top_k", "top_p"}
GRPO_KEYS = ONLINE_KEYS | {"group_size", "loss_type", "epsilon", "epsilon_high", "beta", "scale_rewards",
                           "mask_truncated_completions"}


def _choice(opts: dict, key: str, choices, what: str) -> str:
    if opts[key] not in choices:
        flag = "--" + key.replace("_", "-")
        raise CLIError(f"{flag}: unknown {what} {opts[key]!r}; choose from {list(choices)}")
    return opts[key]


def _reward_specs(opts: dict) -> list[str]:
    """The --reward specs as a list (a config file may give one string or a list).

    Raises:
        CLIError: no --reward, or one that is not a non-empty string.
    """
    specs = opts.get("reward")
    specs = [specs] if isinstance(specs, str) else specs
    if not specs:
        raise CLIError("--reward: give at least one reward function as module:function (or 'reward' in --config)")
    if not all(isinstance(s, str) and s for s in specs):
        raise CLIError(f"--reward: expected module:function strings, got {specs!r}")
    return list(specs)


def _weights(value, count: int) -> list[float] | None:
    """--reward-weights ("1.0,0.5" or a list from a config file): one finite number per --reward."""
    if value is None:
        return None
    try:
        weights = [float(w) for w in value.split(",")] if isinstance(value, str) else [float(w) for w in value]
    except (TypeError, ValueError):
        raise CLIError(f"--reward-weights: expected comma-separated numbers, got {value!r}") from None
    if len(weights) != count or not all(math.isfinite(w) for w in weights):
        raise CLIError(f"--reward-weights: expected {count} finite numbers (one per --reward), got {value!r}")
    return weights


def sampling_fields(opts: dict) -> dict:
    """The fields every online config shares (--eval-every and the sampling), --template checked too.

    Raises:
        CLIError: an unknown --template. _check.FieldError: a number out of its range (the flag named).
    """
    if opts.get("template") is not None:
        _choice(opts, "template", TEMPLATES, "template")
    return {"eval_every": _check.integer(opts["eval_every"], "--eval-every", 0),
            "max_new_tokens": _check.integer(opts["max_new_tokens"], "--max-new-tokens", 1),
            "temperature": _check.number(opts["temperature"], "--temperature", 0, low_open=True),
            "top_k": _check.integer(opts["top_k"], "--top-k", 1, none=True),
            "top_p": _check.number(opts["top_p"], "--top-p", 0, 1, low_open=True)}


def _objective(opts: dict, count: int) -> dict:
    """GRPOConfig's own fields from the options, each checked under its flag's name.

    Raises:
        CLIError: an unknown --loss-type, --scale-rewards or --template, or a number out of its range.
    """
    try:
        fields = {
            **sampling_fields(opts),
            "loss_type": _choice(opts, "loss_type", GRPO_LOSS_TYPES, "loss type"),
            "scale_rewards": _choice(opts, "scale_rewards", SCALES, "scaling"),
            "group_size": _check.integer(opts["group_size"], "--group-size", 1),
            "epsilon": _check.number(opts["epsilon"], "--epsilon", 0, low_open=True),
            "epsilon_high": _check.number(opts["epsilon_high"], "--epsilon-high", 0, low_open=True, none=True),
            "beta": _check.number(opts["beta"], "--beta", 0),
            "mask_truncated_completions": _check.boolean(opts["mask_truncated_completions"],
                                                         "--mask-truncated-completions"),
            "reward_weights": _weights(opts["reward_weights"], count)}
    except _check.FieldError as err:
        raise CLIError(str(err)) from None
    if fields["scale_rewards"] == "group" and fields["group_size"] < 2:
        raise CLIError("--group-size must be >= 2 with --scale-rewards group (a group of one has no spread)")
    return fields


def _load_rewards(specs: list[str]) -> list:
    try:
        return [load_reward_function(spec) for spec in specs]
    except ValueError as err:
        raise CLIError(f"--reward: {err}") from None


def load_prompt_file(path, tokenizer, opts: dict, flag: str):
    """Prompt examples from `path` (`load_records_file` with `tt.data.load_prompts`)."""
    return load_records_file(ttdata.load_prompts, path, tokenizer, opts, flag, "prompts")


def first_last(history, key: str, what: str) -> str:
    """'WHAT first step X -> last step Y' of the per-step metric `key` (or that no step has it)."""
    values = [m[key] for m in history.metrics if key in m]
    if not values:
        return f"{what}: no step scored"
    return f"{what} first step {values[0]:.4f} -> last step {values[-1]:.4f}"


@dataclass
class OnlineRun:
    """What an online command (grpo, ppo) has set up before training: the method is applied, nothing written."""

    out_dir: Path
    cfg: object  # a GRPOConfig or PPOConfig with the tokenizer's pad and stop ids
    model: object  # the causal LM with the method applied (the policy)
    tokenizer: object
    prompts: list
    eval_prompts: list | None
    rewards: object  # what `load_rewards` returned
    is_main: bool  # rank 0 (or no torchrun): prints and writes
    out: object  # print on the main process, nothing elsewhere


def check_online_inputs(opts: dict) -> None:
    """CHECKPOINT, DATA and --out given (as strings), and --eval-data a string if given in --config."""
    _require(opts, "checkpoint", "data", "out")
    if opts.get("eval_data") is not None and not isinstance(opts["eval_data"], str):
        raise CLIError(f"'eval_data' in --config must be a string (a path), got {opts['eval_data']!r}")


def prepare_online(opts: dict, config_class, objective, load_rewards, out=print) -> OnlineRun:
    """Check --out, --resume, --device, --seed, the objective (`objective()`: the config's own fields, each
    checked under its flag's name) and every config value; `load_rewards()` (before the model: a reward
    module that does not import is refused first); then load the model and the prompt files, seed and
    apply the method. Nothing is written.

    Raises:
        CLIError: the first bad option or file, named.
    """
    out_dir = check_out_dir(opts["out"])  # refused before anything is loaded or trained
    resume = resume_option(opts.get("resume"), out_dir)
    check_device(opts["device"])
    seed_option(opts["seed"])
    fields = objective()
    train_config(opts, out_dir, 0, resume, config_class, **fields)  # every config value, before loading
    rewards = load_rewards()
    model, tokenizer = load_model(opts["checkpoint"], opts.get("tokenizer"), need_tokenizer=True)
    prompts = load_prompt_file(opts["data"], tokenizer, opts, "DATA")
    eval_prompts = None
    if opts.get("eval_data") is not None:
        eval_prompts = load_prompt_file(opts["eval_data"], tokenizer, opts, "--eval-data")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer, opts.get("template"), any(isinstance(p.get("prompt"), list) for p in prompts)) or None
    cfg = train_config(opts, out_dir, pad, resume, config_class, stop_token_ids=stops, **fields)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        out(world_line(cfg.batch_size, cfg.grad_accum))  # --batch-size counts prompts here
    seed_everything(cfg.seed)  # before the method's random init: the adapter follows --seed alone
    apply_method(model, opts)
    return OnlineRun(out_dir, cfg, model, tokenizer, prompts, eval_prompts, rewards, is_main,
                     out if is_main else (lambda *args, **kwargs: None))


def trained_on(run: OnlineRun, opts: dict, what: str) -> str:
    """The line announcing the training: `what` on how many prompts (and held-out prompts) for how many steps."""
    held_out = f", {len(run.eval_prompts)} held out from {opts['eval_data']}" if run.eval_prompts is not None else ""
    return (f"training {what} with {opts['method']} on {len(run.prompts)} prompts from {opts['data']}{held_out} "
            f"for {run.cfg.steps} steps")


def finish_online(run: OnlineRun, history, summary: str, saved: dict | None = None) -> Path:
    """Save the policy's adapter (its active one) into OUT/adapter, print the final line (with `summary`)
    and where everything is (`saved`: more {label: path} the command wrote). Returns the adapter's path."""
    adapter = save_adapter(run.model, run.out_dir / "adapter") if run.is_main else run.out_dir / "adapter"
    run.out(f"{_final_line(history)}; {summary}")
    more = "".join(f"\n{label}: {path}" for label, path in (saved or {}).items())
    run.out(f"adapter: {adapter}{more}\n{where_line(run.out_dir)}")
    return adapter


def grpo(opts: dict, out=print) -> dict:
    """Train a policy with GRPO: the method applied to the checkpoint, completions of each prompt of
    `opts["data"]` scored by the --reward functions; save the adapter into `opts["out"]`/adapter and report
    the final loss and the mean reward of the first and the last step.

    Every option, the reward functions and the files are checked before anything is written.

    Returns:
        {"adapter" (path), "final_loss", "rewards" (the mean reward per step), "trainable"}.
    """
    check_online_inputs(opts)
    specs = _reward_specs(opts)
    run = prepare_online(opts, GRPOConfig, lambda: _objective(opts, len(specs)), lambda: _load_rewards(specs), out)
    cfg = run.cfg
    pc = count_parameters(run.model)
    run.out(pc)
    run.out(trained_on(run, opts, f"a policy ({cfg.loss_type}, {cfg.group_size} completions per prompt, rewards "
                                  f"{', '.join(specs)})"))
    history = train_grpo(run.model, run.prompts, run.rewards, cfg, eval_prompts=run.eval_prompts,
                         tokenizer=run.tokenizer)
    adapter = finish_online(run, history, first_last(history, "reward", "mean reward"))
    final = history.losses[-1] if history.losses else float("nan")
    rewards = [m["reward"] for m in history.metrics if "reward" in m]
    return {"adapter": adapter, "final_loss": final, "rewards": rewards, "trainable": pc.trainable}
