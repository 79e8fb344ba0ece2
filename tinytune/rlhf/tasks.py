"""The preference objectives as `tt.train.Task`s, so `tt.train.fit` trains them with everything it has
(precision, accumulation, checkpoints and resume, logs, several processes):

    history = tt.train.fit(rm, pairs, tt.train.TrainConfig(task=tt.rlhf.reward_task(), lr=1e-4, steps=200))
    history = tt.train.fit(policy, pairs, tt.train.TrainConfig(task=tt.rlhf.dpo_task(beta=0.1)))

An example is one `tt.data.load_preferences` record (a prompt, K ranked completions, its pairs); a batch is
`preference_batch` of several, every completion scored once. The reward loss is averaged over rankings
(groups: InstructGPT's choice), DPO's over pairs; both over the whole optimizer step's count.
"""
from __future__ import annotations

import contextlib
import math

import torch

from .. import _check
from ..train.tasks import Task
from .data import preference_batch
from .dpo_step import dpo_batch_loss, reference_logprobs
from .losses import check_dpo_args, grouped_reward_loss

REF_KEY = "ref_logps"  # an example's precomputed reference log-probs, one per completion (DPO)


def check_preference_example(example, index: int, where: str) -> None:
    """Raise ValueError naming `where[index]` unless `example` is a preference example (`load_preferences`)."""
    def bad(why: str):
        raise ValueError(f"{where}[{index}]: {why} (a tt.data.load_preferences example)")

    if not isinstance(example, dict):
        bad(f"expected a dict, got {type(example).__name__}")
    missing = [k for k in ("prompt_ids", "completion_ids", "chosen", "rejected") if k not in example]
    if missing:
        bad(f"missing {missing}; it has {sorted(example)}")
    completions, chosen, rejected = example["completion_ids"], example["chosen"], example["rejected"]
    if not isinstance(completions, list) or len(completions) < 2 or not all(
            isinstance(c, list) and c for c in completions):
        bad("'completion_ids' must be a list of >= 2 non-empty token lists")
    k = len(completions)
    if not isinstance(chosen, list) or not isinstance(rejected, list) or not chosen or len(chosen) != len(rejected):
        bad(f"'chosen' and 'rejected' must be equally long non-empty index lists, got {chosen!r} and {rejected!r}")
    pairs = list(zip(chosen, rejected))
    if any(not (isinstance(i, int) and isinstance(j, int) and 0 <= i < k and 0 <= j < k and i != j)
           for i, j in pairs):
        bad(f"pairs {pairs[:4]} must be two different completion indices in [0, {k})")
    margin = example.get("margin", [None] * len(pairs))
    if not isinstance(margin, list) or len(margin) != len(pairs) or not all(
            m is None or (isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m)) for m in margin):
        bad(f"'margin' must hold one finite number (or None) per pair: {len(pairs)}, got {margin!r}")
    if REF_KEY in example:
        ref = example[REF_KEY]
        if not isinstance(ref, list) or len(ref) != k or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in ref):
            bad(f"{REF_KEY!r} must hold {k} finite reference log-probs (one per completion), got {ref!r}")


def collate_preferences(examples: list[dict], pad_token_id: int, device: str) -> dict:
    """`preference_batch(examples)` on `device`, plus "pair_example" (P,): each pair's example in the batch
    (the reward loss's groups: an example drawn twice into one batch stays two groups), and "ref_logps"
    (N,) when the examples carry precomputed reference log-probs."""
    examples = [{**ex, "margin": ex.get("margin", [None] * len(ex["chosen"])), "group": ex.get("group", e)}
                for e, ex in enumerate(examples)]
    batch = preference_batch(examples, pad_token_id)
    batch["pair_example"] = torch.tensor([e for e, ex in enumerate(examples) for _ in ex["chosen"]])
    if all(REF_KEY in ex for ex in examples):
        batch[REF_KEY] = torch.tensor([v for ex in examples for v in ex[REF_KEY]], dtype=torch.float64)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _groups(batch: dict) -> int:
    return int(batch["pair_example"].max()) + 1


