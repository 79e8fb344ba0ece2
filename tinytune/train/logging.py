"""Progress (a tqdm bar or plain lines), the JSONL metrics file, and the fan-out to the trackers."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path

from .._files import atomic_write


def _finite(metrics: dict) -> dict:
    """`metrics` with non-finite values as None (JSON has no NaN)."""
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def truncate_metrics(file: Path, step: int) -> None:
    """Keep only the records of steps <= `step` in a metrics.jsonl (atomically): a run resumed from
    step `step` then writes each later step once. A torn last line (a killed write) is dropped too."""
    file = Path(file)
    if not file.is_file():
        return
    kept = []
    for line in file.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    text = "".join(line + "\n" for line in kept)
    atomic_write(file, lambda tmp: Path(tmp).write_text(text))


def _in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (where tqdm.auto draws a widget)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _mode(progress: str, stream) -> str:
    """"bar", "lines" or "none" for `TrainConfig.progress` on `stream` ("auto": a bar on a terminal or notebook)."""
    if progress != "auto":
        return progress
    if bool(getattr(stream, "isatty", lambda: False)()):
        return "bar"
    return "bar" if stream is sys.stdout and _in_notebook() else "lines"


def _columns(stream) -> int | None:
    """The width of the terminal `stream` is, or None (not a terminal, or unknown)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):  # (io.UnsupportedOperation is an OSError)
        return None


