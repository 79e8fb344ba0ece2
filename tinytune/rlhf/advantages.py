"""Advantages for online RL: GAE with a value model (PPO), whitening, and group-relative advantages (GRPO).

Every function works on (B, T) per-token tensors with a `mask` (1 on completion tokens, 0 on the prompt and
padding; completion tokens of a row are contiguous), or on (N,) per-completion rewards, in fp32 or wider.
The formulas are those of TRL (`PPOTrainer`'s GAE loop and `masked_whiten`, `GRPOTrainer`'s advantages) and
of the papers they cite (Schulman et al. 2016 for GAE; Shao et al. 2024 for GRPO; Liu et al. 2025 for
Dr. GRPO's unscaled advantages).
"""
from __future__ import annotations

import torch

SCALES = ("group", "batch", "none")


def _per_token(name: str, x, like: torch.Tensor | None = None) -> torch.Tensor:
    """`x` as a floating (B, T) tensor (fp32 or wider); ValueError naming `name` and the shapes otherwise."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        what = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (B, T) tensor, got {what}")
    if like is not None and x.shape != like.shape:
        raise ValueError(f"{name} must have the shape {tuple(like.shape)} of the rewards, got {tuple(x.shape)}")
    return x.to(torch.promote_types(x.dtype if x.is_floating_point() else torch.float32, torch.float32))


def _unit_interval(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's completion tokens.

    `delta_t = r_t + gamma * V_{t+1} - V_t` and `A_t = delta_t + gamma * lam * A_{t+1}`, where the value and
    advantage after a row's last completion token are 0 (the episode ends there). Returns are `A + V`, the
    value model's regression targets.

    Args:
        rewards: (B, T) per-token rewards (PPO: minus the KL penalty, plus the score at the last token).
        values: (B, T) the value model's estimates at each token.
        mask: (B, T) 1 on completion tokens, 0 elsewhere (prompt, padding).
        gamma: discount in [0, 1] (1.0: TRL's and the InstructGPT recipe's default).
        lam: GAE's lambda in [0, 1] (0.95).

    Returns:
        (advantages, returns), each (B, T), 0 where `mask` is 0; not whitened.

    Raises:
        ValueError: tensors that are not (B, T) of one shape, gamma or lam outside [0, 1].
    """
    rewards = _per_token("rewards", rewards)
    values, mask = _per_token("values", values, rewards), _per_token("mask", mask, rewards)
    gamma, lam = _unit_interval("gamma", gamma), _unit_interval("lam", lam)
    on = mask > 0
    r, v = rewards.masked_fill(~on, 0.0), values.masked_fill(~on, 0.0)
    advantages = torch.zeros_like(r)
    carry = torch.zeros_like(r[:, 0])  # A_{t+1}, 0 past the end
    next_value = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):  # T steps, vectorised over the batch
        delta = r[:, t] + gamma * next_value - v[:, t]
        carry = torch.where(on[:, t], delta + gamma * lam * carry, torch.zeros_like(carry))
        advantages[:, t] = carry
        next_value = torch.where(on[:, t], v[:, t], torch.zeros_like(next_value))
    return advantages, (advantages + v).masked_fill(~on, 0.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of `x` over the positions where `mask` is 1 (0 when the mask is empty)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """`(x - mean) / sqrt(var + eps)` over the masked positions (variance unbiased, as TRL's
    `masked_whiten`); with `shift_mean=False` the mean is added back (PPO's reward whitening). 0 off the mask.

    Raises:
        ValueError: fewer than 2 masked positions (no variance), or shapes that differ.
    """
    x, mask = _per_token("x", x), _per_token("mask", mask, x)
    n = int((mask > 0).sum())
    if n < 2:
        raise ValueError(f"whiten needs at least 2 masked positions, got {n}")
    mean = masked_mean(x, mask)
    var = ((x - mean) ** 2 * mask).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * mask


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages: each completion's reward minus its group's mean, scaled.

    Rows `i * group_size ... (i + 1) * group_size - 1` are the completions of prompt i.

    Args:
        rewards: (N,) one reward per completion, N a multiple of `group_size`.
        group_size: G, completions per prompt (>= 2 for scale="group": a std needs two).
        scale: "group": divided by the group's std + eps (unbiased std; GRPO); "batch": by the std of the
            whole batch's rewards + eps; "none": not divided (Dr. GRPO).
        eps: added to the std (1e-4, as TRL).

    Returns:
        (N,) advantages in fp32 (fp64 for fp64 rewards).

    Raises:
        ValueError: rewards not a floating (N,) tensor, N not a multiple of group_size, a bad group_size
            or scale.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        what = f"{rewards.dtype} {tuple(rewards.shape)}" if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a floating (N,) tensor, got {what}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {list(SCALES)}, got {scale!r}")
    low = 2 if scale == "group" else 1
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < low:
        raise ValueError(f"group_size must be an int >= {low} for scale={scale!r}, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards are not whole groups of group_size={group_size}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    groups = r.view(-1, group_size)  # (prompts, G)
    centred = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "group":
        return centred / (groups.std(dim=1).repeat_interleave(group_size) + eps)
    if scale == "batch":
        if r.numel() < 2:
            raise ValueError("scale='batch' needs at least 2 rewards (a std)")
        return centred / (r.std() + eps)
    return centred
