"""A reward model: a decoder body and a scalar head `score` read at each row's last real token.

    rm = tt.rlhf.RewardModel(tt.models.build("llama-tiny"))
    tt.lora.apply(rm, tt.lora.LoraConfig(targets="all-linear"))   # LoRA on the body; `score` trains whole
    scores = rm(input_ids, attention_mask)                          # (B,) float32
    tt.rlhf.save_reward_model(rm, "rm")                            # adapter + head + reward statistics

The body and head are those of `tinytune.models.SequenceClassifier` with one label (parameter names
`model.layers...`, `score.weight`, as Hugging Face's `LlamaForSequenceClassification` with num_labels=1), so
PEFT's SEQ_CLS conventions hold: any PEFT method keeps `score` trainable and `save_adapter` saves it as a
module to save. `reward_mean` / `reward_std` are persistent buffers set by `calibrate`; later stages (PPO)
normalise rewards with them (`normalize`).
"""
from __future__ import annotations

import contextlib

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn

from .. import _check
from .._files import parse_json
from .._manifest import MANIFEST, IntegrityError, read_verified
from .._transaction import directory_transaction
from ..models.heads import _DecoderHead, _new_linear, last_hidden
from ..models.transformer import CausalLM
from ..peft import io as adapter_io
from .roles import use_adapter

STATS_NAME = "reward_model.json"
FORMAT = "tinytune-reward-model"
VERSION = 1


class RewardModel(_DecoderHead):
    """A scalar reward on the hidden state of each row's last real token (found from `attention_mask`, so
    left and right padding give the same scores, and a pad id equal to EOS is harmless: ids never decide).

    Args:
        backbone: a `CausalLM`; its body is shared (not copied) and its `lm_head` is not used.
        head: the scalar head, an `nn.Linear(hidden_size, 1)`; None: a new bias-free one, N(0, 0.02) as HF's.
        adapter_name: the LoRA adapter of `backbone` this reward model scores with when the backbone is shared
            with a policy (PPO switches to it); None: the backbone is used as it is.

    Forward:
        input_ids (B, T), attention_mask (B, T) or None -> scores (B,) in float32.

    Raises:
        TypeError: `backbone` is not a `CausalLM`, or `head` is not an `nn.Linear`.
        ValueError: a head whose shape is not (1, hidden_size).
    """

    peft_task_type = "SEQ_CLS"
    peft_modules_to_save = ("score",)  # trained whole with any PEFT method, saved with the adapter

    def __init__(self, backbone: CausalLM, head: nn.Linear | None = None, adapter_name: str | None = None):
        super().__init__(backbone, "RewardModel")
        self.adapter_name = adapter_name
        if head is None:
            head = _new_linear(backbone, 1, bias=False, what="RewardModel")
        elif not isinstance(head, nn.Linear):
            raise TypeError(f"RewardModel: head must be an nn.Linear(hidden_size, 1), got {type(head).__name__}")
        elif (head.in_features, head.out_features) != (self.config.hidden_size, 1):
            raise ValueError(f"RewardModel: head must map hidden_size={self.config.hidden_size} to 1 score, got "
                             f"nn.Linear({head.in_features}, {head.out_features})")
        self.score = head
        self.register_buffer("reward_mean", torch.zeros((), dtype=torch.float32))
        self.register_buffer("reward_std", torch.ones((), dtype=torch.float32))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_methods()
        return self.score(last_hidden(self.decoder, input_ids, attention_mask)).squeeze(-1).float()  # (B,)

    @torch.no_grad()
    def calibrate(self, scores: torch.Tensor) -> tuple[float, float]:
        """Set `reward_mean` / `reward_std` from scores of a reference set (e.g. held-out completions).

        Args:
            scores: a floating tensor of at least 2 finite scores (any shape; flattened).

        Returns:
            (mean, std) as set.

        Raises:
            ValueError: fewer than 2 scores, a non-floating tensor, a non-finite score, or std 0.
        """
        if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or scores.numel() < 2:
            raise ValueError(f"calibrate: scores must be a floating tensor of >= 2 scores, got {_describe(scores)}")
        flat = scores.detach().reshape(-1).double()
        if not torch.isfinite(flat).all():
            raise ValueError(f"calibrate: scores hold {int((~torch.isfinite(flat)).sum())} non-finite values")
        mean, std = flat.mean().item(), flat.std().item()
        if not std > 0:
            raise ValueError(f"calibrate: the {flat.numel()} scores are all equal ({mean}); std would be 0")
        self.set_statistics(mean, std)
        return mean, std

    @torch.no_grad()
    def set_statistics(self, mean: float, std: float) -> None:
        """Set `reward_mean` and `reward_std` directly (finite; std > 0). Raises ValueError naming a bad value."""
        if not math.isfinite(mean) or not (math.isfinite(std) and std > 0):
            raise ValueError(f"reward statistics must be finite with std > 0, got mean={mean!r}, std={std!r}")
        self.reward_mean.fill_(mean)
        self.reward_std.fill_(std)

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """`(scores - reward_mean) / reward_std`: rewards on the scale `calibrate` measured."""
        return (scores - self.reward_mean) / self.reward_std


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def pairwise_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, float]:
    """How well scores order preference pairs.

    Args:
        r_chosen, r_rejected: (P,) scores of the preferred and the other completion of each pair.

    Returns:
        {"accuracy": fraction of pairs with r_chosen > r_rejected (a tie counts half), "margin": mean of
        r_chosen - r_rejected, "reward_mean" / "reward_std": over all 2P scores, "chosen_mean",
        "rejected_mean"}, as Python floats.

    Raises:
        ValueError: not two floating (P,) tensors of one shape with P >= 1.
    """
    for name, x in (("r_chosen", r_chosen), ("r_rejected", r_rejected)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 1 or x.numel() == 0:
            raise ValueError(f"pairwise_metrics: {name} must be a non-empty floating (P,) tensor, got {_describe(x)}")
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"pairwise_metrics: r_chosen {tuple(r_chosen.shape)} and r_rejected "
                         f"{tuple(r_rejected.shape)} differ in shape")
    c, r = r_chosen.detach().double(), r_rejected.detach().double()
    both = torch.cat([c, r])
    return {"accuracy": ((c > r).double() + 0.5 * (c == r).double()).mean().item(),
            "margin": (c - r).mean().item(),
            "reward_mean": both.mean().item(),
            "reward_std": both.std(unbiased=False).item(),
            "chosen_mean": c.mean().item(),
            "rejected_mean": r.mean().item()}


