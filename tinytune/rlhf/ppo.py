"""PPO as a `tt.train.Task`: every step samples one completion of each prompt of the batch with the policy,
scores it (a reward model or reward functions), penalises each token's KL to the reference, estimates
advantages with the value model (GAE), and takes `ppo_epochs x num_mini_batches` clipped updates of the
policy and the value model together; `tt.train.fit` does the rest (precision, accumulation, checkpoints and
an exact resume, logs).

    rm = tt.rlhf.load_reward_model(base, "runs/rm/reward_model", adapter_name="reward")
    history = tt.rlhf.ppo(base, prompts, rm, tt.rlhf.PPOConfig(steps=100), tokenizer=tok)

With LoRA every role lives on one frozen base (`ppo_roles`): the policy's adapter, a value adapter + head
(started from the reward model's when it shares the base), the reward model's adapter + head, and the
reference is every adapter off. The objective (Schulman et al. 2017; Ziegler et al. 2019; TRL's PPOTrainer):

    r_t = -kl_coef * KL_t  (+ the score on the last completion token)       `ppo_rewards`
    A, R = GAE(r, V; gamma, lam), A whitened over the batch                 `gae`, `whiten`
    loss = clipped policy surrogate + vf_coef * clipped value error, token means over a mini-batch
"""
from __future__ import annotations

import dataclasses

import torch

from ..train.collate import check_data
from ..train.loop import History, fit
from ..train.tasks import Task, add_metrics
from .advantages import gae, whiten
from .grpo import _collate_prompts, check_prompt_example
from .logprobs import token_logprobs
from .ppo_config import PPOConfig
from .ppo_roles import PPOModels, PPORoles, ppo_roles
from .reward_model import RewardModel
from .rewards import normalized_scores, rollout_rewards
from .rl_losses import KLController, clipped_objective, clipped_value_error, ppo_rewards
from .rollout import eos_penalty, generate_rollouts
from .tasks import eval_mode

# what checks the prompt files before any role is set up (the real task needs the roles)
_PROMPTS = Task(name="prompts", check_example=check_prompt_example, collate=_collate_prompts, count=len,
                loss=lambda *args: None)
ROW_KEYS = ("input_ids", "attention_mask", "mask", "old_logp", "old_values", "advantages", "returns")


def _sample(roles: PPORoles, prompts: list[dict], cfg: PPOConfig):
    with roles.as_policy():
        return generate_rollouts(roles.policy, [p["prompt_ids"] for p in prompts], 1, cfg.max_new_tokens,
                                 cfg.temperature, cfg.top_k, cfg.top_p, cfg.stop_token_ids, cfg.pad_token_id)


def _scores(roles: PPORoles, prompts: list[dict], rollout, cfg: PPOConfig, tokenizer) -> torch.Tensor:
    """(N,) fp32 scores of the rollout's completions: the reward model's (normalised, clipped) or the
    functions' weighted sum; minus the missing-EOS penalty where a completion never stopped."""
    if isinstance(roles.reward, RewardModel):
        with roles.as_reward():
            scores = normalized_scores(roles.reward, rollout.input_ids, rollout.attention_mask,
                                       cfg.normalize_reward, cfg.reward_clip)
    else:
        scores, _ = rollout_rewards(roles.reward, prompts, rollout, cfg.reward_weights, tokenizer)
        if cfg.reward_clip is not None:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
    scores = scores.to(rollout.input_ids.device)
    return scores if cfg.missing_eos_penalty is None else eos_penalty(rollout, scores, cfg.missing_eos_penalty)


