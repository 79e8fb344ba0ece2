"""What `fit` trains, as one small protocol: a `Task` says how an example is checked, how examples become a
batch, what the step's loss is averaged over, and what one batch's loss (and metrics) is.

`fit` knows nothing else about the task, so a new objective is a new `Task`, not a second loop: the
three tasks of `losses.py` ("causal_lm", "classification", "token_classification") are built here, and
`tinytune.rlhf` builds the reward-model and DPO tasks on the same protocol (this layer never imports it).

    task = Task(name="my_task", check_example=..., collate=..., count=..., loss=...)
    tt.train.fit(model, examples, tt.train.TrainConfig(task=task))

Metrics travel as `{name: (sum, n)}` so that micro-batches, accumulation and processes add up exactly
(the logged value is the total sum over the total n).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import eval_metrics
from .collate import check_lm_example, collate
from .forward import batch_loss, forward_kwargs
from .losses import num_scored
from .metric_sums import Metrics, add_metrics, metric_means  # noqa: F401 (re-exported)



def attention_tokens(batch: dict) -> int:
    """The non-padding tokens of a batch (its `attention_mask` sum): what tokens/s counts."""
    return int(batch["attention_mask"].sum())


@dataclass(frozen=True, eq=False)
class Task:
    """One training objective for `fit` (`TrainConfig.task` takes a name of a built-in one or a `Task`).

    Attributes:
        name: what checkpoints record (a resume under another task name is refused) and logs show.
        check_example: `check_example(example, index, where)` raises ValueError naming `where[index]`.
        collate: `collate(examples, pad_token_id, device) -> batch` (a dict of tensors on `device`).
        count: `count(batch) -> int`: the units the step's loss is a mean over (scored tokens, examples,
            preference groups). `loss` divides its sum by the whole optimizer step's count.
        loss: `loss(model, batch, count, module) -> (scalar, metrics)`: the batch's summed loss divided by
            `count` (the step's total), and `{name: (sum, n)}` metrics (may be empty). `model` is what
            the forward pass goes through (a DDP wrapper with several processes), `module` the user's model.
        tokens: `tokens(batch) -> int`, for tokens/s (default: the attention mask's sum).
        counts: what `count` counts, in words (for the warning of a step with nothing to score).
        settings: the task's hyperparameters (JSON values), recorded with checkpoints: a resume with other
            settings is refused.
        shown: the metrics the progress line prints (every metric goes to `metrics.jsonl` and `History`).
        prepare: for objectives that make their own data (online RL), `prepare(model, micro_batches, module)
            -> (updates, metrics, tokens)`: run once per optimizer step on the step's micro-batches, it returns
            the updates to take (each a list of micro-batches, one optimizer update each: PPO's
            ppo_epochs x mini-batches over one rollout), metrics `{name: (sum, n)}` of the preparation and
            the tokens it processed (for tokens/s). None: one update of the micro-batches as drawn.
        evaluate: `evaluate(model, batch, count, module) -> (loss, metrics)` used by evaluation in place of
            `loss` (RL tasks: the negative mean reward of fresh completions). None: `loss`.
        after_step: `after_step(metrics)` with the step's `{name: (sum, n)}` summed over every process,
            after an applied step (PPO's adaptive KL coefficient follows the step's KL).
        summarize: `summarize(loss, metrics) -> dict` turns evaluation's total loss and summed metrics into
            the reported numbers (the built-in tasks add perplexity, accuracy, F1s: see `eval_metrics.py`).
            None: {"loss": loss, name: sum / n for each metric}.
        state: an object with `state_dict() -> dict` (JSON values) and `load_state_dict(state)` (checks
            before it changes anything), saved with every checkpoint and restored on resume. None: none.
    """

    name: str
    check_example: Callable[[object, int, str], None]
    collate: Callable[[list, int, str], dict]
    count: Callable[[dict], int]
    loss: Callable[[nn.Module, dict, int, nn.Module], tuple[torch.Tensor, Metrics]]
    tokens: Callable[[dict], int] = attention_tokens
    counts: str = "scored tokens"
    settings: dict = field(default_factory=dict)
    shown: tuple[str, ...] = ()
    prepare: Callable[[nn.Module, list, nn.Module], tuple[list, Metrics, int]] | None = None
    evaluate: Callable[[nn.Module, dict, int, nn.Module], tuple[torch.Tensor, Metrics]] | None = None
    after_step: Callable[[Metrics], None] | None = None
    state: object | None = None
    summarize: Callable[[float, Metrics], dict[str, float]] | None = None

    def describe(self) -> str | dict:
        """The task as a checkpoint records it: the name, or {"name", **settings} with settings."""
        return {"name": self.name, **self.settings} if self.settings else self.name


def _builtin(name: str, counts: str) -> Task:
    def check(example, index: int, where: str) -> None:
        check_lm_example(example, index, where, name)

    def loss(model, batch, count, module):
        return batch_loss(model, batch, forward_kwargs(module), name, count, module), {}

    scorer = {"classification": eval_metrics.classification_eval,
              "token_classification": eval_metrics.token_classification_eval}.get(name)

    def evaluate(model, batch, count, module):  # the loss from the logits, plus the prediction counts
        return scorer(model, batch, count, module, forward_kwargs(module))

    def summarize(loss, metrics):
        return eval_metrics.summarize(loss, metrics, name)

    return Task(name=name, check_example=check, collate=collate, count=lambda batch: num_scored(name, batch),
                loss=loss, counts=counts, evaluate=evaluate if scorer else None, summarize=summarize)


BUILTIN_TASKS: dict[str, Task] = {
    "causal_lm": _builtin("causal_lm", "scored tokens: every label is -100"),
    "classification": _builtin("classification", "examples"),
    "token_classification": _builtin("token_classification", "scored tokens: every label is -100"),
}


def resolve_task(task: str | Task) -> Task:
    """The `Task` that `TrainConfig.task` names (a built-in name, or a `Task` as given).

    Raises:
        ValueError: an unknown name (the built-in names are listed).
    """
    if isinstance(task, Task):
        return task
    if task not in BUILTIN_TASKS:
        raise ValueError(f"TrainConfig.task={task!r} is not one of {list(BUILTIN_TASKS)} or a tt.train.Task "
                         "(tt.rlhf.reward_task(), tt.rlhf.dpo_task(...))")
    return BUILTIN_TASKS[task]
