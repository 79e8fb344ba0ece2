"""Metrics as `{name: (sum, n)}`: sums that add up exactly over micro-batches, accumulation and processes (the
reported value is the total sum over the total n)."""
from __future__ import annotations

Metrics = dict[str, tuple[float, int]]


def add_metrics(total: Metrics, more: Metrics) -> Metrics:
    """`total` with each of `more`'s (sum, n) added in (a new dict)."""
    out = dict(total)
    for key, (s, n) in more.items():
        old = out.get(key, (0.0, 0))
        out[key] = (old[0] + float(s), old[1] + int(n))
    return out


def metric_means(metrics: Metrics) -> dict[str, float]:
    """{name: sum / n} (NaN where n is 0), keys sorted."""
    return {k: (s / n if n else float("nan")) for k, (s, n) in sorted(metrics.items())}