def _experience(models: PPOModels, prompts: list[dict], cfg: PPOConfig, kl_coef: float, tokenizer) -> dict:
    """One micro-batch of experience: the rollout, its old log-probs and values, reference KL and rewards."""
    roles = models.roles
    rollout = _sample(roles, prompts, cfg)
    ids, attn, p = rollout.input_ids, rollout.attention_mask, rollout.prompt_length
    mask = rollout.completion_mask[:, p:].float()
    with torch.no_grad(), eval_mode(models):  # the sampling-time policy: no dropout, as it sampled
        with roles.as_policy():
            old_logp, entropy = (x[:, p - 1:] for x in token_logprobs(roles.policy, ids, attn, return_entropy=True))
        with roles.as_value():
            old_values = roles.value(ids, attn)[:, p - 1:-1]
        ref_logp = roles.reference_logprobs(ids, attn)[:, p - 1:]
        scores = _scores(roles, prompts, rollout, cfg, tokenizer)
    rewards, kl = ppo_rewards(scores, old_logp, ref_logp, mask, kl_coef, cfg.kl_estimator)
    return {"input_ids": ids, "attention_mask": attn, "prompt_length": p, "mask": mask, "old_logp": old_logp,
            "old_values": old_values * mask, "rewards": rewards, "scores": scores, "kl": kl, "entropy": entropy,
            "rollout": rollout}


def _whiten_all(values: list[torch.Tensor], masks: list[torch.Tensor], shift_mean: bool = True) -> list[torch.Tensor]:
    """`whiten` over the masked entries of several (B_i, T_i) tensors (micro-batches of other widths) taken
    as one batch: their masked entries are whitened as one row, then put back."""
    picks = [m > 0 for m in masks]
    flat = torch.cat([v[on] for v, on in zip(values, picks)])[None]  # (1, n)
    if flat.shape[1] < 2:
        return values  # nothing to whiten (a single completion token)
    white = whiten(flat, torch.ones_like(flat), shift_mean)[0]
    out, start = [], 0
    for v, on in zip(values, picks):
        k = int(on.sum())
        out.append(torch.zeros_like(v).masked_scatter(on, white[start:start + k]))
        start += k
    return out


def _step_metrics(items: list[dict], kl_coef: float) -> dict:
    """Per-completion and per-token statistics of the step's experience, as (sum, n)."""
    metrics = {}
    for it in items:
        r, m = it["rollout"], it["mask"]
        n, tokens = m.shape[0], float(m.sum())
        seq_kl = (it["kl"] * m).sum(-1)
        metrics = add_metrics(metrics, {
            "score": (float(it["scores"].sum()), n), "kl": (float(seq_kl.sum()), n),
            "non_score_reward": (float(-kl_coef * seq_kl.sum()), n), "kl_coef": (kl_coef * n, n),
            "entropy": (float((it["entropy"] * m).sum()), int(tokens)),
            "completion_length": (float(r.completion_lengths.sum()), n), "eos_rate": (float(r.ended.sum()), n)})
    returns = torch.cat([it["returns"][it["mask"] > 0] for it in items])
    values = torch.cat([it["old_values"][it["mask"] > 0] for it in items])
    if returns.numel() > 1 and float(returns.var()) > 0:  # over this process's batch
        explained = 1.0 - float((returns - values).var() / returns.var())
        metrics["explained_variance"] = (explained * len(items), len(items))
    return metrics


def _mini_batches(items: list[dict], cfg: PPOConfig, split_roles: bool) -> list[list[dict]]:
    """`ppo_epochs` shuffled passes, each `num_mini_batches` updates of rows from every micro-batch.

    With `split_roles` each piece is two micro-batches, the policy's loss then the value model's, so that
    backward frees one role's activations before the other's forward: the update's peak holds one role's
    (each parameter belongs to one role, so the gradients are those of the joint loss, bit for bit). Under
    DDP (`split_roles` False) one forward computes both, as DDP needs every trained parameter in it.
    """
    roles = ("policy", "value") if split_roles else ("both",)
    updates = []
    for _ in range(cfg.ppo_epochs):
        pieces = [torch.randperm(it["mask"].shape[0]).tensor_split(cfg.num_mini_batches) for it in items]
        for m in range(cfg.num_mini_batches):
            update = []
            for it, split in zip(items, pieces):
                rows = split[m].to(it["input_ids"].device)
                if len(rows):
                    piece = {"prompt_length": it["prompt_length"], **{k: it[k][rows] for k in ROW_KEYS}}
                    update += [{**piece, "role": role} for role in roles]
            updates.append(update)
    return updates


