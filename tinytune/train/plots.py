"""The loss curve `fit` leaves in `out_dir/loss.png` (matplotlib, optional: `pip install matplotlib`).

Drawn on a `matplotlib.figure.Figure` with the Agg canvas, never through pyplot, so no global state
(open figures, the interactive backend) is touched.
"""
from __future__ import annotations

import math
from pathlib import Path

from .._files import atomic_write

LOG_SCALE_DECADES = 1.5  # a y axis spanning more than this many powers of ten is drawn logarithmic


def smooth(values, window: int) -> list[float]:
    """Trailing mean of the finite `values` over the last `window` entries (NaN where none is finite)."""
    window, sums, counts = max(1, int(window)), [0.0], [0]  # prefix sums: O(n) for any window
    for v in values:
        finite = math.isfinite(v)
        sums.append(sums[-1] + (v if finite else 0.0))
        counts.append(counts[-1] + finite)
    out = []
    for i in range(1, len(sums)):
        lo = max(0, i - window)
        n = counts[i] - counts[lo]
        out.append((sums[i] - sums[lo]) / n if n else math.nan)
    return out


def use_log_scale(values, decades: float = LOG_SCALE_DECADES) -> bool:
    """Whether the finite positive `values` span more than `decades` powers of ten (then a log y axis reads best)."""
    positive = [v for v in values if math.isfinite(v) and v > 0]
    if len(positive) < 2:
        return False
    return math.log10(max(positive) / min(positive)) > decades


def loss_figure(losses, eval_steps=(), eval_losses=(), title: str = "loss", window: int = 10):
    """A `matplotlib.figure.Figure`: train loss per step (raw, faint; smoothed over `window` steps) and eval loss.

    Steps are 1-based (`losses[0]` is step 1); non-finite losses (skipped steps) are left out.

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    losses = [float(v) for v in losses]
    steps = list(range(1, len(losses) + 1))
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot()
    if losses:
        ax.plot(steps, losses, color="C0", alpha=0.3, linewidth=1, label="train loss")
        if len(losses) > 1 and window > 1:
            ax.plot(steps, smooth(losses, window), color="C0", linewidth=2, label=f"train loss ({window}-step mean)")
    evals = [(s, float(v)) for s, v in zip(eval_steps, eval_losses) if math.isfinite(v)]
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", color="C3", markersize=4, label="eval loss")
    if use_log_scale(losses + [v for _, v in evals]):
        ax.set_yscale("log")
    else:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if losses or evals:
        ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    return fig


def write_loss_png(path: Path, losses, eval_steps=(), eval_losses=(), title: str = "loss",
                   window: int = 10) -> Path | None:
    """Write `loss_figure(...)` as a PNG to `path` (atomically) and return it; None without matplotlib."""
    try:
        fig = loss_figure(losses, eval_steps, eval_losses, title=title, window=window)
    except ImportError:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # the figure renders through Agg, whatever pyplot's backend is
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))  # a kill never leaves half a picture
    return path


_told_no_matplotlib: list[bool] = []


def write_loss_curve(out_dir: Path, history, title: str, window: int, say) -> Path | None:
    """`fit`'s end: `out_dir/loss.png` from `history`; without matplotlib, `say` (once per process) where
    the numbers are instead (metrics.jsonl). Returns the picture's path, or None."""
    out_dir = Path(out_dir)
    path = write_loss_png(out_dir / "loss.png", history.losses, history.eval_steps, history.eval_losses,
                          title=title, window=window)
    if path is None and not _told_no_matplotlib:
        _told_no_matplotlib.append(True)
        say(f"no loss.png: matplotlib is not installed (pip install matplotlib, or tinytune[plot]); the losses "
            f"are in {out_dir / 'metrics.jsonl'}")
    return path
