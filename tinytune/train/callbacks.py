"""Callbacks of `fit`: plain callables `cb(step, history)` and `Callback` objects with event methods.

A plain callable runs after every optimizer step (and after that step's evaluation, if any);
returning True stops training. A `Callback` object may define any of

- `on_step(step, history, metrics)`: after each optimizer step, before it is logged; `metrics` is
  that step's record so far (task metrics and "grad_norm"). Return None, True (stop), False, or a
  dict {name: number} of extra metrics added to the step's record (metrics.jsonl, `history.metrics`,
  the progress output and the trackers).
- `on_evaluate(step, history, metrics)`: after each evaluation, before it is logged; `metrics` holds
  "loss" and the evaluation's other metrics. Return None or a dict of extra metrics for that
  evaluation's record (`history.eval_metrics`, metrics.jsonl as "eval_<name>", the trackers).
- `on_save(step, history, path)`: after a checkpoint is committed; `path` is its directory.

To stop and return metrics at once, set `history.stop_requested = True` in any callback: training
then stops after the current step, as when `on_step` returns True (a checkpoint is saved with `out_dir`).
"""
from __future__ import annotations

import math

RESERVED = frozenset({"step", "loss", "lr", "tokens_per_s", "time", "grad_norm"})  # fit's own fields


class Callback:
    """Base class of callback objects for `fit(callbacks=[...])`: every event method does nothing.

    Override the ones you need; see the module docstring for when each runs and what it may return.
    """

    def on_step(self, step: int, history, metrics: dict):
        """After optimizer step `step`: None, True/False (stop?), or a dict of extra step metrics."""
        return None

    def on_evaluate(self, step: int, history, metrics: dict):
        """After the evaluation at `step`: None or a dict of extra eval metrics."""
        return None

    def on_save(self, step: int, history, path) -> None:
        """After the checkpoint of `step` was committed into the directory `path`."""
        return None


def _is_object(callback) -> bool:
    return isinstance(callback, Callback) or any(
        hasattr(callback, name) for name in ("on_step", "on_evaluate", "on_save"))


def _name(callback) -> str:
    return getattr(callback, "__qualname__", None) or type(callback).__qualname__


def _extra(callback, event: str, value, allow_stop: bool) -> tuple[bool, dict]:
    """(stop?, extra metrics) from what `callback`'s `event` returned; TypeError for anything else."""
    if value is None or (allow_stop and isinstance(value, bool)):
        return bool(value), {}
    if isinstance(value, dict):
        for key, number in value.items():
            if (not isinstance(key, str) or isinstance(number, bool)
                    or not isinstance(number, (int, float))):
                break
            if key in RESERVED:
                raise ValueError(f"callback {_name(callback)}.{event} returned the metric {key!r}, which fit "
                                 f"records itself (reserved: {sorted(RESERVED)}); choose another name")
        else:
            return False, {k: float(v) if math.isfinite(v) else math.nan for k, v in value.items()}
    wanted = "None, True/False or a dict {name: number}" if allow_stop else "None or a dict {name: number}"
    raise TypeError(f"callback {_name(callback)}.{event} returned "
                    f"{value!r} ({type(value).__name__}); expected {wanted}")


class Callbacks:
    """The callbacks of one `fit` call, run at its events (`fit` builds it from `callbacks=`)."""

    def __init__(self, callbacks=()):
        self.objects, self.plain = [], []
        for callback in callbacks:
            if _is_object(callback):
                self.objects.append(callback)
            elif callable(callback):
                self.plain.append(callback)
            else:
                raise TypeError(f"fit(callbacks=...): {callback!r} ({type(callback).__name__}) is neither "
                                "callable nor a tt.train.Callback")

    def _run(self, event: str, step: int, history, arg, allow_stop: bool) -> tuple[bool, dict]:
        stop, extra = False, {}
        for callback in self.objects:  # every callback runs, whichever asks to stop
            method = getattr(callback, event, None)
            if method is not None:
                asked, more = _extra(callback, event, method(step, history, arg), allow_stop)
                stop, extra = stop or asked, {**extra, **more}
        return stop, extra

    def step(self, step: int, history, metrics: dict) -> tuple[bool, dict]:
        """Run every `on_step`: (stop asked?, extra metrics)."""
        return self._run("on_step", step, history, dict(metrics), allow_stop=True)

    def evaluate(self, step: int, history, metrics: dict) -> dict:
        """Run every `on_evaluate`: the extra eval metrics."""
        return self._run("on_evaluate", step, history, dict(metrics), allow_stop=False)[1]

    def after_step(self, step: int, history) -> bool:
        """Run the plain callables `cb(step, history)` (after the step's evaluation): stop asked?"""
        stop = False
        for callback in self.plain:
            value = callback(step, history)
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"callback {_name(callback)} returned {value!r} ({type(value).__name__}); a plain "
                                "callback returns None or True/False (True stops); metrics come from a "
                                "tt.train.Callback's on_step")
            stop = stop or bool(value)
        return stop

    def save(self, step: int, history, path) -> None:
        """Run every `on_save` with the committed checkpoint directory."""
        for callback in self.objects:
            method = getattr(callback, "on_save", None)
            if method is not None:
                method(step, history, path)
