"""One DPO step on a `preference_batch`: completion log-probs under the policy and under the reference,
and `dpo_loss` on the batch's chosen / rejected pairs.

The reference is the policy's own base: the same model with its PEFT method disabled (`adapters_disabled`),
so one copy of the base weights serves both roles. Only completion tokens are scored: the batch's `labels`
are -100 on the prompt and on padding.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..peft import adapter, ia3, lora, prefix, prompt
from ..peft.methods import METHODS
from ..train.losses import IGNORE_INDEX
from .logprobs import token_logprobs
from .losses import dpo_loss

# each method's context under which the model computes exactly its base; selective fine-tuning has none
# (it trains the base weights themselves)
_DISABLED = {m.PEFT_TYPE: m.disabled for m in (lora, ia3, adapter, prompt, prefix)}
_NO_ADAPTER = "DPO's reference is the base model with the adapter disabled; apply a PEFT method first"
_USE_LENGTHS = ("ipo", "simpo")


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block `model` computes its base: every PEFT method applied to it is disabled.

    Args:
        model: a model carrying one or more of LoRA, (IA)^3, bottleneck adapters, prompt or prefix tuning.

    Yields:
        model, with those methods switched off (they are switched back on when the block exits).

    Raises:
        ValueError: no such method is applied (a plain model, or one under selective fine-tuning only).
        RuntimeError: what a method's `disabled` refuses (e.g. LoRA merged into its base weights).
    """
    applied = [m for m in METHODS if m.peft_type in _DISABLED and m.is_applied(model)]
    if not applied:
        raise ValueError(f"{_NO_ADAPTER} (tt.lora.apply, tt.ia3.apply, ...); {type(model).__name__} carries none of "
                         f"{[m.name for m in METHODS if m.peft_type in _DISABLED]}")
    with contextlib.ExitStack() as stack:
        for method in applied:
            stack.enter_context(_DISABLED[method.peft_type](model))
        yield model


def completion_mask(batch: dict) -> torch.Tensor:
    """(N, T-1) bool: entry t is True when token t + 1 of the row is a completion token (the layout of
    `token_logprobs`, whose column t scores token t + 1).

    Raises:
        ValueError: the batch has no (N, T) `labels` of its `input_ids`' shape (not a `preference_batch`).
    """
    labels, ids = batch.get("labels"), batch.get("input_ids")
    if not isinstance(labels, torch.Tensor) or not isinstance(ids, torch.Tensor) or labels.shape != ids.shape:
        what = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"the batch needs 'labels' of input_ids' shape (-100 off the completions), as "
                         f"tt.rlhf.preference_batch gives; got keys {sorted(batch)} and labels {what}")
    return labels[:, 1:] != IGNORE_INDEX


def completion_lengths(batch: dict) -> torch.Tensor:
    """(N,) long: the number of completion tokens of each row (for "ipo" / "simpo").

    Raises:
        ValueError: as `completion_mask`.
    """
    return completion_mask(batch).sum(-1)


def completion_logprobs(model: nn.Module, batch: dict, chunk_size: int | None = None) -> torch.Tensor:
    """Summed log-probs of each row's completion tokens only (prompt and padding excluded), with gradients.

    Args:
        model: a causal LM, as `token_logprobs` takes.
        batch: a `preference_batch` (`input_ids`, `attention_mask`, `labels`).
        chunk_size: rows per chunk of `token_logprobs`' fused path (None: its default).

    Returns:
        (N,) fp32 (fp64 for an fp64 model): `sum_t log p(completion token t | everything before it)`.

    Raises:
        ValueError: a batch without `labels` (see `completion_mask`), or what `token_logprobs` refuses.
    """
    mask = completion_mask(batch)  # (N, T-1)
    lp = token_logprobs(model, batch["input_ids"], batch.get("attention_mask"), chunk_size)  # (N, T-1)
    return (lp * mask).sum(-1)


def reference_logprobs(model: nn.Module, batch: dict, chunk_size: int | None = None) -> torch.Tensor:
    """`completion_logprobs` under the reference: the same model with its adapters disabled, no gradients.

    Args, Returns: as `completion_logprobs` (the result is detached).

    Raises:
        ValueError: the model carries no PEFT method to disable (`adapters_disabled`), or as
            `completion_logprobs`.
    """
    with torch.no_grad(), adapters_disabled(model):
        return completion_logprobs(model, batch, chunk_size)


