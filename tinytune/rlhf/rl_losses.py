"""The losses of online RL on per-token log-probs: KL estimators, PPO's per-token rewards, its clipped
policy and value losses, the KL controller, and GRPO's clipped loss with its three aggregations.

Tensors are (B, T) per completion token with a `mask` (1 on completion tokens), in fp32 or wider. Formulas
and defaults follow TRL (`PPOTrainer` up to v0.20, `GRPOTrainer`) and the papers: Schulman et al. 2017
(PPO's clipping), Ziegler et al. 2019 (the adaptive KL coefficient), Schulman's "Approximating KL
divergence" note (k1, k2, k3), Shao et al. 2024 (GRPO), Yu et al. 2025 (DAPO: token-level loss and
clip-higher), Liu et al. 2025 (Dr. GRPO).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .advantages import _per_token, masked_mean

KL_ESTIMATORS = ("k1", "k2", "k3")
GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs.

    With `d = logp - ref_logp`: "k1" = d (unbiased, can be negative; TRL PPO's default), "k2" = d^2 / 2,
    "k3" = exp(-d) - 1 + d (unbiased and >= 0; GRPO's). All are exactly 0 where policy == reference.

    Raises:
        ValueError: an unknown kind, or shapes that differ.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"KL estimator must be one of {list(KL_ESTIMATORS)}, got {kind!r}")
    logp, ref_logp = _per_token("logp", logp), _per_token("ref_logp", ref_logp, logp)
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d ** 2
    return torch.expm1(-d) + d


def ppo_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                kl_coef: float, kind: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token rewards: `-kl_coef * KL_t` on every completion token, plus each row's score on its
    last completion token (never on a pad).

    Args:
        scores: (B,) the reward model's (or reward function's) score of each completion.
        logp, ref_logp: (B, T) log-probs of the sampled tokens under the policy (at sampling) and reference.
        mask: (B, T) 1 on completion tokens; every row needs at least one.
        kl_coef: the KL penalty's weight (>= 0).
        kind: the KL estimator ("k1" as TRL's PPO).

    Returns:
        (rewards, kl): (B, T) each, 0 off the mask; `kl` is the per-token estimate (for the statistics).

    Raises:
        ValueError: a row without completion tokens, bad shapes, a negative kl_coef.
    """
    mask = _per_token("mask", mask, _per_token("logp", logp))
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)) or not 0 <= kl_coef < math.inf:
        raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}")
    if not isinstance(scores, torch.Tensor) or scores.shape != mask.shape[:1]:
        what = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be (B,) = ({mask.shape[0]},), got {what}")
    on = mask > 0
    lengths = on.sum(-1)
    if bool((lengths == 0).any()):
        raise ValueError(f"rows {(lengths == 0).nonzero().flatten().tolist()} have no completion tokens")
    kl = kl_estimate(logp, ref_logp, kind).masked_fill(~on, 0.0)
    rewards = -kl_coef * kl
    # the last completion token of each row: the highest masked column
    last = (on * torch.arange(1, mask.shape[1] + 1, device=mask.device)).argmax(-1)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores.to(rewards.dtype)
    return rewards, kl


