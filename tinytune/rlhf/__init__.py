"""Preference learning: per-token log-probs, Bradley-Terry reward losses, the reward model, DPO and its variants.

Imports peft, models, data, train and ops; nothing below imports it. See docs/rlhf.md.
"""
from .data import preference_batch
from .dpo_step import (adapters_disabled, completion_lengths, completion_logprobs, completion_mask, dpo_batch_loss,
                       reference_logprobs)
from .logprobs import token_logprobs
from .losses import LOSS_TYPES, dpo_loss, grouped_reward_loss, reward_loss
from .reward_model import RewardModel, load_reward_model, pairwise_metrics, save_reward_model
from .tasks import check_preference_example, collate_preferences, dpo_task, reward_task
from .trainers import (DPOConfig, RewardConfig, dpo, evaluate_reward_model, precompute_reference, preference_accuracy,
                       score_completions, train_reward_model)

__all__ = [
    "DPOConfig",
    "LOSS_TYPES",
    "RewardConfig",
    "check_preference_example",
    "collate_preferences",
    "dpo",
    "dpo_task",
    "evaluate_reward_model",
    "precompute_reference",
    "preference_accuracy",
    "reward_task",
    "score_completions",
    "train_reward_model",
    "RewardModel",
    "adapters_disabled",
    "completion_lengths",
    "completion_logprobs",
    "completion_mask",
    "dpo_batch_loss",
    "dpo_loss",
    "grouped_reward_loss",
    "load_reward_model",
    "pairwise_metrics",
    "preference_batch",
    "reference_logprobs",
    "reward_loss",
    "save_reward_model",
    "token_logprobs",
]
