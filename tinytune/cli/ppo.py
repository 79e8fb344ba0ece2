"""The `ppo` subcommand: online RL with PPO from a JSONL file of prompts, scored by a reward model that
`tinytune reward` trained on the same checkpoint or by reward functions named `module:function`, with the
options, config files, progress, checkpoints, metrics and resume of `grpo`.

    tinytune ppo CHECKPOINT prompts.jsonl --reward-model runs/rm/reward_model --steps 100 --out runs/ppo
    tinytune ppo CHECKPOINT prompts.jsonl --reward my_rewards:exact --kl-coef 0.05 --out runs/ppo

Every role lives on the one loaded base (`tt.rlhf.ppo`'s one-base design): the method (LoRA or DoRA) is
applied to the causal LM as the policy, the reward model's adapter and head are loaded beside it under
"reward" (`load_reward_model(base, DIR, adapter_name="reward")`, frozen), the value model is a "value"
adapter + head (started from the reward model's, or fresh with a zero head with --reward), and the
reference is the base with every adapter off. OUT/adapter is the policy's adapter (`tt.save_adapter`, as
grpo's); OUT/value_model the value adapter + head (load it with `tt.load_adapter(tt.rlhf.ValueModel(base),
...)`). Completions stop as grpo's do.
"""
from __future__ import annotations

from pathlib import Path

from .. import _check
from ..peft import count_parameters, save_adapter
from ..rlhf import PPOConfig, load_reward_model, ppo as train_ppo, ppo_roles
from ..rlhf.ppo_config import PPO_KL_ESTIMATORS
from ..rlhf.reward_model import STATS_NAME
from ..rlhf.roles import use_adapter
from .options import COMMAND_DEFAULTS, COMMAND_FILE_VALUES, DEFAULTS, FILE_VALUES, CLIError, _count, _int
from .rl import (ONLINE_KEYS, _choice, _load_rewards, _reward_specs, _weights, check_online_inputs, finish_online,
                 first_last, prepare_online, sampling_fields, trained_on)

REWARD_ADAPTER = "reward"
LORA_METHODS = ("lora", "dora")  # the roles are adapters of one base

# PPOConfig's own fields the flags set (--reward-weights is grpo's, in ONLINE_KEYS)
PPO_FIELDS = ("ppo_epochs", "num_mini_batches", "kl_coef", "kl_estimator", "kl_target", "kl_horizon", "gamma", "lam",
              "cliprange", "cliprange_value", "vf_coef", "whiten_rewards", "missing_eos_penalty", "normalize_reward",
              "reward_clip")
PPO_KEYS = ONLINE_KEYS | {"reward_model"} | set(PPO_FIELDS)
# PPOConfig's learning rate (1e-5), sampling and knobs; no --reward or --reward-model by default
PPO_DEFAULTS = {**DEFAULTS, **{k: getattr(PPOConfig, k) for k in (
    "lr", "max_new_tokens", "temperature", "top_k", "top_p", "reward_weights", *PPO_FIELDS)},
    "reward": None, "reward_model": None}
COMMAND_DEFAULTS["ppo"] = PPO_DEFAULTS

_number = _check.number
_positive = dict(low=0, low_open=True)
# each PPO key in a config file, checked with the file named (as FILE_VALUES' keys are)
COMMAND_FILE_VALUES["ppo"] = {
    "reward_model": FILE_VALUES["eval_data"], "ppo_epochs": _int, "num_mini_batches": _int,
    "kl_coef": lambda v, w: _number(v, w, 0), "kl_estimator": lambda v, w: _check.string(v, w, choices=PPO_KL_ESTIMATORS),
    "kl_target": lambda v, w: _number(v, w, **_positive, none=True), "kl_horizon": _int,
    "gamma": lambda v, w: _number(v, w, 0, 1), "lam": lambda v, w: _number(v, w, 0, 1),
    "cliprange": lambda v, w: _number(v, w, **_positive), "cliprange_value": lambda v, w: _number(v, w, **_positive),
    "vf_coef": lambda v, w: _number(v, w, 0), "whiten_rewards": _check.boolean,
    "missing_eos_penalty": lambda v, w: _number(v, w, 0, none=True), "normalize_reward": _check.boolean,
    "reward_clip": lambda v, w: _number(v, w, **_positive, none=True), "eval_every": _count}


def _flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def _reward_source(opts: dict) -> tuple[list[str] | None, Path | None]:
    """(the --reward specs, None) or (None, the --reward-model directory): exactly one of them.

    Raises:
        CLIError: both or neither; a --reward-model that is not a directory `save_reward_model` wrote;
            --reward-weights without --reward.
    """
    directory, specs = opts.get("reward_model"), opts.get("reward")
    if directory is not None and specs:
        raise CLIError("--reward-model and --reward exclude each other: score with a reward model or with reward "
                       "functions, not both")
    if directory is None:
        if not specs:
            raise CLIError("--reward-model or --reward: give a reward model directory (tinytune reward's "
                           "OUT/reward_model) or at least one reward function as module:function")
        return _reward_specs(opts), None
    if not isinstance(directory, str) or not directory:
        raise CLIError(f"--reward-model: expected a directory, got {directory!r}")
    path = Path(directory)
    if not path.is_dir():
        raise CLIError(f"--reward-model: {'not a directory' if path.exists() else 'no such directory'}: {path}")
    if not (path / STATS_NAME).is_file():
        raise CLIError(f"--reward-model {path}: no {STATS_NAME}; expected a directory written by tinytune reward "
                       "(its OUT/reward_model) or tt.rlhf.save_reward_model")
    if opts.get("reward_weights") is not None:
        raise CLIError("--reward-weights: only with --reward (one weight per reward function); a reward model "
                       "gives one score")
    return None, path