def save_reward_model(rm: RewardModel, path: str | os.PathLike) -> Path:
    """Write `rm` to the directory `path` in one transaction: its adapter in PEFT's layout
    (`adapter_config.json`, `adapter_model.safetensors`, the head as the module to save `score`) and
    `reward_model.json` (format, version, hidden_size, reward_mean, reward_std). Returns the path.

    Raises:
        TypeError: `rm` is not a `RewardModel`.
        ValueError: as `tt.save_adapter` (e.g. `rm` carries no PEFT method).
        SaveError: writing failed (the previous save at `path` is intact).
    """
    if not isinstance(rm, RewardModel):
        raise TypeError(f"save_reward_model expects a RewardModel, got {type(rm).__name__}")
    stats = {"format": FORMAT, "version": VERSION, "hidden_size": rm.config.hidden_size,
             "reward_mean": rm.reward_mean.item(), "reward_std": rm.reward_std.item()}
    path = Path(path)
    with directory_transaction(path, owned=(*adapter_io.OWNED, STATS_NAME), what="save_reward_model") as staging:
        # a reward model on a shared base saves its own adapter, whichever is active
        with use_adapter(rm.decoder, rm.adapter_name) if rm.adapter_name is not None else contextlib.nullcontext():
            adapter_io.write_adapter_files(rm, staging)
        (staging / STATS_NAME).write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return path


def _read_stats(path: Path, hidden_size: int) -> dict:
    """reward_model.json of `path`, verified against the manifest, typed, and checked against the backbone."""
    if not (path / STATS_NAME).is_file():
        raise FileNotFoundError(f"load_reward_model: {path / STATS_NAME} not found (expected a directory written "
                                "by save_reward_model)")
    if not (path / MANIFEST).is_file():  # our own format: always written with one, so never read without it
        raise IntegrityError(f"load_reward_model: {path / MANIFEST} is missing, so {path} cannot be verified")
    data = read_verified(path, [STATS_NAME], "load_reward_model")[STATS_NAME]
    stats = _check.mapping(parse_json(data, path / STATS_NAME, "load_reward_model"), f"load_reward_model: {path}")
    if stats.get("format") != FORMAT or stats.get("version") != VERSION:
        raise ValueError(f"load_reward_model: {path / STATS_NAME} has format={stats.get('format')!r} "
                         f"version={stats.get('version')!r}; this loader reads {FORMAT!r} version {VERSION}")
    for key in ("hidden_size", "reward_mean", "reward_std"):
        value = stats.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"load_reward_model: {path / STATS_NAME} field {key!r} must be a number, got {value!r}")
    if stats["hidden_size"] != hidden_size:
        raise ValueError(f"load_reward_model: the head in {path} reads hidden_size={stats['hidden_size']}, but the "
                         f"backbone's hidden_size is {hidden_size}: load it onto the backbone it was trained on")
    return stats


def load_reward_model(backbone: CausalLM, path: str | os.PathLike, adapter_name: str | None = None) -> RewardModel:
    """A `RewardModel` on `backbone` with the adapter, head and statistics `save_reward_model` wrote to `path`.

    With `adapter_name` the reward adapter is added to `backbone` under that name beside the adapters it has
    (inactive: a policy's adapter stays the active one), so a policy, its value model and this reward model
    share one frozen base (PPO, docs/rlhf.md); the reward model records the name and scores with it.

    Every file is checked against the directory's manifest before it is used; the head's size is checked
    against `backbone` before anything is applied (and again, per tensor, by `tt.load_adapter`).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a damaged file (`IntegrityError`, naming it), another format or version, a head for
            another hidden size (named), or anything `tt.load_adapter` refuses.
    """
    path = Path(path)
    rm = RewardModel(backbone, adapter_name=adapter_name)
    stats = _read_stats(path, rm.config.hidden_size)
    adapter_io.load_adapter(rm, path, adapter_name=adapter_name)
    rm.set_statistics(float(stats["reward_mean"]), float(stats["reward_std"]))
    return rm
