"""The two offline trainers: a reward model (`train_reward_model`) and DPO (`dpo`), both `tt.train.fit`
under a preference `Task` (see `tasks.py`), configured by `TrainConfig`'s fields plus their own.

    history = tt.rlhf.train_reward_model(rm, pairs, tt.rlhf.RewardConfig(lr=1e-4, steps=200), eval_pairs=held_out)
    history = tt.rlhf.dpo(policy, pairs, tt.rlhf.DPOConfig(beta=0.1, lr=5e-5, steps=200), eval_pairs=held_out)
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn

from .. import _check
from ..train.collate import check_data
from ..train.config import TrainConfig
from ..train.loop import History, fit
from ..train.precision import Precision
from ..train.tasks import Task
from .dpo_step import adapters_disabled, completion_logprobs, reference_logprobs
from .reward_model import RewardModel, pairwise_metrics
from .tasks import REF_KEY, collate_preferences, dpo_task, reward_task, eval_mode


def _own_task(cfg: TrainConfig, name: str, build) -> Task:
    """The config's task, built from its own fields; a task set by hand must be this trainer's."""
    given = cfg.task
    if not (given == "causal_lm" or (isinstance(given, Task) and given.name == name)):
        shown = given.name if isinstance(given, Task) else given
        raise ValueError(f"{type(cfg).__name__}.task is set from its own fields (a {name!r} task); got "
                         f"task={shown!r}: leave it unset")
    return build()


@dataclass
class RewardConfig(TrainConfig):
    """`TrainConfig` for a reward model, with the reward objective's own field.

    Args:
        center_coef: weight of `mean((r_c + r_r)^2)`, which keeps rewards centred on 0 (TRL's
            `center_rewards_coefficient`; 0 = off).
        (every `TrainConfig` field: lr, steps, batch_size (preference examples per micro-batch), ...)

    `task` is set from `center_coef` (`reward_task`); `tt.train.fit(rm, pairs, RewardConfig(...))` works too.
    """

    center_coef: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.task = _own_task(self, "reward", lambda: reward_task(self.center_coef))


@dataclass
class DPOConfig(TrainConfig):
    """`TrainConfig` for DPO and its variants, with TRL's names for the objective's own fields.

    Args:
        beta: the KL weight (DPO's beta; SimPO's reward scale).
        loss_type: "sigmoid" (DPO), "ipo", "hinge" or "simpo" (reference-free).
        label_smoothing: conservative DPO's flip probability, in [0, 0.5) (sigmoid and simpo).
        precompute_ref: compute every example's reference log-probs once before training (one pass over
            the data, no reference forward per step) instead of once per batch.
        chunk_size: rows per chunk of the fused log-prob path (None: its default).
        sft_weight: weight of an added NLL on the chosen completions (RPO; TRL's `loss_type=["sigmoid", "sft"]`
            with `loss_weights=[1, sft_weight]`), which keeps them likely; 0: plain DPO.
        lr: as `TrainConfig.lr`; the default here is 5e-5 (LoRA DPO: much lower than supervised tuning).
        (every other `TrainConfig` field: steps, batch_size (preference examples per micro-batch), ...)

    `task` is set from these fields (`dpo_task`); `tt.train.fit(policy, pairs, DPOConfig(...))` trains with
    the per-batch reference (precompute_ref is applied by `tt.rlhf.dpo`).
    """

    lr: float = 5e-5
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    precompute_ref: bool = False
    chunk_size: int | None = None
    sft_weight: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        _check.boolean(self.precompute_ref, "DPOConfig.precompute_ref")
        self.task = _own_task(self, "dpo", lambda: dpo_task(self.beta, self.loss_type, self.label_smoothing,
                                                             self.chunk_size, self.sft_weight))


def _batches(pairs, cfg: TrainConfig):
    for start in range(0, len(pairs), cfg.batch_size):
        chunk = [pairs[i] for i in range(start, min(start + cfg.batch_size, len(pairs)))]
        yield chunk, collate_preferences(chunk, cfg.pad_token_id, cfg.device)


@torch.no_grad()
def precompute_reference(model: nn.Module, pairs, cfg: TrainConfig) -> list[dict]:
    """Copies of `pairs` each with "ref_logps": its completions' summed log-probs under the reference
    (`model` with its adapters disabled, in eval mode), computed in batches of `cfg.batch_size` on `cfg.device`
    under `cfg.dtype`. The examples given are not changed.

    Raises:
        ValueError: a malformed example (named), or a model without a PEFT method to disable.
    """
    check_data(pairs, "pairs", dpo_task())
    precision, out = Precision(cfg.dtype, cfg.device), []
    model.to(cfg.device)
    with eval_mode(model), precision.autocast():
        for chunk, batch in _batches(pairs, cfg):
            ref = reference_logprobs(model, batch, getattr(cfg, "chunk_size", None)).double().cpu().tolist()
            for ex in chunk:
                k = len(ex["completion_ids"])
                out.append({**ex, REF_KEY: ref[:k]})
                ref = ref[k:]
    return out


def dpo(model: nn.Module, pairs, cfg: DPOConfig | None = None, eval_pairs=None, **fit_kwargs) -> History:
    """Tune the policy `model` (a causal LM carrying a PEFT method) on preference pairs with DPO.

    The reference is `model`'s own base (its adapters disabled): one copy of the base weights. Everything
    training is `tt.train.fit`'s (precision, accumulation, checkpoints, resume, logs, several processes);
    each step logs loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies,
    logps/chosen and logps/rejected (`History.metrics`, `metrics.jsonl`), evaluations the same on
    `eval_pairs` (`History.eval_metrics`).

    Args:
        model: the policy, e.g. a `CausalLM` after `tt.lora.apply`.
        pairs: preference examples (`tt.data.load_preferences`).
        cfg: a `DPOConfig` (default: `DPOConfig()`).
        eval_pairs: held-out preference examples, evaluated every `cfg.eval_every` steps and at the end.
        **fit_kwargs: `resume_from`, `callbacks`, `stream`, as `fit`.

    Returns:
        fit's `History`.

    Raises:
        TypeError: `cfg` is not a `DPOConfig`.
        ValueError: a malformed example (named), a model without a PEFT method, and what `fit` refuses.
    """
    cfg = DPOConfig() if cfg is None else cfg
    if not isinstance(cfg, DPOConfig):
        raise TypeError(f"tt.rlhf.dpo: cfg must be a tt.rlhf.DPOConfig, got {type(cfg).__name__}")
    check_data(pairs, "pairs", cfg.task)
    if eval_pairs is not None:
        check_data(eval_pairs, "eval_pairs", cfg.task)
    with adapters_disabled(model):  # refuses a model without a PEFT method before any work
        pass
    if cfg.precompute_ref and cfg.loss_type != "simpo":
        pairs = precompute_reference(model, pairs, cfg)
        eval_pairs = None if eval_pairs is None else precompute_reference(model, eval_pairs, cfg)
    return fit(model, pairs, cfg, eval_data=eval_pairs, **fit_kwargs)


def train_reward_model(rm: RewardModel, pairs, cfg: RewardConfig | None = None, eval_pairs=None,
                       calibrate: bool = True, **fit_kwargs) -> History:
    """Train a reward model on preference examples (`tt.train.fit` with `reward_task`), then set its
    `reward_mean` / `reward_std` from the scores of `eval_pairs`' completions (the training pairs' without
    them), so that later stages can normalise rewards.

    Args:
        rm: a `RewardModel` (with a PEFT method on its body, or its selected parameters trainable).
        pairs, eval_pairs: preference examples (`tt.data.load_preferences`); eval_pairs are evaluated every
            `cfg.eval_every` steps and at the end ("accuracy", "margin", ... in `History.eval_metrics`).
        cfg: a `RewardConfig` (default: `RewardConfig()`).
        calibrate: set the reward statistics after training.
        **fit_kwargs: `resume_from`, `callbacks`, `stream`, as `fit`.

    Returns:
        fit's `History`.

    Raises:
        TypeError: `rm` is not a `RewardModel`, or `cfg` not a `RewardConfig`.
        ValueError: a malformed example (named), and what `fit` refuses.
    """
    cfg = RewardConfig() if cfg is None else cfg
    if not isinstance(rm, RewardModel):
        raise TypeError(f"train_reward_model expects a tt.rlhf.RewardModel, got {type(rm).__name__}")
    if not isinstance(cfg, RewardConfig):
        raise TypeError(f"train_reward_model: cfg must be a tt.rlhf.RewardConfig, got {type(cfg).__name__}")
    history = fit(rm, pairs, cfg, eval_data=eval_pairs, **fit_kwargs)
    if calibrate:
        scores = score_completions(rm, eval_pairs if eval_pairs is not None else pairs, cfg)
        rm.calibrate(scores)
    return history


@torch.no_grad()
def score_completions(rm: nn.Module, pairs, cfg: TrainConfig) -> torch.Tensor:
    """(N,) float32: the reward of every completion of `pairs` (prompt + completion), in eval mode, in
    batches of `cfg.batch_size` examples on `cfg.device` (the model is moved there)."""
    check_data(pairs, "pairs", reward_task())
    out = []
    rm.to(cfg.device)
    with eval_mode(rm), Precision(cfg.dtype, cfg.device).autocast():
        for _, batch in _batches(pairs, cfg):
            out.append(rm(batch["input_ids"], batch["attention_mask"]).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def evaluate_reward_model(rm: nn.Module, pairs, cfg: TrainConfig | None = None) -> dict[str, float]:
    """`pairwise_metrics` over every pair of `pairs` (accuracy with ties as half, mean margin, reward
    mean / std, chosen / rejected means), in eval mode; batches as `cfg` (default `TrainConfig()`) says,
    on its device (the model is moved there)."""
    cfg = cfg or TrainConfig()
    check_data(pairs, "pairs", reward_task())
    chosen, rejected = [], []
    rm.to(cfg.device)
    with eval_mode(rm), Precision(cfg.dtype, cfg.device).autocast():
        for _, batch in _batches(pairs, cfg):
            scores = rm(batch["input_ids"], batch["attention_mask"]).float().cpu()
            chosen.append(scores[batch["chosen"].cpu()])
            rejected.append(scores[batch["rejected"].cpu()])
    return pairwise_metrics(torch.cat(chosen), torch.cat(rejected))


@torch.no_grad()
def preference_accuracy(model: nn.Module, pairs, cfg: TrainConfig | None = None, beta: float = 1.0) -> dict:
    """How often a policy ranks the chosen completion above the rejected one by its own summed log-prob
    relative to the reference (DPO's implicit reward `beta * (log pi - log pi_ref)`), over all pairs.

    Batches of `cfg.batch_size` examples on `cfg.device` (the model is moved there), in eval mode.

    Returns:
        {"accuracy" (ties half), "margin" (mean implicit-reward margin), "logp_margin" (mean of
        log pi(chosen) - log pi(rejected), no reference)}.

    Raises:
        ValueError: a malformed example (named), or a model without a PEFT method to disable.
    """
    cfg = cfg or TrainConfig()
    check_data(pairs, "pairs", dpo_task())
    diffs, raw = [], []
    model.to(cfg.device)
    with eval_mode(model), Precision(cfg.dtype, cfg.device).autocast():
        for _, batch in _batches(pairs, cfg):
            policy = completion_logprobs(model, batch).double()
            ref = reference_logprobs(model, batch).double()
            c, r = batch["chosen"], batch["rejected"]
            diffs.append((beta * ((policy[c] - ref[c]) - (policy[r] - ref[r]))).cpu())
            raw.append((policy[c] - policy[r]).cpu())
    d, raw = torch.cat(diffs), torch.cat(raw)
    accuracy = ((d > 0).double() + 0.5 * (d == 0).double()).mean().item()
    return {"accuracy": accuracy, "margin": d.mean().item(), "logp_margin": raw.mean().item()}