def _pairs(batch: dict) -> int:
    return int(batch["chosen"].numel())


def reward_task(center_coef: float = 0.0) -> Task:
    """A reward model's training objective: `grouped_reward_loss` (Bradley-Terry, with each example's margins)
    averaged over rankings; metrics "accuracy" (ties count half), "margin", "chosen", "rejected" per pair.

    The model is a `RewardModel` (or any module mapping `(input_ids, attention_mask)` to (N,) scores).

    Raises:
        ValueError: a negative or non-numeric `center_coef`.
    """
    center_coef = _check.number(center_coef, "reward_task: center_coef", 0)

    def loss(model, batch, count, module):
        scores = model(batch["input_ids"], batch["attention_mask"])  # (N,)
        if not isinstance(scores, torch.Tensor) or scores.shape != batch["input_ids"].shape[:1]:
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"{type(module).__name__} must return one score per row, "
                             f"({batch['input_ids'].shape[0]},), for the reward task; got {got}")
        c, r = scores[batch["chosen"]], scores[batch["rejected"]]
        mean = grouped_reward_loss(c, r, batch["pair_example"], batch["margin"], center_coef)
        c, r, p = c.detach().double(), r.detach().double(), c.numel()
        metrics = {"accuracy": (float(((c > r).double() + 0.5 * (c == r).double()).sum()), p),
                   "margin": (float((c - r).sum()), p), "chosen": (float(c.sum()), p), "rejected": (float(r.sum()), p)}
        return mean * (_groups(batch) / count), metrics

    return Task(name="reward", check_example=check_preference_example, collate=collate_preferences, count=_groups,
                loss=loss, counts="preference pairs", settings={"center_coef": center_coef},
                shown=("accuracy",))


@contextlib.contextmanager
def eval_mode(module):
    """The reference is computed without dropout, whatever mode training put the model in."""
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")


def dpo_task(beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chunk_size: int | None = None, sft_weight: float = 0.0) -> Task:
    """DPO (or IPO, hinge, SimPO) as a training objective: `dpo_batch_loss` averaged over pairs.

    The reference is the model itself with its adapters disabled, in eval mode and without gradients, once
    per batch; examples carrying "ref_logps" (`precompute_reference`) use those instead. Metrics per pair:
    TRL's "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
    "logps/rejected" (and "sft_nll" with `sft_weight`: see `dpo_batch_loss`).

    Raises:
        ValueError: a bad beta (> 0), loss_type, label_smoothing (in [0, 0.5), sigmoid / simpo only), chunk_size
            or sft_weight (>= 0).
    """
    try:
        check_dpo_args(beta, loss_type, label_smoothing, lengths_given=loss_type in ("ipo", "simpo"))  # (the batch has them)
    except ValueError as err:
        raise ValueError(f"dpo_task: {err}") from None
    _check.integer(chunk_size, "dpo_task: chunk_size", 1, none=True)
    sft_weight = _check.number(sft_weight, "dpo_task: sft_weight", 0)

    def loss(model, batch, count, module):
        ref = batch.get(REF_KEY)
        if ref is None and loss_type != "simpo":
            with eval_mode(module):
                ref = reference_logprobs(module, batch, chunk_size)
        mean, means = dpo_batch_loss(model, batch, beta, loss_type, label_smoothing,
                                     None if ref is None else ref.float(), chunk_size, sft_weight)
        p = _pairs(batch)
        return mean * (p / count), {k: (means[k] * p, p) for k in DPO_METRICS + ("sft_nll",) if k in means}

    return Task(name="dpo", check_example=check_preference_example, collate=collate_preferences, count=_pairs,
                loss=loss, counts="preference pairs",
                settings={"beta": float(beta), "loss_type": loss_type, "label_smoothing": float(label_smoothing),
                          **({"sft_weight": sft_weight} if sft_weight else {})},
                shown=("rewards/accuracies", "rewards/margins"))