def _update_loss(model, batch: dict, count: int, cfg: PPOConfig):
    """One micro-batch's share of the update's loss (policy, value or both) and its (sum, n) metrics."""
    mask, role, n = batch["mask"], batch["role"], int(batch["mask"].sum())
    out = model(batch["input_ids"], batch["attention_mask"], batch["prompt_length"], role)
    logp, values = (out if role == "both" else (out, None) if role == "policy" else (None, out))
    total, metrics = 0.0, {}
    if logp is not None:
        per_token, stats = clipped_objective(logp, batch["old_logp"], batch["advantages"], mask, cfg.cliprange)
        pg_sum = (per_token * mask).sum()
        total = total + pg_sum
        metrics.update({"policy_loss": (float(pg_sum.detach()), n), **{k: (v * n, n) for k, v in stats.items()}})
    if values is not None:
        vf, vstats = clipped_value_error(values, batch["old_values"], batch["returns"], mask, cfg.cliprange_value)
        vf_sum = (vf * mask).sum()
        total = total + cfg.vf_coef * vf_sum
        metrics.update({"value_loss": (float(vf_sum.detach()), n), **{k: (v * n, n) for k, v in vstats.items()}})
    return total / count, metrics


def ppo_task(roles: PPORoles, cfg: PPOConfig, tokenizer=None) -> Task:
    """The PPO objective as a `Task` for `fit` on `PPOModels(roles)` (examples are prompts; see the module
    docstring). Its state (the KL coefficient) is saved with checkpoints; with `kl_target` the coefficient
    adapts after every step to the step's mean KL over all processes.

    Metrics: "score", "kl" (per completion, summed over its tokens), "non_score_reward", "kl_coef",
    "entropy" (per token), "completion_length", "eos_rate", "explained_variance"; from the updates
    "policy_loss", "value_loss", "clipfrac", "approx_kl", "vf_clipfrac" (per token, over every update).
    """
    controller = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)

    def prepare(model, micro, module):
        coef = controller.coef
        items = [_experience(module, batch["prompts"], cfg, coef, tokenizer) for batch in micro]
        rewards = [it["rewards"] for it in items]
        if cfg.whiten_rewards:
            rewards = _whiten_all(rewards, [it["mask"] for it in items], shift_mean=False)
        for it, r in zip(items, rewards):
            it["advantages"], it["returns"] = gae(r, it["old_values"], it["mask"], cfg.gamma, cfg.lam)
        for it, a in zip(items, _whiten_all([it["advantages"] for it in items], [it["mask"] for it in items])):
            it["advantages"] = a
        tokens = sum(int(it["attention_mask"].sum()) for it in items)
        split = model is module  # one process: one role's activations at a time (see _mini_batches)
        return _mini_batches(items, cfg, split), _step_metrics(items, coef), tokens

    def loss(model, batch, count, module):
        return _update_loss(model, batch, count, cfg)

    def evaluate(model, batch, count, module):
        item = _experience(module, batch["prompts"], cfg, controller.coef, tokenizer)
        n = item["mask"].shape[0]
        seq_kl = (item["kl"] * item["mask"]).sum(-1)
        return -item["scores"].sum() / count, {
            "score": (float(item["scores"].sum()), n), "kl": (float(seq_kl.sum()), n),
            "completion_length": (float(item["rollout"].completion_lengths.sum()), n),
            "eos_rate": (float(item["rollout"].ended.sum()), n)}

    def after_step(metrics):
        kl, n = metrics.get("kl", (float("nan"), 0))
        if n:
            controller.update(kl / n, n)

    def count(batch):  # an update's mean is over its completion tokens, counted once (by the policy's piece)
        if "mask" not in batch:
            return len(batch["prompts"])
        return 0 if batch["role"] == "value" else int(batch["mask"].sum())

    settings = {k: getattr(cfg, k) for k in ("ppo_epochs", "num_mini_batches", "kl_estimator", "kl_target",
                                             "gamma", "lam", "cliprange", "cliprange_value", "vf_coef",
                                             "whiten_rewards", "temperature", "max_new_tokens")}
    return Task(name="ppo", check_example=check_prompt_example, collate=_collate_prompts, count=count, loss=loss,
                counts="completion tokens", settings=settings, shown=("score", "kl"), prepare=prepare,
                evaluate=evaluate, after_step=after_step, state=controller)


