"""`PPOConfig`: `TrainConfig`'s training fields, `tt.generate`'s sampling names and PPO's own knobs.

Defaults and their sources (TRL's `PPOConfig` up to v0.20, which follows Ziegler et al. 2019 and the
InstructGPT / "N implementation details of RLHF with PPO" recipes; torchtune's PPO recipe agrees):

    ppo_epochs 4, num_mini_batches 1        TRL num_ppo_epochs / num_mini_batches
    kl_coef 0.05, kl_estimator "k1"         TRL kl_coef / kl_estimator
    kl_target None, kl_horizon 10000        adaptive controller off (Ziegler et al.: target 6, horizon 10000)
    gamma 1.0, lam 0.95                     TRL gamma / lam
    cliprange 0.2, cliprange_value 0.2      TRL cliprange / cliprange_value (Schulman et al. 2017)
    vf_coef 0.1                             TRL vf_coef
    whiten_rewards False                    TRL whiten_rewards
    missing_eos_penalty None                TRL missing_eos_penalty
    temperature 1.0                         (TRL 0.7): 1.0 samples the distribution the ratio and KL are
                                            computed on; lower it knowingly
    lr 1e-5                                 (TRL 3e-6 is for full fine-tuning; LoRA adapters move less per step)
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import _check
from ..train.config import TrainConfig
from .config_checks import check_sampling

PPO_KL_ESTIMATORS = ("k1", "k3")


@dataclass
class PPOConfig(TrainConfig):
    """`TrainConfig` for PPO (see the module docstring for the defaults' sources).

    `batch_size` counts prompts (one completion each); a step samples batch_size * grad_accum completions
    (per process), then takes `ppo_epochs` passes over them, each split into `num_mini_batches` updates
    (every micro-batch of prompts contributes rows to every mini-batch). The learning-rate schedule and
    `steps` count rollout batches.

    Args:
        max_new_tokens, temperature, top_k, top_p: the sampling of `tt.generate`.
        stop_token_ids: ids that end a completion (None: the model's EOS ids).
        ppo_epochs: passes over each rollout batch (4). num_mini_batches: updates per pass (1; <= batch_size).
        kl_coef: the initial weight of the per-token KL penalty (0.05). kl_estimator: "k1" (TRL's) or "k3".
        kl_target, kl_horizon: with a target, the adaptive controller (`KLController`) steers the KL to it.
        gamma, lam: GAE's discount and lambda (1.0, 0.95).
        cliprange, cliprange_value: the policy ratio's and the value's clip ranges (0.2 each).
        vf_coef: the value loss's weight (0.1).
        whiten_rewards: whiten the per-token rewards over the batch before GAE (False).
        missing_eos_penalty: subtracted from the score of a completion that never reached a stop token.
        normalize_reward: score a `RewardModel` through its stored statistics (`RewardModel.normalize`).
        reward_clip: clip scores to [-reward_clip, reward_clip] (None: no clip).
        reward_weights: one weight per reward function (None: all 1.0).
    """

    lr: float = 1e-5
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    stop_token_ids: list[int] | None = None
    ppo_epochs: int = 4
    num_mini_batches: int = 1
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    kl_target: float | None = None
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = None
    normalize_reward: bool = True
    reward_clip: float | None = None
    reward_weights: list[float] | None = None

    def __post_init__(self):
        super().__post_init__()
        check_sampling(self, "PPOConfig")
        for name, low in (("ppo_epochs", 1), ("num_mini_batches", 1), ("kl_horizon", 1)):
            _check.integer(getattr(self, name), f"PPOConfig.{name}", low)
        if self.num_mini_batches > self.batch_size:
            raise ValueError(f"PPOConfig.num_mini_batches={self.num_mini_batches} exceeds batch_size="
                             f"{self.batch_size}: every mini-batch needs a row of each micro-batch")
        for name in ("kl_coef", "vf_coef"):
            _check.number(getattr(self, name), f"PPOConfig.{name}", 0)
        for name in ("cliprange", "cliprange_value"):
            _check.number(getattr(self, name), f"PPOConfig.{name}", 0, low_open=True)
        for name in ("kl_target", "reward_clip"):
            _check.number(getattr(self, name), f"PPOConfig.{name}", 0, low_open=True, none=True)
        _check.number(self.missing_eos_penalty, "PPOConfig.missing_eos_penalty", 0, none=True)
        for name in ("gamma", "lam"):
            _check.number(getattr(self, name), f"PPOConfig.{name}", 0, 1)
        for name in ("whiten_rewards", "normalize_reward"):
            _check.boolean(getattr(self, name), f"PPOConfig.{name}")
        if self.kl_estimator not in PPO_KL_ESTIMATORS:
            raise ValueError(f"PPOConfig.kl_estimator={self.kl_estimator!r} is not one of {list(PPO_KL_ESTIMATORS)}")
