"""GRPO as a `tt.train.Task`: every optimizer step samples `group_size` completions of each prompt of the
batch, scores them with reward functions, turns the rewards into group-relative advantages and takes one
clipped policy-gradient step; `tt.train.fit` does the rest (precision, accumulation, checkpoints and an exact
resume, logs, several processes).

    history = tt.rlhf.grpo(policy, prompts, [exact_match], tt.rlhf.GRPOConfig(group_size=8, steps=100),
                           tokenizer=tok)

One step samples the completions once (the task's `prepare`) and takes `num_iterations` updates over them.
With one (TRL's default) the old log-probs are the current ones detached, so the ratio is 1 and its
gradient is the policy gradient; with more, the log-probs stored at sampling time are the old ones and the
clip bounds how far the later updates move. With `beta > 0` the reference is the policy with its adapters
disabled.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import _check
from ..train.collate import check_data
from ..train.config import TrainConfig
from ..train.loop import History, fit
from ..train.tasks import Task, add_metrics
from .advantages import SCALES, group_advantages
from .config_checks import check_sampling
from .dpo_step import adapters_disabled
from .logprobs import token_logprobs
from .rewards import rollout_rewards
from .rl_losses import GRPO_LOSS_TYPES, grpo_loss
from .rollout import generate_rollouts


def check_prompt_example(example, index: int, where: str) -> None:
    """ValueError naming `where[index]` unless `example` is a prompt (`tt.data.load_prompts`): a dict with
    non-empty int `prompt_ids`."""
    ids = example.get("prompt_ids") if isinstance(example, dict) else None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        got = sorted(example) if isinstance(example, dict) else type(example).__name__
        raise ValueError(f"{where}[{index}]: expected a prompt example with non-empty int 'prompt_ids' "
                         f"(tt.data.load_prompts), got {got}")


def _collate_prompts(examples: list[dict], pad_token_id: int, device: str) -> dict:
    return {"prompts": list(examples)}


@dataclass
class GRPOConfig(TrainConfig):
    """`TrainConfig` for GRPO, with `tt.generate`'s sampling names and TRL's names for the objective.

    Args:
        group_size: G completions per prompt (8); `batch_size` counts prompts, so a micro-batch is
            batch_size * G completions.
        max_new_tokens, temperature, top_k, top_p: the sampling of `tt.generate`.
        stop_token_ids: ids that end a completion (None: the model's EOS ids).
        loss_type: "grpo", "dapo" (default) or "dr_grpo" (see `grpo_loss`).
        epsilon, epsilon_high: the clip range (0.2; None: epsilon).
        beta: weight of the k3 KL to the adapters-disabled reference (0.0: none, no reference forward).
        scale_rewards: "group", "batch" or "none" (`group_advantages`).
        reward_weights: one weight per reward function (None: all 1.0).
        mask_truncated_completions: leave completions that did not reach a stop token out of the loss.
        num_iterations: updates per rollout batch (1, TRL's default): the first takes the policy gradient
            (ratio 1), later ones the clipped ratio against the log-probs stored at sampling time. All
            of them are one `fit` step (one learning-rate step, one checkpoint position).
        lr: as `TrainConfig.lr`; 1e-5 here.
    """

    lr: float = 1e-5
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    stop_token_ids: list[int] | None = None
    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    scale_rewards: str = "group"
    reward_weights: list[float] | None = None
    mask_truncated_completions: bool = False
    num_iterations: int = 1

    def __post_init__(self):
        super().__post_init__()
        _check.integer(self.group_size, "GRPOConfig.group_size", 2 if self.scale_rewards == "group" else 1)
        _check.integer(self.num_iterations, "GRPOConfig.num_iterations", 1)
        _check.number(self.epsilon, "GRPOConfig.epsilon", 0, low_open=True)
        _check.number(self.epsilon_high, "GRPOConfig.epsilon_high", 0, low_open=True, none=True)
        _check.number(self.beta, "GRPOConfig.beta", 0)
        _check.boolean(self.mask_truncated_completions, "GRPOConfig.mask_truncated_completions")
        check_sampling(self, "GRPOConfig")
        for name, value, choices in (("loss_type", self.loss_type, GRPO_LOSS_TYPES),
                                     ("scale_rewards", self.scale_rewards, SCALES)):
            if value not in choices:
                raise ValueError(f"GRPOConfig.{name}={value!r} is not one of {list(choices)}")


def _rollout_and_rewards(module, prompts: list[dict], cfg: GRPOConfig, functions, tokenizer):
    rollout = generate_rollouts(module, [p["prompt_ids"] for p in prompts], cfg.group_size, cfg.max_new_tokens,
                                cfg.temperature, cfg.top_k, cfg.top_p, cfg.stop_token_ids, cfg.pad_token_id)
    rewards, matrix = rollout_rewards(functions, prompts, rollout, cfg.reward_weights, tokenizer)
    return rollout, rewards, matrix


def _reward_metrics(rewards: torch.Tensor, matrix: torch.Tensor, names: list[str], rollout, g: int) -> dict:
    n = rewards.numel()
    groups = rewards.view(-1, g)
    metrics = {"reward": (float(rewards.sum()), n),
               "reward_std": (float(groups.std(dim=1).sum()) * g if g > 1 else 0.0, n),
               "completion_length": (float(rollout.completion_lengths.sum()), n),
               "eos_rate": (float(rollout.ended.sum()), n)}
    for j, name in enumerate(names):
        scored = ~torch.isnan(matrix[:, j])
        metrics[f"rewards/{name}"] = (float(matrix[scored, j].sum()), int(scored.sum()))
    return metrics


def _prepare_batch(model, batch: dict, module, cfg: GRPOConfig, functions, names, tokenizer):
    """One micro-batch's rollout, advantages and stored log-probs, its reward metrics and its tokens."""
    rollout, rewards, matrix = _rollout_and_rewards(module, batch["prompts"], cfg, functions, tokenizer)
    p = rollout.prompt_length
    mask = rollout.completion_mask[:, p:].float()
    if cfg.mask_truncated_completions:
        mask = mask * rollout.ended[:, None].float()
    item = {"rollout": rollout, "mask": mask, "rows": rewards.numel(), "old": None, "ref": None,
            "advantages": group_advantages(rewards, cfg.group_size, cfg.scale_rewards).to(rollout.input_ids.device)}
    with torch.no_grad():
        if cfg.num_iterations > 1:  # later updates take their ratio against the sampling-time policy
            item["old"] = token_logprobs(model, rollout.input_ids, rollout.attention_mask)[:, p - 1:]
        if cfg.beta > 0:
            with adapters_disabled(module):
                item["ref"] = token_logprobs(module, rollout.input_ids, rollout.attention_mask)[:, p - 1:]
    metrics = _reward_metrics(rewards, matrix, names, rollout, cfg.group_size)
    return item, metrics, int(rollout.attention_mask.sum())


def grpo_task(functions, cfg: GRPOConfig, tokenizer=None) -> Task:
    """The GRPO objective as a `Task` for `fit` (examples are prompts; see the module docstring).

    Each step's `prepare` samples and scores the completions of the step's prompts once (with `beta > 0`
    also the reference's log-probs, and with `num_iterations > 1` the log-probs the ratio is taken against);
    the step then takes `num_iterations` updates over them. Evaluation samples and scores completions of the
    eval prompts: its loss is minus the mean reward.

    Metrics per completion: "reward", "reward_std" (within groups), one "rewards/<function>" each (over
    the completions it scored), "completion_length", "eos_rate", and the loss's "clipfrac", "approx_kl"
    and "kl" (beta > 0).
    """
    functions = list(functions)
    names = [getattr(f, "__name__", type(f).__name__) for f in functions]
    if cfg.reward_weights is not None and len(cfg.reward_weights) != len(functions):
        raise ValueError(f"GRPOConfig.reward_weights has {len(cfg.reward_weights)} weights for "
                         f"{len(functions)} reward functions")
    g = cfg.group_size

    def prepare(model, micro, module):
        items, metrics, tokens = [], {}, 0
        for batch in micro:
            item, more, n = _prepare_batch(model, batch, module, cfg, functions, names, tokenizer)
            items, metrics, tokens = items + [item], add_metrics(metrics, more), tokens + n
        return [items] * cfg.num_iterations, metrics, tokens

    def loss(model, batch, count, module):
        rollout = batch["rollout"]
        logp = token_logprobs(model, rollout.input_ids, rollout.attention_mask)[:, rollout.prompt_length - 1:]
        old = logp.detach() if batch["old"] is None else batch["old"]  # one update: ratio 1, the policy gradient
        value, stats = grpo_loss(logp, old, batch["advantages"], batch["mask"], cfg.loss_type, cfg.epsilon,
                                 cfg.epsilon_high, cfg.beta, batch["ref"], cfg.max_new_tokens)
        n = batch["rows"]
        return value * (n / count), {k: (v * n, n) for k, v in stats.items()}

    def evaluate(model, batch, count, module):
        rollout, rewards, matrix = _rollout_and_rewards(module, batch["prompts"], cfg, functions, tokenizer)
        return -rewards.sum() / count, _reward_metrics(rewards, matrix, names, rollout, g)

    def count(batch):
        return batch["rows"] if "rows" in batch else len(batch["prompts"]) * g

    settings = {k: getattr(cfg, k) for k in ("group_size", "loss_type", "epsilon", "epsilon_high", "beta",
                                             "scale_rewards", "temperature", "max_new_tokens", "num_iterations")}
    return Task(name="grpo", check_example=check_prompt_example, collate=_collate_prompts, count=count,
                loss=loss, counts="completions", settings=settings, shown=("reward", "completion_length"),
                prepare=prepare, evaluate=evaluate)


def grpo(policy, prompts, rewards, cfg: GRPOConfig | None = None, eval_prompts=None, tokenizer=None,
         **fit_kwargs) -> History:
    """Train `policy` (a causal LM, usually with LoRA) with GRPO on `prompts` (`tt.data.load_prompts`).

    Args:
        policy: the model to tune.
        prompts, eval_prompts: prompt examples; their other fields (e.g. "answer") are passed to the reward
            functions, one entry per completion.
        rewards: a reward function `f(prompts, completions, **fields) -> list[float | None]` or a list of them.
        cfg: a `GRPOConfig` (default: `GRPOConfig()`).
        tokenizer: decodes completions to text for the reward functions (None: they get token id lists).
        **fit_kwargs: `resume_from`, `callbacks`, `stream`, as `fit`.

    Returns:
        fit's `History` (per-step metrics in `History.metrics`).

    Raises:
        TypeError: cfg is not a GRPOConfig, or a reward is not callable.
        ValueError: bad prompts (named), reward weights that do not match the functions, what `fit` refuses.
    """
    cfg = GRPOConfig() if cfg is None else cfg
    if not isinstance(cfg, GRPOConfig):
        raise TypeError(f"tt.rlhf.grpo: cfg must be a tt.rlhf.GRPOConfig, got {type(cfg).__name__}")
    functions = [rewards] if callable(rewards) else list(rewards)
    bad = [f for f in functions if not callable(f)]
    if bad or not functions:
        raise TypeError(f"tt.rlhf.grpo: rewards must be a callable or a non-empty list of callables, got {rewards!r}")
    if cfg.beta > 0:
        with adapters_disabled(policy):  # refuses a model without a PEFT method before any work
            pass
    task_cfg = dataclasses.replace(cfg, task=grpo_task(functions, cfg, tokenizer))
    check_data(prompts, "prompts", task_cfg.task)  # named as the caller knows them
    if eval_prompts is not None:
        check_data(eval_prompts, "eval_prompts", task_cfg.task)
    return fit(policy, prompts, task_cfg, eval_data=eval_prompts, **fit_kwargs)
