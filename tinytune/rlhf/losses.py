"""Pairwise preference losses: Bradley-Terry reward modelling and DPO with its variants.

Every function takes per-example (B,) tensors and returns a scalar mean, computed in fp32 (fp64 when
the inputs are fp64). The formulas are TRL's (`RewardTrainer`, `DPOTrainer`, `CPOTrainer` for SimPO);
see docs/rlhf.md for the maths.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")
_USE_LENGTHS = ("ipo", "simpo")
_USE_SMOOTHING = ("sigmoid", "simpo")


def _vector(name: str, x, like: torch.Tensor | None = None) -> torch.Tensor:
    """`x` as a floating (B,) tensor in fp32 or wider; ValueError naming `name` and the shapes otherwise."""
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or not x.is_floating_point():
        what = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating (B,) tensor, got {what}")
    if like is not None and x.shape != like.shape:
        raise ValueError(f"{name} must have the shape of the chosen scores {tuple(like.shape)}, got {tuple(x.shape)}")
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _pair_losses(r_chosen, r_rejected, margin, center_coef) -> torch.Tensor:
    """(B,) per-pair Bradley-Terry loss plus centring, after validating every argument."""
    r_chosen = _vector("r_chosen", r_chosen)
    r_rejected = _vector("r_rejected", r_rejected, r_chosen)
    if isinstance(center_coef, bool) or not isinstance(center_coef, (int, float)) or not center_coef >= 0:
        raise ValueError(f"center_coef must be a number >= 0, got {center_coef!r}")
    diff = r_chosen - r_rejected  # (B,)
    if margin is not None:
        diff = diff - _vector("margin", margin, r_chosen)
    return -F.logsigmoid(diff) + center_coef * (r_chosen + r_rejected) ** 2


def reward_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                center_coef: float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss of a reward model: `-logsigmoid(r_c - r_r - margin).mean()
    + center_coef * ((r_c + r_r) ** 2).mean()` (TRL's `RewardTrainer`, `center_rewards_coefficient`).

    Args:
        r_chosen: (B,) scores of the preferred responses.
        r_rejected: (B,) scores of the other responses.
        margin: (B,) how much better the chosen one is (Llama 2's margin), or None for 0.
        center_coef: weight of the term that keeps rewards centred on 0 (>= 0).

    Returns:
        A scalar loss.

    Raises:
        ValueError: a score or margin that is not a floating (B,) tensor of r_chosen's shape, or a
            negative center_coef.
    """
    return _pair_losses(r_chosen, r_rejected, margin, center_coef).mean()


def grouped_reward_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, group_ids: torch.Tensor,
                        margin: torch.Tensor | None = None, center_coef: float = 0.0) -> torch.Tensor:
    """`reward_loss` for K-way rankings: the mean over each group's pairs, then the mean over groups.

    A prompt with K ranked responses gives K (K - 1) / 2 pairs sharing one group id; averaging within
    the group first weighs every prompt equally, whatever its K (InstructGPT's loss).

    Args:
        r_chosen, r_rejected, margin, center_coef: as `reward_loss`, per pair.
        group_ids: (B,) integer group of each pair (any values; pairs of a group need not be adjacent).

    Returns:
        A scalar loss.

    Raises:
        ValueError: as `reward_loss`, or group_ids not an integer tensor of r_chosen's shape.
    """
    per_pair = _pair_losses(r_chosen, r_rejected, margin, center_coef)  # (B,)
    if not isinstance(group_ids, torch.Tensor) or group_ids.is_floating_point() or group_ids.shape != per_pair.shape:
        what = f"{group_ids.dtype} {tuple(group_ids.shape)}" if isinstance(group_ids, torch.Tensor) else group_ids
        raise ValueError(f"group_ids must be an integer tensor of shape {tuple(per_pair.shape)}, got {what}")
    _, inverse = torch.unique(group_ids, return_inverse=True)  # (B,) in [0, G)
    sums = per_pair.new_zeros(int(inverse.max()) + 1).index_add_(0, inverse, per_pair)  # (G,)
    counts = torch.bincount(inverse).to(per_pair.dtype)  # (G,)
    return (sums / counts).mean()