def _checked_ref(ref, like: torch.Tensor) -> torch.Tensor:
    """`ref` as given when it is an (N,) floating tensor like the policy's log-probs; ValueError otherwise."""
    if not isinstance(ref, torch.Tensor) or ref.shape != like.shape or not ref.is_floating_point():
        what = f"{ref.dtype} {tuple(ref.shape)}" if isinstance(ref, torch.Tensor) else type(ref).__name__
        raise ValueError(f"ref must be the (N,) = {tuple(like.shape)} floating reference_logprobs of this batch, "
                         f"got {what}")
    return ref.detach()


def dpo_batch_loss(model: nn.Module, batch: dict, beta: float = 0.1, loss_type: str = "sigmoid",
                   label_smoothing: float = 0.0, ref: torch.Tensor | None = None,
                   chunk_size: int | None = None, sft_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The DPO loss of one `preference_batch`, with TRL's metrics.

    Args:
        model: the policy: a causal LM carrying a PEFT method (its base is the reference).
        batch: a `preference_batch` (`input_ids`, `attention_mask`, `labels`, `chosen`, `rejected`).
        beta, loss_type, label_smoothing: as `dpo_loss` ("ipo" and "simpo" get the completion lengths).
        ref: (N,) `reference_logprobs(model, batch)` computed beforehand, or None to compute them now
            (unused by "simpo", which is reference-free).
        chunk_size: as `completion_logprobs`.
        sft_weight: adds `sft_weight * NLL`, NLL the mean negative log-prob per chosen completion token of the
            batch (RPO, Pang et al. 2024; TRL's `loss_type=["sigmoid", "sft"]`, `loss_weights=[1, w]`): it keeps
            the chosen completions likely, which plain DPO may lower together with the rejected ones (a model
            that stops ending its answers). 0: off.

    Returns:
        (loss, metrics): a scalar with gradients, and floats "loss", "rewards/chosen", "rewards/rejected",
        "rewards/margins", "rewards/accuracies" (the share of pairs whose chosen reward is higher),
        "logps/chosen", "logps/rejected" (means over the pairs); "loss" includes the SFT term, reported alone
        as "sft_nll" when `sft_weight` is set.

    Raises:
        ValueError: a bad `ref` shape, what `dpo_loss` refuses (beta, loss_type, label_smoothing), or what
            `reference_logprobs` / `completion_logprobs` refuse (no adapter, no labels).
    """
    policy = completion_logprobs(model, batch, chunk_size)  # (N,)
    if loss_type != "simpo":
        ref = reference_logprobs(model, batch, chunk_size) if ref is None else _checked_ref(ref, policy)
    c, r = batch["chosen"], batch["rejected"]  # (P,) row indices
    lengths, n = {}, completion_lengths(batch)
    if loss_type in _USE_LENGTHS:
        lengths = {"chosen_lengths": n[c], "rejected_lengths": n[r]}
    ref_c, ref_r = (None, None) if loss_type == "simpo" else (ref[c], ref[r])
    loss, rew_c, rew_r = dpo_loss(policy[c], policy[r], ref_c, ref_r, beta, loss_type, label_smoothing, **lengths)
    sft = {}
    if _sft_weight(sft_weight):
        nll = -policy[c].sum() / n[c].sum().clamp_min(1)  # per chosen token, as TRL's "sft" loss
        loss, sft = loss + sft_weight * nll, {"sft_nll": nll.item()}
    metrics = {"loss": loss.item(), "rewards/chosen": rew_c.mean().item(), "rewards/rejected": rew_r.mean().item(),
               "rewards/margins": (rew_c - rew_r).mean().item(),
               "rewards/accuracies": (rew_c > rew_r).float().mean().item(),
               "logps/chosen": policy[c].detach().mean().item(), "logps/rejected": policy[r].detach().mean().item(),
               **sft}
    return loss, metrics


def _sft_weight(weight) -> float:
    """`weight` when it is a finite number >= 0; ValueError naming it otherwise."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
        raise ValueError(f"sft_weight must be a finite number >= 0, got {weight!r}")
    return float(weight)