def _objective(opts: dict, specs: list[str] | None) -> dict:
    """PPOConfig's own fields from the options, each checked under its flag's name.

    Raises:
        CLIError: a --method other than lora/dora, an unknown --kl-estimator or --template, a number out of
            its range, --num-mini-batches above --batch-size, --grad-checkpointing.
    """
    if opts["method"] not in LORA_METHODS:
        raise CLIError(f"--method {opts['method']}: ppo keeps the policy, value and reward models as adapters of "
                       f"one base, so it needs one of {list(LORA_METHODS)}")
    if opts["grad_checkpointing"]:
        raise CLIError("--grad-checkpointing: not with ppo (the value model shares the policy's base, and the "
                       "backward recomputation would run under the wrong adapter)")
    positive = _positive
    try:
        fields = {
            **sampling_fields(opts),
            "ppo_epochs": _check.integer(opts["ppo_epochs"], "--ppo-epochs", 1),
            "num_mini_batches": _check.integer(opts["num_mini_batches"], "--num-mini-batches", 1),
            "kl_coef": _check.number(opts["kl_coef"], "--kl-coef", 0),
            "kl_estimator": _choice(opts, "kl_estimator", PPO_KL_ESTIMATORS, "KL estimator"),
            "kl_target": _check.number(opts["kl_target"], "--kl-target", **positive, none=True),
            "kl_horizon": _check.integer(opts["kl_horizon"], "--kl-horizon", 1),
            **{k: _check.number(opts[k], _flag_name(k), 0, 1) for k in ("gamma", "lam")},
            **{k: _check.number(opts[k], _flag_name(k), **positive) for k in ("cliprange", "cliprange_value")},
            "vf_coef": _check.number(opts["vf_coef"], "--vf-coef", 0),
            "whiten_rewards": _check.boolean(opts["whiten_rewards"], "--whiten-rewards"),
            "missing_eos_penalty": _check.number(opts["missing_eos_penalty"], "--missing-eos-penalty", 0, none=True),
            "normalize_reward": _check.boolean(opts["normalize_reward"], "--no-normalize-reward"),
            "reward_clip": _check.number(opts["reward_clip"], "--reward-clip", **positive, none=True),
            "reward_weights": _weights(opts["reward_weights"], len(specs)) if specs else None}
    except _check.FieldError as err:
        raise CLIError(str(err)) from None
    batch = opts["batch_size"]
    if isinstance(batch, int) and not isinstance(batch, bool) and fields["num_mini_batches"] > batch:
        raise CLIError(f"--num-mini-batches {fields['num_mini_batches']} exceeds --batch-size {batch}: every "
                       "mini-batch needs a completion of each micro-batch")
    return fields


def _load_reward_model(model, path: Path):
    """The reward model of `path` on `model`'s base under the adapter "reward".

    Raises:
        CLIError: a damaged directory, or one trained on another checkpoint (a head or adapter that does not fit).
    """
    try:
        return load_reward_model(model, path, adapter_name=REWARD_ADAPTER)
    except (ValueError, TypeError, KeyError, OSError) as err:
        raise CLIError(f"--reward-model {path}: {err} (it must have been trained on CHECKPOINT, e.g. by "
                       "tinytune reward CHECKPOINT ...)") from None


def ppo(opts: dict, out=print) -> dict:
    """Train a policy with PPO: the method applied to the checkpoint, one completion of each prompt of
    `opts["data"]` per step scored by --reward-model or the --reward functions; save the policy's adapter into
    `opts["out"]`/adapter and the value model into `opts["out"]`/value_model, and report the final loss and
    the mean score and KL of the first and the last step.

    Every option, the reward functions or the reward model directory and the files are checked before
    anything is written.

    Returns:
        {"adapter", "value_model" (paths), "final_loss", "scores" (the mean score per step), "trainable"}.
    """
    check_online_inputs(opts)
    specs, directory = _reward_source(opts)
    run = prepare_online(opts, PPOConfig, lambda: _objective(opts, specs),
                         lambda: _load_rewards(specs) if specs else None, out)
    reward = _load_reward_model(run.model, directory) if directory is not None else run.rewards
    try:
        roles = ppo_roles(run.model, reward)  # builds the value adapter + head, to save them at the end
    except (ValueError, TypeError) as err:
        raise CLIError(f"--method {opts['method']}: {err}") from None
    cfg = run.cfg
    pc = count_parameters(run.model)
    run.out(pc)
    source = f"reward model {directory}" if directory is not None else f"rewards {', '.join(specs)}"
    run.out(trained_on(run, opts, f"a policy (PPO, {cfg.ppo_epochs} epochs x {cfg.num_mini_batches} mini-batches, "
                                  f"kl {cfg.kl_estimator} {cfg.kl_coef}, {source})"))
    history = train_ppo(run.model, run.prompts, reward, cfg, value=roles.value, eval_prompts=run.eval_prompts,
                        tokenizer=run.tokenizer)
    value_path = run.out_dir / "value_model"
    if run.is_main:
        with use_adapter(run.model, roles.value_adapter):
            save_adapter(roles.value, value_path)
    summary = f"{first_last(history, 'score', 'mean score')}; {first_last(history, 'kl', 'kl')}"
    adapter = finish_online(run, history, summary, {"value model": value_path})
    final = history.losses[-1] if history.losses else float("nan")
    scores = [m["score"] for m in history.metrics if "score" in m]
    return {"adapter": adapter, "value_model": value_path, "final_loss": final, "scores": scores,
            "trainable": pc.trainable}