def check_dpo_args(beta, loss_type, label_smoothing, lengths_given: bool) -> None:
    """ValueError for beta <= 0, an unknown loss_type, or a smoothing / lengths that loss_type ignores."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta must be a number > 0, got {beta!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) \
            or not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and loss_type not in _USE_SMOOTHING:
        raise ValueError(f"label_smoothing applies to loss_type {_USE_SMOOTHING} only, got {loss_type!r}")
    if lengths_given and loss_type not in _USE_LENGTHS:
        raise ValueError(f"chosen_lengths / rejected_lengths apply to loss_type {_USE_LENGTHS} only, "
                         f"got {loss_type!r}")
    if loss_type == "simpo" and not lengths_given:
        raise ValueError("loss_type 'simpo' needs chosen_lengths and rejected_lengths (it averages log-probs)")


def _smoothed(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Conservative DPO: `-(1 - ls) logsigmoid(z) - ls logsigmoid(-z)`, per pair."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
             ref_rejected: torch.Tensor | None, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, *, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None, gamma: float = 0.5):
    """The DPO loss and its variants, from summed sequence log-probs, with h = (pc - rc) - (pr - rr):

    - "sigmoid" (DPO; cDPO with label_smoothing): `-(1 - ls) logsigmoid(beta h) - ls logsigmoid(-beta h)`
    - "ipo": `(h - 1 / (2 beta)) ** 2` on length-normalised log-probs: pass `chosen_lengths` /
      `rejected_lengths` (every log-prob is divided by its length, as TRL does) or pass log-probs
      already averaged per token and no lengths.
    - "hinge" (SLiC): `relu(1 - beta h)`
    - "simpo" (reference-free; TRL's `CPOTrainer`): `-(1 - ls) logsigmoid(z) - ls logsigmoid(-z)` with
      `z = beta (pc / len_c - pr / len_r) - gamma`; ref_* are ignored (may be None); lengths required.

    At the first step (policy == reference) "sigmoid" gives exactly ln 2.

    Args:
        policy_chosen, policy_rejected: (B,) summed log-probs of the responses under the policy.
        ref_chosen, ref_rejected: (B,) the same under the frozen reference (None only for "simpo").
        beta: the KL strength / inverse temperature, > 0.
        loss_type: one of LOSS_TYPES.
        label_smoothing: in [0, 0.5): the assumed rate of flipped labels ("sigmoid" and "simpo").
        chosen_lengths, rejected_lengths: (B,) token counts of the responses ("ipo", "simpo").
        gamma: SimPO's target reward margin (TRL's `simpo_gamma`).

    Returns:
        (loss, chosen_rewards, rejected_rewards): a scalar, and (B,) detached implicit rewards
        `beta * (policy - ref)` of the log-probs the loss used (`beta * policy / length` for "simpo").

    Raises:
        ValueError: beta <= 0, an unknown loss_type (the choices are named), label_smoothing outside
            [0, 0.5) or given to "ipo"/"hinge", lengths for a loss_type that does not use them or
            missing for "simpo", or inputs that are not floating (B,) tensors of one shape.
    """
    lengths_given = chosen_lengths is not None or rejected_lengths is not None
    check_dpo_args(beta, loss_type, label_smoothing, lengths_given)
    pc = _vector("policy_chosen", policy_chosen)
    pr = _vector("policy_rejected", policy_rejected, pc)
    if lengths_given:
        pc = pc / _lengths("chosen_lengths", chosen_lengths, pc)
        pr = pr / _lengths("rejected_lengths", rejected_lengths, pc)
    if loss_type == "simpo":
        losses = _smoothed(beta * (pc - pr) - gamma, label_smoothing)
        return losses.mean(), (beta * pc).detach(), (beta * pr).detach()
    rc, rr = _vector("ref_chosen", ref_chosen, pc), _vector("ref_rejected", ref_rejected, pc)
    if lengths_given:
        rc, rr = rc / chosen_lengths.to(rc.dtype), rr / rejected_lengths.to(rr.dtype)
    h = (pc - rc) - (pr - rr)  # (B,)
    if loss_type == "sigmoid":
        losses = _smoothed(beta * h, label_smoothing)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:  # "hinge"
        losses = torch.relu(1 - beta * h)
    return losses.mean(), (beta * (pc - rc)).detach(), (beta * (pr - rr)).detach()


def _lengths(name: str, lengths, like: torch.Tensor) -> torch.Tensor:
    """(B,) positive token counts in like's dtype; ValueError naming `name` otherwise."""
    if not isinstance(lengths, torch.Tensor) or lengths.shape != like.shape or not bool((lengths > 0).all()):
        what = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else lengths
        raise ValueError(f"{name} must be a (B,) = {tuple(like.shape)} tensor of counts > 0, got {what}")
    return lengths.to(like.dtype)
