"""`TrainConfig`: every knob of `fit` in one flat dataclass, validated on construction."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import _check
from ..seeding import MAX_SEED

if TYPE_CHECKING:
    from .tasks import Task

DTYPES = ("fp32", "bf16", "fp16")
SCHEDULES = ("constant", "linear", "cosine")
DEVICES = ("cpu", "cuda")
PROGRESS = ("auto", "bar", "lines", "none")
REPORTERS = ("tensorboard", "wandb")  # (`loggers.py`)
TASKS = ("causal_lm", "classification", "token_classification")  # the built-in losses (`losses.py`, `tasks.py`)


def _positive_int(name: str, value, allow_zero: bool = False, allow_none: bool = False) -> None:
    low = 0 if allow_zero else 1
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = f"{'None or ' if allow_none else ''}an int >= {low}"
        raise _check.FieldError(f"TrainConfig.{name} must be {what}, got {value!r} ({type(value).__name__})")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"TrainConfig.{name}={value!r} is not one of {list(choices)}")


@dataclass
class TrainConfig:
    """What `tt.train.fit` does: optimiser, schedule, precision, batching, checkpoints and logs.

    The effective batch of one optimizer step is `batch_size * grad_accum` examples.

    Args:
        lr: peak learning rate of AdamW.
        steps: number of optimizer steps to run.
        batch_size: examples per forward pass (micro-batch).
        grad_accum: micro-batches accumulated into one optimizer step.
        dtype: compute precision: "fp32", "bf16" (autocast, CPU and CUDA) or "fp16" (autocast with a
            gradient scaler, CUDA only).
        grad_checkpointing: recompute activations per block in backward (`model.set_gradient_checkpointing`).
        out_dir: where checkpoints, `metrics.jsonl` and `loss.png` go; None writes nothing.
        weight_decay: AdamW decoupled weight decay for matrices (never for biases, norms, 1-D params).
        betas, eps: AdamW constants.
        schedule: "constant", "linear" (to 0) or "cosine" (to 0) after `warmup_steps` of linear warmup.
        warmup_steps: optimizer steps of linear warmup from lr / warmup_steps to lr.
        max_grad_norm: clip the global gradient norm to this value; None: no clipping.
        eval_every: evaluate `eval_data` every this many steps (0: only at the end).
        save_every: write a checkpoint every this many steps (0: only at the end); needs `out_dir`.
        log_every: print a progress line (in "lines" mode) and report to the trackers every this many steps;
            also the window of the smoothed loss shown (the mean of the last `log_every` step losses).
        progress: "auto" (a tqdm bar on a terminal or in a notebook, lines otherwise: logs, CI, a
            `stream=` that is no terminal), "bar", "lines" (one plain line every `log_every` steps) or "none".
        report_to: experiment trackers: "tensorboard" and/or "wandb" (a name, or a tuple/list of names);
            "none" or () reports nowhere. Their packages must be installed (`pip install tensorboard` /
            `pip install wandb`); `fit` checks that before it changes anything.
        logging_dir: TensorBoard's directory; None: `out_dir/runs`.
        run_name: the W&B run's name; None: the name of `out_dir`.
        wandb_project: the W&B project.
        seed: an int in [0, 2**32 - 1]: `fit` calls `tt.seed_everything(seed + rank)` (torch CPU and CUDA,
            python `random`, numpy) at the start of a fresh run, and it fixes the shuffle order. Adapter
            weights are drawn when the method is applied, before `fit`: call `tt.seed_everything` then too.
        early_stopping_patience: stop after this many evaluations without a lower eval loss; None: never.
        max_bad_steps: stop after this many consecutive steps with a non-finite loss or gradient norm.
        shuffle: shuffle the training examples every epoch.
        base_dtype: None keeps the frozen parameters as they are; "bf16" holds them in bfloat16.
        device: "cpu" or "cuda"; the model is moved there.
        resume: a checkpoint directory or an `out_dir` to resume from (its latest checkpoint), or True
            for "the latest checkpoint in `out_dir` if there is one".
        pad_token_id: the id written into padded `input_ids` positions (they are masked anyway).
        task: the loss: "causal_lm" (next-token cross-entropy over `labels`), "classification"
            (cross-entropy of (B, num_labels) logits against each example's int `label`) or
            "token_classification" (cross-entropy of (B, T, num_labels) logits against `labels`, no shift);
            or a `tt.train.Task` (any objective on the same loop: `tt.rlhf.reward_task()`, `tt.rlhf.dpo_task()`).
        loraplus_lr_ratio: LoRA+ (Hayou et al., 2024): the LoRA B factors (`lora_B`,
            `lora_embedding_B`) train at `lr * loraplus_lr_ratio`, every other parameter at `lr`
            (the schedule scales both); None: one learning rate. Needs a model with LoRA layers.
        keep_checkpoints: how many of the newest training checkpoints to keep under
            `out_dir/checkpoints` (older ones are removed after each save); None keeps them all.

    Raises:
        ValueError: naming the field, for any value of the wrong type (`_check.FieldError`, also a
            TypeError), out of range or not among the choices.
    """

    lr: float = 2e-4
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    dtype: str = "fp32"
    grad_checkpointing: bool = False
    out_dir: str | Path | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 10
    seed: int = 0
    early_stopping_patience: int | None = None
    max_bad_steps: int = 5
    shuffle: bool = True
    base_dtype: str | None = None
    device: str = "cpu"
    resume: str | Path | bool | None = None
    pad_token_id: int = 0
    task: str | Task = "causal_lm"
    loraplus_lr_ratio: float | None = None
    keep_checkpoints: int | None = 3
    progress: str = "auto"
    report_to: str | tuple[str, ...] = ()
    logging_dir: str | Path | None = None
    run_name: str | None = None
    wandb_project: str = "tinytune"

    def __post_init__(self):
        self._check_numbers()
        self._check_choices()
        self._check_flags_and_paths()
        if self.out_dir is not None:
            self.out_dir = Path(self.out_dir)
        if self.logging_dir is not None:
            self.logging_dir = Path(self.logging_dir)
        self._check_reporting()
        if self.resume is True and self.out_dir is None:
            raise ValueError("TrainConfig.resume=True resumes from out_dir, but out_dir is None")

    def _check_numbers(self) -> None:
        _check.number(self.lr, "TrainConfig.lr", 0, low_open=True)
        for name in ("steps", "batch_size", "grad_accum", "log_every", "max_bad_steps"):
            _positive_int(name, getattr(self, name))
        for name in ("warmup_steps", "eval_every", "save_every", "seed", "pad_token_id"):
            _positive_int(name, getattr(self, name), allow_zero=True)
        if self.seed > MAX_SEED:  # >= 0 was checked above
            raise _check.FieldError(f"TrainConfig.seed must be an int in [0, 2**32 - 1] = [0, {MAX_SEED}] "
                                    f"(numpy's seed range), got {self.seed!r}")
        for name in ("early_stopping_patience", "keep_checkpoints"):
            _positive_int(name, getattr(self, name), allow_none=True)
        betas = self.betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise _check.FieldError(f"TrainConfig.betas must be two numbers in [0, 1), got {betas!r} "
                                    f"({type(betas).__name__})")
        self.betas = tuple(_check.number(b, f"TrainConfig.betas[{i}]", 0, 1, high_open=True)
                           for i, b in enumerate(betas))
        _check.number(self.eps, "TrainConfig.eps", 0, low_open=True)
        _check.optional(_check.number, self.max_grad_norm, "TrainConfig.max_grad_norm", 0, low_open=True)
        ratio = self.loraplus_lr_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not math.isfinite(ratio) or ratio <= 0):
            raise ValueError(f"TrainConfig.loraplus_lr_ratio must be None or a finite number > 0, got {ratio!r}")
        self._check_weight_decay()

    def _check_weight_decay(self) -> None:
        """AdamW's decoupled decay multiplies every decayed weight by 1 - lr * weight_decay each step
        (lr of the parameter's group: the LoRA+ B factors run at lr * loraplus_lr_ratio), so the
        bound that matters is on that product: at 1 or above the first step zeroes or flips them."""
        decay = _check.number(self.weight_decay, "TrainConfig.weight_decay", 0)
        peak = self.lr * max(1.0, self.loraplus_lr_ratio or 1.0)
        if decay * peak >= 1:
            raise ValueError(f"TrainConfig.weight_decay={self.weight_decay!r} with a peak learning rate of {peak!r} "
                             f"gives lr * weight_decay = {decay * peak:g} >= 1: each AdamW step would multiply the "
                             "weights by 1 - lr * weight_decay <= 0; use a weight_decay below 1 / lr")

    def _check_flags_and_paths(self) -> None:
        for name in ("grad_checkpointing", "shuffle"):
            _check.boolean(getattr(self, name), f"TrainConfig.{name}")
        _check.optional(_check.path, self.out_dir, "TrainConfig.out_dir")
        _check.optional(_check.path, self.logging_dir, "TrainConfig.logging_dir")
        resume = self.resume
        if not (resume is None or isinstance(resume, (bool, os.PathLike)) or (isinstance(resume, str) and resume)):
            raise _check.FieldError(f"TrainConfig.resume must be True, False, None or a path (a non-empty string or "
                                    f"os.PathLike), got {resume!r} ({type(resume).__name__})")

    def _check_reporting(self) -> None:
        report_to = self.report_to
        if isinstance(report_to, str):
            report_to = () if report_to == "none" else (report_to,)
        if not isinstance(report_to, (tuple, list)):
            raise _check.FieldError(f"TrainConfig.report_to must be a name or a tuple/list of names among "
                                    f"{list(REPORTERS)} (or 'none'), got {report_to!r} ({type(report_to).__name__})")
        for name in report_to:
            _choice("report_to", name, REPORTERS)
        self.report_to = tuple(dict.fromkeys(report_to))  # (in order, each once)
        _choice("progress", self.progress, PROGRESS)
        for name in ("run_name", "wandb_project"):
            value = getattr(self, name)
            if not (isinstance(value, str) and value) and not (name == "run_name" and value is None):
                raise _check.FieldError(f"TrainConfig.{name} must be a non-empty string"
                                        f"{' or None' if name == 'run_name' else ''}, got {value!r}")
        if "tensorboard" in self.report_to and self.out_dir is None and self.logging_dir is None:
            raise ValueError("TrainConfig.report_to includes 'tensorboard', which writes into logging_dir "
                             "(default out_dir/runs), but out_dir and logging_dir are both None")

    def _check_choices(self) -> None:
        _choice("dtype", self.dtype, DTYPES)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("base_dtype", self.base_dtype, (None, "bf16"))
        _choice("device", self.device, DEVICES)
        from .tasks import Task  # (tasks imports forward, which imports this module)

        if not isinstance(self.task, Task) and self.task not in TASKS:
            raise ValueError(f"TrainConfig.task={self.task!r} is not one of {list(TASKS)} or a tt.train.Task "
                             "(e.g. tt.rlhf.reward_task(), tt.rlhf.dpo_task())")
        if self.dtype == "fp16" and self.device != "cuda":
            raise ValueError(
                f"TrainConfig.dtype='fp16' needs device='cuda' (fp16 autocast with a gradient scaler); "
                f"got device={self.device!r}: use dtype='bf16' on the CPU")
        if self.base_dtype == "bf16" and self.dtype == "fp32":
            raise ValueError("TrainConfig.base_dtype='bf16' needs dtype='bf16' or 'fp16': fp32 compute "
                             "cannot multiply fp32 activations by bf16 frozen weights")

    def to_dict(self) -> dict:
        """A JSON-ready dict of the fields (paths as strings)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # (asdict would copy a Task)
        if not isinstance(out["task"], str):
            out["task"] = out["task"].describe()
        for key in ("out_dir", "resume", "logging_dir"):
            if isinstance(out[key], Path):
                out[key] = str(out[key])
        out["betas"] = list(out["betas"])
        out["report_to"] = list(out["report_to"])
        return out