def _number(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if math.isfinite(value) else str(value)


class ProgressLogger:
    """Prints progress, appends metrics and reports to the trackers for one run.

    Progress is a tqdm bar (`tqdm.auto`: a widget in notebooks) redrawn every step, or a plain line
    every `log_every` steps and at the last one; both show the step, the smoothed loss (the mean of
    the finite losses of the last `log_every` steps: a window, not an EMA), the learning rate, the
    gradient norm, the task's shown metrics, tokens/s, the elapsed time and the ETA. Evaluations and
    messages are lines of their own. With `out_dir`, every step and every evaluation is appended as
    one JSON object per line to `out_dir/metrics.jsonl` (the step's own loss, not smoothed). Every
    `log_every` steps (and at the last) the trackers get "train/loss" (smoothed), "train/lr",
    "train/grad_norm", "train/tokens_per_s" and "train/<metric>"; each evaluation "eval/<metric>".

    Args:
        total_steps: the run's `steps` (for the ETA).
        log_every: steps between lines and tracker reports; the smoothing window.
        out_dir: where `metrics.jsonl` goes; None: no file.
        stream: where progress goes (default: sys.stdout).
        first_step: the step the run starts from (a resumed run), so the ETA counts only this session.
        quiet: print and write nothing (the ranks other than 0 of a multi-process run).
        shown: the names of task metrics the progress shows (all of them go to `metrics.jsonl`).
        mode: `TrainConfig.progress`: "auto" (bar on a terminal or in a notebook, lines otherwise),
            "bar", "lines" or "none".
        loggers: trackers with `log(metrics, step)` and `close()` (`tinytune.train.loggers`); closed here.
    """

    def __init__(self, total_steps: int, log_every: int, out_dir: Path | None = None, stream=None,
                 first_step: int = 0, quiet: bool = False, shown: tuple[str, ...] = (), mode: str = "auto",
                 loggers=()):
        self.total_steps, self.log_every, self.quiet, self.shown = total_steps, log_every, quiet, tuple(shown)
        self.stream = stream if stream is not None else sys.stdout
        self.mode = "none" if quiet else _mode(mode, self.stream)
        self.loggers = list(loggers)
        self.metrics = Path(out_dir) / "metrics.jsonl" if out_dir is not None and not quiet else None
        if self.metrics is not None:
            self.metrics.parent.mkdir(parents=True, exist_ok=True)
        self.start, self.first_step = time.perf_counter(), first_step
        self.window: deque[float] = deque(maxlen=log_every)
        self.bar = self._bar() if self.mode == "bar" else None
        self._drawn = False

    def _bar(self):
        from tqdm.auto import tqdm

        # fit redraws the bar itself, once per step (set_description_str: {desc} is shown as given):
        # tqdm's timers are off (no automatic redraw, no first empty bar), so one redraw per step.
        # A terminal that reports 0 columns (a pty nobody sized, in some CI) would get no bar at all.
        sized = _columns(self.stream) != 0
        return tqdm(total=self.total_steps, initial=self.first_step, file=self.stream, dynamic_ncols=sized,
                    ncols=None if sized else 120, nrows=None if sized else 24, mininterval=math.inf, delay=math.inf, leave=True, unit="step",
                    bar_format="step {n_fmt}/{total_fmt} |{bar:12}| {desc}  {elapsed} elapsed  ETA {remaining}")

    def _append(self, record: dict) -> None:
        if self.metrics is not None:
            try:
                with open(self.metrics, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:
                raise OSError(err.errno, f"appending to {self.metrics} failed ({err.strerror or err})") from err

    def _report(self, metrics: dict, step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def _fields(self, loss: float, lr: float, tokens_per_s: float, metrics: dict) -> str:
        shown = "".join(f"  {k} {metrics[k]:.4f}" for k in self.shown if k in metrics)
        norm = metrics.get("grad_norm")
        norm = f"  grad_norm {_number(norm, 3)}" if norm is not None else ""
        return f"loss {loss:.4f}{shown}  lr {lr:.2e}{norm}  {tokens_per_s:,.0f} tok/s"

    def step(self, step: int, loss: float, lr: float, tokens_per_s: float, metrics: dict | None = None) -> None:
        """Record optimizer step `step` (1-based) with its loss, learning rate, throughput and metrics."""
        if self.quiet:
            return
        metrics = metrics or {}
        self._append({"step": step, "loss": loss if math.isfinite(loss) else None, "lr": lr,
                      "tokens_per_s": round(tokens_per_s, 1), **_finite(metrics), "time": round(time.time(), 3)})
        if math.isfinite(loss):
            self.window.append(loss)
        smooth = sum(self.window) / len(self.window) if self.window else math.nan
        due = step % self.log_every == 0 or step == self.total_steps
        if due:
            self._report({"train/loss": smooth, "train/lr": lr, "train/tokens_per_s": tokens_per_s,
                          **{f"train/{k}": v for k, v in metrics.items()}}, step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_description_str(self._fields(smooth, lr, tokens_per_s, metrics), refresh=True)
            self._drawn = True
        elif self.mode == "lines" and due:
            elapsed = time.perf_counter() - self.start
            done = step - self.first_step
            eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
            self.stream.write(f"step {step}/{self.total_steps}  {self._fields(smooth, lr, tokens_per_s, metrics)}"
                              f"  elapsed {_duration(elapsed)}  ETA {_duration(eta)}\n")
            self.stream.flush()

    def eval(self, step: int, loss: float, metrics: dict | None = None) -> None:
        """Record an evaluation at `step`: its loss and every other metric (written as "eval_<name>")."""
        if self.quiet:
            return
        metrics = metrics or {}
        self._append({"step": step, "eval_loss": loss, **{f"eval_{k}": v for k, v in _finite(metrics).items()},
                      "time": round(time.time(), 3)})
        self._report({"eval/loss": loss, **{f"eval/{k}": v for k, v in metrics.items()}}, step)
        more = "".join(f"  {k} {_number(v)}" for k, v in metrics.items() if isinstance(v, (int, float)))
        self.message(f"step {step}/{self.total_steps}  eval loss {loss:.4f}{more}")

    def message(self, text: str) -> None:
        """Print a line of its own (above the bar, if any; nothing with mode "none")."""
        if self.mode == "none":
            return
        if self.bar is not None and self._drawn:
            self.stream.write("\n")  # end the bar's line: it is redrawn below at the next step
            self._drawn = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the progress bar's line, if any, and close the trackers."""
        if self.bar is not None:
            self.bar.close()  # (draws nothing: fit drew the last state)
            if self._drawn and not _in_notebook():
                self.stream.write("\n")
                self.stream.flush()
            self.bar, self._drawn = None, False
        loggers, self.loggers = self.loggers, []
        for logger in loggers:
            logger.close()
