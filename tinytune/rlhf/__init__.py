"""Preference learning: per-token log-probs, Bradley-Terry reward losses, DPO and its variants.

Imports peft, models, data, train and ops; nothing below imports it. See docs/rlhf.md.
"""
from .logprobs import token_logprobs
from .losses import LOSS_TYPES, dpo_loss, grouped_reward_loss, reward_loss

__all__ = [
    "LOSS_TYPES",
    "dpo_loss",
    "grouped_reward_loss",
    "reward_loss",
    "token_logprobs",
]
