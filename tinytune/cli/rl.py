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
from pathlib import Path

from .. import _check
from .. import data as ttdata
from ..data.templates import ChatTemplate, get_template
from ..peft import count_parameters, save_adapter
from ..rlhf import GRPO_LOSS_TYPES, GRPOConfig, grpo as train_grpo, load_reward_function
from ..rlhf.advantages import SCALES
from ..seeding import seed_everything
from .commands import _require
from .options import TEMPLATES, CLIError
from .preference import PREFERENCE_KEYS, _final_line, load_records_file
from .setup import apply_method, check_device, check_out_dir, load_model, resume_option, seed_option, train_config

GRPO_KEYS = PREFERENCE_KEYS | {
    "reward", "reward_weights", "group_size", "max_new_tokens", "temperature", "top_k", "top_p", "loss_type",
    "epsilon", "epsilon_high", "beta", "scale_rewards", "mask_truncated_completions"}


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


def _objective(opts: dict, count: int) -> dict:
    """GRPOConfig's own fields from the options, each checked under its flag's name.

    Raises:
        CLIError: an unknown --loss-type, --scale-rewards or --template, or a number out of its range.
    """
    if opts.get("template") is not None:
        _choice(opts, "template", TEMPLATES, "template")
    try:
        fields = {
            "eval_every": _check.integer(opts["eval_every"], "--eval-every", 0),
            "loss_type": _choice(opts, "loss_type", GRPO_LOSS_TYPES, "loss type"),
            "scale_rewards": _choice(opts, "scale_rewards", SCALES, "scaling"),
            "group_size": _check.integer(opts["group_size"], "--group-size", 1),
            "max_new_tokens": _check.integer(opts["max_new_tokens"], "--max-new-tokens", 1),
            "temperature": _check.number(opts["temperature"], "--temperature", 0, low_open=True),
            "top_k": _check.integer(opts["top_k"], "--top-k", 1, none=True),
            "top_p": _check.number(opts["top_p"], "--top-p", 0, 1, low_open=True),
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


def stop_token_ids(tokenizer, template, prompts) -> list[int] | None:
    """The tokenizer's EOS ids, plus the chat template's end-of-turn token when it is one token (chatml for
    chat prompts without a template, as `load_prompts` renders them). None: no EOS known (the model's)."""
    ids = list(tokenizer.eos_token_ids)
    if template is None and any(isinstance(p.get("prompt"), list) for p in prompts):
        template = "chatml"
    chat = get_template(template) if template is not None else None
    if isinstance(chat, ChatTemplate):
        turn_end = tokenizer.token_to_id(chat.end_of_turn)
        if turn_end is not None and turn_end not in ids:
            ids.append(turn_end)
    return ids or None


def _reward_line(history) -> str:
    rewards = [m["reward"] for m in history.metrics if "reward" in m]
    if not rewards:
        return "mean reward: no step scored"
    return f"mean reward first step {rewards[0]:.4f} -> last step {rewards[-1]:.4f}"


def grpo(opts: dict, out=print) -> dict:
    """Train a policy with GRPO: the method applied to the checkpoint, completions of each prompt of
    `opts["data"]` scored by the --reward functions; save the adapter into `opts["out"]`/adapter and report
    the final loss and the mean reward of the first and the last step.

    Every option, the reward functions and the files are checked before anything is written.

    Returns:
        {"adapter" (path), "final_loss", "rewards" (the mean reward per step), "trainable"}.
    """
    _require(opts, "checkpoint", "data", "out")
    if opts.get("eval_data") is not None and not isinstance(opts["eval_data"], str):
        raise CLIError(f"'eval_data' in --config must be a string (a path), got {opts['eval_data']!r}")
    specs = _reward_specs(opts)
    out_dir = check_out_dir(opts["out"])  # refused before anything is loaded or trained
    resume = resume_option(opts.get("resume"), out_dir)
    check_device(opts["device"])
    seed_option(opts["seed"])
    fields = _objective(opts, len(specs))
    train_config(opts, out_dir, 0, resume, GRPOConfig, **fields)  # every config value, before loading
    functions = _load_rewards(specs)
    model, tokenizer = load_model(opts["checkpoint"], opts.get("tokenizer"), need_tokenizer=True)
    prompts = load_prompt_file(opts["data"], tokenizer, opts, "DATA")
    eval_prompts = None
    if opts.get("eval_data") is not None:
        eval_prompts = load_prompt_file(opts["eval_data"], tokenizer, opts, "--eval-data")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer, opts.get("template"), prompts)
    cfg = train_config(opts, out_dir, pad, resume, GRPOConfig, stop_token_ids=stops, **fields)
    is_main = int(os.environ.get("RANK", "0")) == 0
    out = out if is_main else (lambda *args, **kwargs: None)
    seed_everything(cfg.seed)
    apply_method(model, opts)
    pc = count_parameters(model)
    out(pc)
    held_out = f", {len(eval_prompts)} held out from {opts['eval_data']}" if eval_prompts is not None else ""
    out(f"training a policy ({cfg.loss_type}, {cfg.group_size} completions per prompt, rewards "
        f"{', '.join(specs)}) with {opts['method']} on {len(prompts)} prompts from {opts['data']}{held_out} "
        f"for {cfg.steps} steps")
    history = train_grpo(model, prompts, functions, cfg, eval_prompts=eval_prompts, tokenizer=tokenizer)
    adapter = save_adapter(model, out_dir / "adapter") if is_main else out_dir / "adapter"
    out(f"{_final_line(history)}; {_reward_line(history)}")
    out(f"adapter: {adapter}\nloss curve: {out_dir / 'loss.svg'}\nmetrics: {out_dir / 'metrics.jsonl'}")
    final = history.losses[-1] if history.losses else float("nan")
    rewards = [m["reward"] for m in history.metrics if "reward" in m]
    return {"adapter": adapter, "final_loss": final, "rewards": rewards, "trainable": pc.trainable}