def _clip(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2, clip_high: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate: the masked mean over all tokens of
    `max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip_high))`, `ratio = exp(logp - old_logp)`.

    Args:
        logp: (B, T) current log-probs of the sampled tokens (with gradients).
        old_logp: (B, T) their log-probs when sampled (no gradients).
        advantages: (B, T) per-token advantages (PPO: whitened GAE), or (B,) one per completion (GRPO).
        mask: (B, T) 1 on completion tokens.
        clip: epsilon (0.2); clip_high: the upper epsilon (DAPO's clip-higher), None: `clip`.

    Returns:
        (loss, stats): "clipfrac" (share of tokens where the clipped term was taken) and "approx_kl"
        (`mean((logp - old_logp)^2) / 2`, TRL's).
    """
    per_token, stats = clipped_objective(logp, old_logp, advantages, mask, clip, clip_high)
    return masked_mean(per_token, _per_token("mask", mask)), stats


def clipped_objective(logp, old_logp, advantages, mask, clip: float = 0.2,
                      clip_high: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The per-token clipped surrogate loss (B, T) of `ppo_policy_loss`, before aggregation, and its stats."""
    logp = _per_token("logp", logp)
    old_logp, mask = _per_token("old_logp", old_logp, logp).detach(), _per_token("mask", mask, logp)
    low = _clip("clip", clip)
    high = low if clip_high is None else _clip("clip_high", clip_high)
    if not isinstance(advantages, torch.Tensor) or advantages.shape not in (logp.shape, logp.shape[:1]):
        what = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        raise ValueError(f"advantages must be (B, T) = {tuple(logp.shape)} or (B,), got {what}")
    adv = (advantages if advantages.dim() == 2 else advantages[:, None]).detach().to(logp.dtype)
    diff = logp - old_logp
    ratio = torch.exp(diff)
    unclipped, clipped = -adv * ratio, -adv * torch.clamp(ratio, 1 - low, 1 + high)
    per_token = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).to(logp.dtype), mask).item(),
                 "approx_kl": masked_mean(0.5 * diff ** 2, mask).item()}
    return per_token, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped value loss: `0.5 * masked_mean(max((V - R)^2, (V_clipped - R)^2))`, with
    `V_clipped = old_V + clamp(V - old_V, -clip, clip)` (TRL's `cliprange_value`, 0.2).

    Returns:
        (loss, stats): "vf_clipfrac" (share of tokens where the clipped term was larger).
    """
    per_token, stats = clipped_value_error(values, old_values, returns, mask, clip)
    return masked_mean(per_token, _per_token("mask", mask, per_token)), stats


def clipped_value_error(values, old_values, returns, mask, clip: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """The per-token clipped value error (B, T) of `value_loss`, before aggregation, and its stats."""
    values = _per_token("values", values)
    old_values = _per_token("old_values", old_values, values).detach()
    returns, mask = _per_token("returns", returns, values).detach(), _per_token("mask", mask, values)
    c = _clip("clip", clip)
    clipped = old_values + torch.clamp(values - old_values, -c, c)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((b > a).to(values.dtype), mask).item()}
    return 0.5 * torch.maximum(a, b), stats


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              loss_type: str = "dapo", epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
              ref_logp: torch.Tensor | None = None,
              max_completion_length: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's loss: the clipped surrogate per token (one advantage per completion), plus `beta` times the
    k3 KL to the reference, aggregated by `loss_type`:

    - "grpo": each completion's mean over its tokens, then the mean over completions (the paper's);
    - "dapo": the sum over every completion token of the batch / their number (token-level; TRL's default);
    - "dr_grpo": the sum / (B * max_completion_length) (no length bias; Dr. GRPO).

    Args:
        logp, old_logp, mask: (B, T) as `ppo_policy_loss`; advantages: (B,) (`group_advantages`).
        epsilon, epsilon_high: the clip range (0.2; epsilon_high None: epsilon).
        beta: the KL weight (0.0: no reference needed); ref_logp: (B, T), required when beta > 0.
        max_completion_length: dr_grpo's constant (None: T).

    Returns:
        (loss, stats): "clipfrac", "approx_kl", and "kl" (mean k3 per token) when beta > 0.

    Raises:
        ValueError: an unknown loss_type, beta > 0 without ref_logp, bad shapes or constants.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {list(GRPO_LOSS_TYPES)}, got {loss_type!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < math.inf:
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    per_token, stats = clipped_objective(logp, old_logp, advantages, mask, epsilon, epsilon_high)
    mask = _per_token("mask", mask, per_token)
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp (the reference's log-probs of the sampled tokens)")
        kl = kl_estimate(logp, ref_logp, "k3")
        per_token = per_token + beta * kl
        stats["kl"] = masked_mean(kl.detach(), mask).item()
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1)).mean()
    elif loss_type == "dapo":
        loss = masked_mean(per_token, mask)
    else:
        length = per_token.shape[1] if max_completion_length is None else max_completion_length
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"max_completion_length must be an int >= 1 or None, got {length!r}")
        loss = (per_token * mask).sum() / (per_token.shape[0] * length)
    return loss, stats


@dataclass
class KLController:
    """PPO's KL coefficient: fixed (`target=None`), or adaptive (Ziegler et al. 2019) towards `target`:
    after a batch with mean KL `kl` over `n_steps` samples, `coef *= 1 + clip(kl / target - 1, -0.2, 0.2)
    * n_steps / horizon`.

    Args:
        coef: the initial coefficient (>= 0; TRL's PPO default 0.05).
        target: the KL to steer towards (> 0), or None for a fixed coefficient.
        horizon: how many samples the adaptation spreads over (10000, as TRL's).
    """

    coef: float = 0.05
    target: float | None = None
    horizon: int = 10000

    def __post_init__(self):
        if isinstance(self.coef, bool) or not isinstance(self.coef, (int, float)) or not 0 <= self.coef < math.inf:
            raise ValueError(f"KLController.coef must be a finite number >= 0, got {self.coef!r}")
        if self.target is not None:
            _clip("KLController.target", self.target)
        if isinstance(self.horizon, bool) or not isinstance(self.horizon, int) or self.horizon < 1:
            raise ValueError(f"KLController.horizon must be an int >= 1, got {self.horizon!r}")

    def update(self, kl: float, n_steps: int) -> float:
        """Adapt the coefficient after a batch (a no-op when fixed); returns the new coefficient."""
        if self.target is not None and math.isfinite(kl):
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * n_steps / self.horizon
        return self.coef

    def state_dict(self) -> dict:
        """What a checkpoint keeps (JSON values)."""
        return {"coef": self.coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s values (validated first: a refused state changes nothing)."""
        checked = KLController(**state)
        self.coef, self.target, self.horizon = checked.coef, checked.target, checked.horizon
