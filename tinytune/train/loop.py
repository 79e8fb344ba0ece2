"""`fit`: the training loop (batches, accumulation, clipping, eval, early stopping, checkpoints, resume)."""
from __future__ import annotations

import math
import signal
import time
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from ..seeding import MAX_SEED, seed_everything
from . import checkpoint as ckpt
from . import distributed
from .callbacks import Callbacks
from .collate import DataStream, check_data
from .config import TrainConfig
from .distributed import Distributed
from .loggers import build_loggers, check_available
from .logging import ProgressLogger, truncate_metrics
from .optim import build_optimizer, build_scheduler
from .evaluation import evaluate_task, reduce_sums
from .history import History, TrainingInterrupted
from .plots import write_loss_curve
from .precision import Precision, prepare_model, warn_if_slow_cpu_bf16
from .tasks import Metrics, add_metrics, metric_means, resolve_task


class _Run:
    """One run's moving parts: optimizer, schedule, data position, counters and history.

    `module` is the user's model; `model` is what the forward pass goes through: `module` itself, or
    its DistributedDataParallel wrapper with several processes. Checkpoints, evaluation and the
    optimizer use `module`.
    """

    def __init__(self, model, train_data, cfg: TrainConfig, eval_data, precision: Precision, out,
                 dist: Distributed):
        if cfg.grad_checkpointing and not hasattr(model, "set_gradient_checkpointing"):
            raise ValueError(f"TrainConfig.grad_checkpointing=True, but {type(model).__name__} has no "
                             "set_gradient_checkpointing(enabled) method")
        if cfg.out_dir is not None and distributed.is_fsdp(model):
            raise ValueError("TrainConfig.out_dir is set, but fit does not write checkpoints of an FSDP-sharded "
                             "model (its weights and optimizer state are DTensor shards): train with "
                             "out_dir=None and save with torch.distributed.checkpoint (see docs/training.md)")
        self.module, self.data, self.cfg, self.eval_data, self.precision = model, train_data, cfg, eval_data, precision
        self.dist, self.model = dist, dist.wrap(model)
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.task = resolve_task(cfg.task)
        self.history, self.saved_step, self.out, self.interrupted = History(), None, out, False
        self.bad_streak, self.best_eval, self.evals_since_best = 0, math.inf, 0
        self.data_stream = DataStream(len(train_data), cfg.seed, cfg.shuffle)
        self.tokens, self.start, self.callbacks = 0, time.perf_counter(), Callbacks()

    def resume(self, where, n_train: int) -> bool:
        """Load the checkpoint `where` points to; False when there is nothing to resume."""
        if where is None or where is False:
            return False
        found = ckpt.find_checkpoint(self.cfg.out_dir if where is True else where)
        if found is None:
            if where is True:  # "resume if possible": a first run starts fresh
                return False
            raise FileNotFoundError(f"resume: no checkpoint in {where}")
        # Everything is read and checked before the first tensor is copied: a refusal changes nothing.
        checkpoint = ckpt.read_found_checkpoint(found, self.module, self.optimizer)
        found, state = checkpoint.path, checkpoint.state
        self._check_fits(checkpoint, n_train)
        rng = self._my_rng_state(state, found)
        ckpt.check_rng_state(rng, str(found))
        task_state = self.task.state
        before = task_state.state_dict() if task_state is not None else None
        try:
            with ckpt.all_or_nothing(self.module, self.optimizer, self.scheduler, self.precision):
                if self.task.state is not None:  # first: it checks before it changes anything
                    self.task.state.load_state_dict(state["task_state"])
                ckpt.load_trainable_state_dict(self.module, checkpoint.weights)  # (one snapshot: this block's)
                self.optimizer.load_state_dict(checkpoint.optimizer)
                self.scheduler.load_state_dict(state["scheduler"])
                self.precision.load_state_dict(state["scaler"])
                if self.cfg.out_dir is not None and self.dist.is_main:  # last: atomic, so unchanged if it fails
                    truncate_metrics(self.cfg.out_dir / "metrics.jsonl", state["step"])  # each step once after a resume
        except BaseException:
            if task_state is not None:  # all_or_nothing put the rest back
                task_state.load_state_dict(before)
            raise
        self.history = History(**{k: list(state["history"].get(k, [])) for k in History()._lists()},
                               step=state["step"], checkpoint=found)
        self.bad_streak, self.best_eval, self.evals_since_best = state["loop"]
        pos = state["data"]
        self.data_stream = DataStream(n_train, self.cfg.seed, self.cfg.shuffle, pos["epoch"], pos["index"])
        self.saved_step = state["step"]
        ckpt.set_rng_state(rng)  # last (and checked above): nothing may draw random numbers after it
        return True

    def _check_fits(self, checkpoint: ckpt.Checkpoint, n_train: int) -> None:
        """Refuse a checkpoint whose data position or run settings would not carry over (before any copy)."""
        found, state = checkpoint.path, checkpoint.state
        if state["data"]["num_examples"] != n_train:
            raise ValueError(f"resume: checkpoint {found} was trained on {state['data']['num_examples']} examples, "
                             f"train_data has {n_train}: its data position would not carry over")
        saved = checkpoint.config or {}
        mine = self.cfg.to_dict()
        for name in ("task", "seed", "shuffle"):  # they fix the meaning of the data position and the loss
            if name in saved and saved[name] != mine[name]:
                raise ValueError(f"resume: checkpoint {found} was trained with {name}={saved[name]!r}, this run has "
                                 f"{name}={mine[name]!r}; the data order or loss would not carry over")
        if "lr" in saved and saved["lr"] != mine["lr"]:  # the restored optimizer and schedule keep the old rate
            raise ValueError(f"resume: checkpoint {found} was trained with lr={saved['lr']!r}, this run has "
                             f"lr={mine['lr']!r}; the optimizer and schedule states it restores carry the old "
                             "rate, so the new one would be silently ignored: resume with the same lr")
        if self.task.state is not None and not isinstance(state.get("task_state"), dict):
            raise ValueError(f"resume: checkpoint {found} holds no state of task {self.task.name!r} "
                             "(e.g. PPO's KL coefficient): it was not written by this task")
        base_lrs = state["scheduler"].get("base_lrs")
        if not isinstance(base_lrs, list) or len(base_lrs) != len(self.optimizer.param_groups):
            raise ValueError(f"resume: the scheduler state in {found} does not fit this run's "
                             f"{len(self.optimizer.param_groups)} parameter groups")

    def _my_rng_state(self, state: dict, found) -> dict:
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        if len(per_rank) == self.dist.world_size:
            return per_rank[self.dist.rank]
        if self.dist.is_main:
            warnings.warn(f"resume: {found} was written by {len(per_rank)} process(es), this run has "
                          f"{self.dist.world_size}: the data order carries over, the random streams "
                          "(dropout) start from rank 0's", RuntimeWarning, stacklevel=3)
        return per_rank[0]

    def save(self) -> None:
        """Checkpoint the current step into `out_dir` (once per step; nothing without `out_dir`)."""
        h, dist = self.history, self.dist
        if self.cfg.out_dir is None or self.saved_step == h.step:
            return
        rngs = dist.gather(ckpt.rng_state(self.cfg.device))  # every rank's dropout stream resumes exactly
        if dist.is_main:  # the other ranks hold the same weights and optimizer state
            state = {"step": h.step, "data": self.data_stream.position(), "scheduler": self.scheduler.state_dict(),
                     "scaler": self.precision.state_dict(), "rng": rngs[0], "rng_per_rank": rngs,
                     "history": h._lists(), "loop": [self.bad_streak, self.best_eval, self.evals_since_best]}
            if self.task.state is not None:
                state["task_state"] = self.task.state.state_dict()
            ckpt.save_checkpoint(self.cfg.out_dir, h.step, self.module, self.optimizer, state,
                                 self.cfg.to_dict(), keep=self.cfg.keep_checkpoints)
        dist.barrier()  # nobody reads or exits before rank 0's checkpoint is complete
        h.checkpoint = ckpt.checkpoint_dir(self.cfg.out_dir, h.step)
        self.saved_step = h.step
        self.callbacks.save(h.step, h, h.checkpoint)  # committed (and every rank past the barrier)

    def _micro_batches(self) -> list[dict]:
        cfg, dist = self.cfg, self.dist
        # Every rank draws the same global batch and keeps its own slice of it.
        ids = dist.my_slice(self.data_stream.take(cfg.batch_size * cfg.grad_accum * dist.world_size))
        return [self.task.collate([self.data[i] for i in ids[k:k + cfg.batch_size]], cfg.pad_token_id, cfg.device)
                for k in range(0, len(ids), cfg.batch_size)]

    def _accumulate(self, micro: list[dict], scored: int) -> tuple[float, Metrics]:
        """Forward and backward of one update's micro-batches: (summed loss over all ranks, local metric sums)."""
        total, dist, metrics = 0.0, self.dist, {}
        for k, batch in enumerate(micro):
            # Divide by the whole update's scored tokens (examples) over all ranks: grad_accum=2 x 4 and two
            # processes x 4 are the same step as 1 x 8. DDP averages over ranks, hence the world_size.
            with distributed.no_sync(self.model, k < len(micro) - 1):
                with self.precision.autocast():
                    loss, more = self.task.loss(self.model, batch, scored, self.module)
                value = float(loss.detach())  # one sync per micro-batch, to stop before a NaN reaches the grads
                if not math.isfinite(value) and not dist.active:  # (ranks must all run backward together)
                    return value, metrics
                self.precision.backward(loss * dist.world_size if dist.active else loss)
            total, metrics = total + value, add_metrics(metrics, more)
        (total,), _ = reduce_sums([total], {}, dist, self.cfg.device)
        return total, metrics

    def _prepare(self, micro: list[dict]) -> tuple[list[list[dict]], Metrics, int]:
        """The step's updates (one of the drawn micro-batches, or what the task's `prepare` makes of them)."""
        task = self.task
        if task.prepare is None:
            return [micro], {}, sum(task.tokens(b) for b in micro)
        with self.precision.autocast():
            return task.prepare(self.model, micro, self.module)

    def _update(self, update: list[dict]) -> tuple[float, bool, int, Metrics, float]:
        """One optimizer update over `update`'s micro-batches: (loss, applied, scored units, local metrics, grad norm)."""
        (scored,) = self.dist.sum([sum(self.task.count(b) for b in update)], self.cfg.device)
        scored = int(scored)
        loss, metrics = self._accumulate(update, scored) if scored else (float("nan"), {})
        applied, norm = (self.precision.clip(self.optimizer, self.params, self.cfg.max_grad_norm)
                         if math.isfinite(loss) else (False, math.nan))
        if applied:
            self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return loss, applied, scored, metrics, norm

    def optimizer_step(self) -> tuple[float, bool, int, dict]:
        """One step: (mean loss of its updates, whether all were applied, scored units, metric means).

        A step is one update of the drawn batch, or, for a task with `prepare` (PPO), every update it plans;
        the first update that is not applied (a non-finite loss) ends the step, which then counts as skipped.
        """
        updates, metrics, tokens = self._prepare(self._micro_batches())
        (tokens,) = self.dist.sum([tokens], self.cfg.device)
        self.tokens += int(tokens)
        losses, applied, scored, norms = [], True, 0, []
        for update in updates:
            loss, applied, n, more, norm = self._update(update)
            losses.append(loss)
            norms.append(norm)
            scored, metrics = scored + n, add_metrics(metrics, more)
            if not applied:
                break
        with warnings.catch_warnings():  # a skipped first step makes torch warn about the call order
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()  # the schedule follows the step count, applied or not
        _, metrics = reduce_sums([], metrics, self.dist, self.cfg.device)
        if applied and self.task.after_step is not None:
            self.task.after_step(metrics)
        loss = sum(losses) / len(losses) if losses else float("nan")
        grad_norm = sum(norms) / len(norms) if norms else math.nan
        return loss, applied and bool(losses), scored, {"grad_norm": grad_norm, **metric_means(metrics)}

    def _record(self, loss: float, applied: bool, scored: int, metrics: dict, lr: float) -> str | None:
        h, cfg = self.history, self.cfg
        h.step += 1
        h.losses.append(loss)
        h.lrs.append(lr)
        h.metrics.append(metrics)
        if applied:
            self.bad_streak = 0
            return None
        h.skipped_steps.append(h.step)
        if not scored:
            if self.dist.is_main:
                warnings.warn(f"step {h.step}: nothing to score in the batch (no {self.task.counts}); "
                              "step skipped", RuntimeWarning, stacklevel=2)
            return None
        self.bad_streak += 1
        if self.dist.is_main:
            warnings.warn(f"step {h.step}: non-finite loss or gradient norm (loss {loss}); step skipped "
                          f"({self.bad_streak}/{cfg.max_bad_steps} in a row)", RuntimeWarning, stacklevel=2)
        if self.bad_streak < cfg.max_bad_steps:
            return None
        return (f"stopped: non-finite loss or gradient norm in {self.bad_streak} consecutive steps "
                f"(steps {h.step - self.bad_streak + 1}..{h.step}, max_bad_steps={cfg.max_bad_steps}); "
                f"last good checkpoint: {h.checkpoint}")

    def _evaluate(self, logger: ProgressLogger) -> str | None:
        h, patience = self.history, self.cfg.early_stopping_patience
        result = evaluate_task(self.module, self.eval_data, self.cfg, self.precision, self.dist)
        loss = result.pop("loss")
        result.update(self.callbacks.evaluate(h.step, h, {"loss": loss, **result}))
        h.eval_steps.append(h.step)
        h.eval_losses.append(loss)
        h.eval_metrics.append(result)
        logger.eval(h.step, loss, result)
        if loss < self.best_eval:
            self.best_eval, self.evals_since_best = loss, 0
        else:
            self.evals_since_best += 1
        if patience is not None and self.evals_since_best >= patience:
            return (f"early stopping at step {h.step}: eval loss has not improved on {self.best_eval:.4f} "
                    f"for {patience} evaluations")
        return None

    def _step_and_decide(self, logger: ProgressLogger, received) -> str | None:
        h, cfg, callbacks = self.history, self.cfg, self.callbacks
        lr = self.optimizer.param_groups[0]["lr"]
        reason = self._record(*self.optimizer_step(), lr=lr)
        stop_asked, extra = callbacks.step(h.step, h, h.metrics[-1])
        h.metrics[-1].update(extra)
        logger.step(h.step, h.losses[-1], lr, self.tokens / max(time.perf_counter() - self.start, 1e-9),
                    h.metrics[-1])
        if reason is not None:
            return reason  # no checkpoint now: the last good one stays the latest
        if self.eval_data is not None and cfg.eval_every and h.step % cfg.eval_every == 0:
            reason = self._evaluate(logger)
        stop_asked = callbacks.after_step(h.step, h) or stop_asked or h.stop_requested  # (every callback runs)
        if self.dist.active:  # every rank stops at the same step, whichever rank was asked to
            stop_asked, signalled = (v > 0 for v in self.dist.sum([stop_asked, bool(received)], self.cfg.device))
        else:
            signalled = bool(received)
        if stop_asked:
            reason = reason or f"stopped by a callback at step {h.step}"
        if signalled:
            self.interrupted = True
            name = signal.Signals(received[0]).name if received else "a signal to another rank"
            reason = f"interrupted by {name} at step {h.step}"
        if reason is None and h.step >= cfg.steps:
            reason = "completed"
            if self.eval_data is not None and (not h.eval_steps or h.eval_steps[-1] != h.step):
                self._evaluate(logger)
        # No periodic checkpoint inside a run of non-finite steps: the latest stays the last good one.
        if reason is not None or (cfg.save_every and h.step % cfg.save_every == 0 and not self.bad_streak):
            self.save()
        return reason

    def train(self, callbacks: Callbacks, received) -> History:
        """Run steps until `cfg.steps` or an earlier stop; returns the history."""
        cfg, h, self.callbacks = self.cfg, self.history, callbacks
        logger = ProgressLogger(cfg.steps, cfg.log_every, cfg.out_dir, self.out, first_step=h.step,
                                quiet=not self.dist.is_main, shown=self.task.shown, mode=cfg.progress,
                                loggers=build_loggers(cfg, h.step) if self.dist.is_main else ())
        model = self.module
        was_training = model.training
        was_checkpointing = bool(getattr(model, "is_gradient_checkpointing", False))
        if cfg.grad_checkpointing:
            model.set_gradient_checkpointing(True)
        model.train()
        self.start, reason = time.perf_counter(), ("completed" if h.step >= cfg.steps else None)
        try:
            while reason is None:
                reason = self._step_and_decide(logger, received)
        finally:
            model.train(was_training)
            if cfg.grad_checkpointing:
                model.set_gradient_checkpointing(was_checkpointing)  # as the caller had it
            logger.close()
        h.tokens_per_s = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        h.stopped_reason = reason if not self.interrupted else f"{reason}; checkpoint: {h.checkpoint}"
        if reason != "completed":
            logger.message(h.stopped_reason)
        if cfg.out_dir is not None and self.dist.is_main:
            write_loss_curve(cfg.out_dir, h, f"{self.task.name} loss", cfg.log_every, logger.message)
        return h


