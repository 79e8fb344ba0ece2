"""Preference learning and RL: per-token log-probs, Bradley-Terry reward losses, the reward model, DPO and its
variants; the maths of online RL (GAE, group advantages, KL estimators, PPO and GRPO losses); and the online
trainers, PPO (every role on one frozen base) and GRPO.

Imports peft, models, data, train and ops; nothing below imports it. See docs/rlhf.md.
"""
from .advantages import gae, group_advantages, masked_mean, whiten
from .data import preference_batch
from .dpo_step import (adapters_disabled, completion_lengths, completion_logprobs, completion_mask, dpo_batch_loss,
                       reference_logprobs)
from .logprobs import token_logprobs
from .losses import LOSS_TYPES, dpo_loss, grouped_reward_loss, reward_loss
from .rollout import Rollout, completions, eos_penalty, generate_rollouts
from .rl_losses import (GRPO_LOSS_TYPES, KL_ESTIMATORS, KLController, clipped_objective, clipped_value_error,
                        grpo_loss, kl_estimate, ppo_policy_loss, ppo_rewards, value_loss)
from .rewards import combine_rewards, load_reward_function, normalized_scores, reward_matrix, rollout_rewards
from .reward_model import RewardModel, load_reward_model, pairwise_metrics, save_reward_model
from .tasks import check_preference_example, collate_preferences, dpo_task, reward_task
from .grpo import GRPOConfig, check_prompt_example, grpo, grpo_task
from .roles import use_adapter
from .ppo_config import PPOConfig
from .ppo_roles import PPOModels, PPORoles, ppo_roles
from .ppo import ppo, ppo_task
from .value_model import ValueModel
from .trainers import (DPOConfig, RewardConfig, dpo, evaluate_reward_model, precompute_reference, preference_accuracy,
                       score_completions, train_reward_model)

__all__ = [
    "DPOConfig",
    "GRPO_LOSS_TYPES",
    "KLController",
    "KL_ESTIMATORS",
    "clipped_objective",
    "combine_rewards",
    "load_reward_function",
    "normalized_scores",
    "reward_matrix",
    "gae",
    "group_advantages",
    "grpo_loss",
    "kl_estimate",
    "masked_mean",
    "ppo_policy_loss",
    "ppo_rewards",
    "value_loss",
    "whiten",
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
    "ValueModel",
    "GRPOConfig",
    "check_prompt_example",
    "grpo",
    "grpo_task",
    "use_adapter",
    "PPOConfig",
    "PPOModels",
    "PPORoles",
    "ppo",
    "ppo_roles",
    "ppo_task",
    "clipped_value_error",
    "rollout_rewards",
    "Rollout",
    "completions",
    "eos_penalty",
    "generate_rollouts",
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
