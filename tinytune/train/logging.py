"""Progress lines, a JSONL metrics file and an SVG loss curve (no dependencies)."""
from __future__ import annotations

import json
import math
import sys
import time
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


class ProgressLogger:
    """Prints progress and appends metrics for one run.

    On a terminal the progress line is rewritten in place (carriage return) every step; otherwise a
    plain line is printed every `log_every` steps and at the last step. With `out_dir`, every step and
    every evaluation is appended as one JSON object per line to `out_dir/metrics.jsonl`.

    Args:
        total_steps: the run's `steps` (for the ETA).
        log_every: steps between plain lines when not on a terminal.
        out_dir: where `metrics.jsonl` goes; None: no file.
        stream: where progress goes (default: sys.stdout).
        first_step: the step the run starts from (a resumed run), so the ETA counts only this session.
        quiet: print and write nothing (the ranks other than 0 of a multi-process run).
        shown: the names of task metrics the progress line shows (all of them go to `metrics.jsonl`).
    """

    def __init__(self, total_steps: int, log_every: int, out_dir: Path | None = None, stream=None,
                 first_step: int = 0, quiet: bool = False, shown: tuple[str, ...] = ()):
        self.total_steps, self.log_every, self.quiet, self.shown = total_steps, log_every, quiet, tuple(shown)
        self.stream = stream if stream is not None else sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.metrics = Path(out_dir) / "metrics.jsonl" if out_dir is not None and not quiet else None
        if self.metrics is not None:
            self.metrics.parent.mkdir(parents=True, exist_ok=True)
        self.start, self.first_step = time.perf_counter(), first_step
        self._open_line = False

    def _append(self, record: dict) -> None:
        if self.metrics is not None:
            try:
                with open(self.metrics, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:
                raise OSError(err.errno, f"appending to {self.metrics} failed ({err.strerror or err})") from err

    def _shown(self, metrics: dict) -> str:
        return "".join(f"  {k} {metrics[k]:.4f}" for k in self.shown if k in metrics)

    def step(self, step: int, loss: float, lr: float, tokens_per_s: float, metrics: dict | None = None) -> None:
        """Record optimizer step `step` (1-based) with its loss, learning rate, throughput and task metrics."""
        if self.quiet:
            return
        metrics = metrics or {}
        self._append({"step": step, "loss": loss if math.isfinite(loss) else None, "lr": lr,
                      "tokens_per_s": round(tokens_per_s, 1), **_finite(metrics), "time": round(time.time(), 3)})
        done = step - self.first_step
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total_steps - step) if done > 0 else float("nan")
        line = (f"step {step}/{self.total_steps}  loss {loss:.4f}{self._shown(metrics)}  lr {lr:.2e}  "
                f"{tokens_per_s:,.0f} tok/s  ETA {_duration(eta)}")
        if self.tty:
            self.stream.write("\r" + line.ljust(78))
            self._open_line = True
        elif step % self.log_every == 0 or step == self.total_steps:
            self.stream.write(line + "\n")
        self.stream.flush()

    def eval(self, step: int, loss: float, metrics: dict | None = None) -> None:
        """Record an evaluation at `step` (its loss and task metrics, written as "eval_<name>")."""
        metrics = metrics or {}
        self._append({"step": step, "eval_loss": loss, **{f"eval_{k}": v for k, v in _finite(metrics).items()},
                      "time": round(time.time(), 3)})
        self.message(f"step {step}/{self.total_steps}  eval loss {loss:.4f}{self._shown(metrics)}")

    def message(self, text: str) -> None:
        """Print a line of its own (ending a terminal progress line first)."""
        if self.quiet:
            return
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the in-place progress line, if any."""
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


def _polyline(points, x_of, y_of) -> str:
    return " ".join(f"{x_of(x):.1f},{y_of(y):.1f}" for x, y in points)


def loss_svg(losses: list[float], eval_steps: list[int] = (), eval_losses: list[float] = (),
             width: int = 640, height: int = 360) -> str:
    """An SVG document plotting training loss per step (and eval loss points) on linear axes.

    Non-finite losses (skipped steps) are left out. Steps are 1-based (`losses[0]` is step 1).
    """
    train = [(i + 1, v) for i, v in enumerate(losses) if math.isfinite(v)]
    evals = [(s, v) for s, v in zip(eval_steps, eval_losses) if math.isfinite(v)]
    values = [v for _, v in train + evals] or [0.0, 1.0]
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1.0
    last = max([s for s, _ in train + evals] or [1])
    left, right, top, bottom = 60, 20, 30, 40
    x_of = lambda s: left + (s - 1) / max(1, last - 1) * (width - left - right)  # noqa: E731
    y_of = lambda v: top + (hi - v) / (hi - lo) * (height - top - bottom)  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="18" text-anchor="middle">loss per optimizer step</text>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{hi:.3g}</text>',
        f'<text x="{left - 6}" y="{height - bottom}" text-anchor="end">{lo:.3g}</text>',
        f'<text x="{left}" y="{height - bottom + 16}" text-anchor="middle">1</text>',
        f'<text x="{width - right}" y="{height - bottom + 16}" text-anchor="middle">{last}</text>',
        f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle">step</text>',
    ]
    if train:
        parts.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" '
                     f'points="{_polyline(train, x_of, y_of)}"><title>train loss</title></polyline>')
    for s, v in evals:
        parts.append(f'<circle cx="{x_of(s):.1f}" cy="{y_of(v):.1f}" r="3" fill="#d62728">'
                     f'<title>eval loss {v:.4f} at step {s}</title></circle>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_loss_svg(path: Path, losses, eval_steps=(), eval_losses=()) -> Path:
    """Write `loss_svg(...)` to `path` and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = loss_svg(list(losses), list(eval_steps), list(eval_losses))
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))  # a kill never leaves half a picture
    return path