def _refuse_to_overwrite_a_run(cfg: TrainConfig) -> None:
    """A fresh run must not write over (and prune) the checkpoints another run left in `out_dir`."""
    if cfg.out_dir is None:
        return
    earlier = ckpt.existing_checkpoints(cfg.out_dir)
    if earlier:
        raise ValueError(f"TrainConfig.out_dir={str(cfg.out_dir)!r} already holds checkpoints of a run "
                         f"({earlier[0].name}, ...): a fresh run would overwrite and prune them. Pass resume=True "
                         "to continue that run, or choose another out_dir")


def fit(model: nn.Module, train_data, cfg: TrainConfig, eval_data=None, *, resume_from=None,
        callbacks: Sequence[Callable] = (), stream=None) -> History:
    """Train the trainable parameters of `model` on `train_data`.

    A fresh run first calls `tt.seed_everything(cfg.seed + rank)`, so two fits of the same starting
    model on the same data are bit-identical on the CPU; a resumed run restores the checkpoint's RNG
    states instead. Seed before applying the PEFT method as well, for the same starting adapter.

    Args:
        model: any module mapping `input_ids` (B, T) [and `attention_mask=`] to logits (B, T, V),
            e.g. a `tinytune.models.CausalLM` after `tt.lora.apply`; for `cfg.task="classification"`
            to (B, num_labels) (`tinytune.models.SequenceClassifier`), for "token_classification" to
            (B, T, num_labels) (`TokenClassifier`). Moved to `cfg.device`; trainable parameters are
            made fp32. Left in the mode it came in.
        train_data: a sequence of dicts with `input_ids` and `labels` (lists of ints, equal length;
            -100 = not scored), or `input_ids` and an int `label` for classification. Batched
            (`cfg.batch_size`), right-padded and shuffled per epoch.
        cfg: a `TrainConfig`.
        eval_data: examples like `train_data`, evaluated every `cfg.eval_every` steps and at the end.
        resume_from: a checkpoint directory or an `out_dir`; overrides `cfg.resume`.
        callbacks: plain callables `callback(step, history)`, run after every optimizer step (and its
            evaluation); returning True stops training (a checkpoint is saved when `out_dir` is set);
            and `tt.train.Callback` objects (`on_step`, `on_evaluate`, `on_save`; they may add metrics).
        stream: where progress goes (default: sys.stdout; `cfg.progress` "auto" draws a bar on a terminal).

    Returns:
        A `History`.

    Raises:
        ImportError: a tracker of `cfg.report_to` is not installed (before anything changes).
        TypeError: a callback returned something else than it may (names the callback and the value).
        ValueError: malformed data (names the example), a model without trainable parameters or
            returning a wrong shape, a checkpoint that does not match (nothing is changed then), or a
            fresh run into an `out_dir` that holds another run's checkpoints.
        TrainingInterrupted: after SIGINT/SIGTERM, once the checkpoint is written (with `out_dir`).
    """
    check_available(cfg.report_to)  # a missing tracker fails before the model or a file changes
    n_train = check_data(train_data, "train_data", cfg.task)
    if eval_data is not None:
        check_data(eval_data, "eval_data", cfg.task)
    dist = distributed.setup(cfg.device)  # before the model moves: "cuda" means this rank's device
    precision = Precision(cfg.dtype, cfg.device)
    if dist.is_main:
        warn_if_slow_cpu_bf16(cfg.dtype, cfg.device)
    prepare_model(model, cfg.device, cfg.base_dtype)
    run = _Run(model, train_data, cfg, eval_data, precision, stream, dist)
    callbacks = Callbacks(callbacks)  # (checks them before the model trains)
    if not run.resume(resume_from if resume_from is not None else cfg.resume, n_train):
        _refuse_to_overwrite_a_run(cfg)
        # A fresh run starts from cfg.seed (a resumed one restored its RNG states above instead). Each rank
        # its own dropout stream; wrapping keeps seed + rank in numpy's range.
        seed_everything((cfg.seed + dist.rank) % (MAX_SEED + 1))
    with ckpt.catch_signals(cfg.out_dir is not None) as received:
        history = run.train(callbacks, received)
    if run.interrupted:
        raise TrainingInterrupted(history.stopped_reason, history)
    return history