def ppo(policy, prompts, reward, cfg: PPOConfig | None = None, value=None, reference=None, eval_prompts=None,
        tokenizer=None, **fit_kwargs) -> History:
    """Train `policy` (a `CausalLM`, usually with LoRA) and its value model with PPO on `prompts`.

    Args:
        policy: the model to tune; with LoRA its active adapter is the policy, the base is the reference.
        prompts, eval_prompts: prompt examples (`tt.data.load_prompts`); their other fields reach reward
            functions. Eval reports the score and KL of fresh completions (its loss: minus the mean score).
        reward: a `RewardModel` (on the policy's base with `adapter_name`, or on a base of its own), or a
            reward function `f(prompts, completions, **fields) -> list[float | None]`, or a list of them.
        cfg: a `PPOConfig` (default: `PPOConfig()`).
        value: a `ValueModel`, or None for a value adapter + head on the policy's base (from the reward
            model's adapter and head when it shares the base, else fresh with a zero head).
        reference: a separate reference model, or None for the policy with its adapters disabled.
        tokenizer: decodes completions for reward functions (None: they get token id lists).
        **fit_kwargs: `resume_from`, `callbacks`, `stream`, as `fit`.

    Returns:
        fit's `History` (per-step statistics in `History.metrics`).

    Raises:
        TypeError: a role of the wrong type, or cfg not a PPOConfig.
        ValueError: bad prompts (named), roles that cannot share the base (see `ppo_roles`), reward weights
            that do not match the functions, `grad_checkpointing` with a value model on the policy's base (the
            recomputation would run under the wrong adapter), what `fit` refuses.
    """
    cfg = PPOConfig() if cfg is None else cfg
    if not isinstance(cfg, PPOConfig):
        raise TypeError(f"tt.rlhf.ppo: cfg must be a tt.rlhf.PPOConfig, got {type(cfg).__name__}")
    functions = reward if isinstance(reward, (list, tuple)) else [reward] if callable(reward) else None
    if (cfg.reward_weights is not None and not isinstance(reward, RewardModel) and functions is not None
            and len(cfg.reward_weights) != len(functions)):
        raise ValueError(f"PPOConfig.reward_weights has {len(cfg.reward_weights)} weights for "
                         f"{len(functions)} reward functions")
    check_data(prompts, "prompts", _PROMPTS)  # named as the caller knows them, before the model changes
    if eval_prompts is not None:
        check_data(eval_prompts, "eval_prompts", _PROMPTS)
    if cfg.grad_checkpointing and (value is None or getattr(value, "decoder", None) is policy):
        raise ValueError("PPOConfig.grad_checkpointing=True with the value model on the policy's base: the backward "
                         "recomputation would run under the wrong adapter; turn it off or pass a separate value model")
    roles = ppo_roles(policy, reward, value, reference)
    task_cfg = dataclasses.replace(cfg, task=ppo_task(roles, cfg, tokenizer))
    return fit(PPOModels(roles), prompts, task_cfg, eval_data=eval_prompts, **fit_kwargs)
