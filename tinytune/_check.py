"""Typed, bounded values at the boundary: one small checker per kind of value.

Every value read from a file (config.json, adapter_config.json, manifests, CLI config files) or given
by a user (`TrainConfig`, method configs) goes through one of these before it is used. Each checker
returns the value in its canonical type and raises `FieldError` naming `where` (the file and field,
e.g. "config.json (/ckpt/config.json) field 'hidden_size'"), what was expected and what was given.

`FieldError` is both a ValueError and a TypeError: a wrong type is a bad value of the field, and
callers that catch either keep working.
"""
from __future__ import annotations

import math
import numbers


class FieldError(ValueError, TypeError):
    """A value of the wrong type or out of range; the message names where it came from."""


def _given(value) -> str:
    return f"got {value!r} ({type(value).__name__})"


def integer(value, where: str, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int in [low, high]; bools, floats and strings are refused (2.0 is not an id)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise FieldError(f"{where} must be an integer{_range(low, high)}, {_given(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise FieldError(f"{where} must be an integer{_range(low, high)}, got {value}")
    return value


def number(value, where: str, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a finite float in the range (`low_open`/`high_open`: the bound itself excluded)."""
    bounds = _range(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise FieldError(f"{where} must be a finite number{bounds}, {_given(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise FieldError(f"{where} must be a finite number{bounds}, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise FieldError(f"{where} must be a finite number{bounds}, got {value}")
    return value


def boolean(value, where: str) -> bool:
    """`value` as a bool: only True and False (not 0/1, not "false")."""
    if not isinstance(value, bool):
        raise FieldError(f"{where} must be true or false, {_given(value)}")
    return value


def string(value, where: str, choices=None) -> str:
    """`value` as a str, one of `choices` when given."""
    if not isinstance(value, str):
        raise FieldError(f"{where} must be a string{_choices(choices)}, {_given(value)}")
    if choices is not None and value not in choices:
        raise FieldError(f"{where}={value!r} is not one of {list(choices)}")
    return value


def string_list(value, where: str, allow_empty: bool = False) -> list[str]:
    """`value` as a list of str (a tuple is accepted)."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise FieldError(f"{where} must be a list of strings, {_given(value)}")
    if not value and not allow_empty:
        raise FieldError(f"{where} must not be empty")
    return list(value)


def mapping(value, where: str) -> dict:
    """`value` as a dict (a JSON object)."""
    if not isinstance(value, dict):
        raise FieldError(f"{where} must be a JSON object, {_given(value)}")
    return value


def optional(check, value, where: str, *args, **kwargs):
    """None, or `check(value, where, ...)`."""
    return None if value is None else check(value, where, *args, **kwargs)


def _range(low, high, low_open: bool = False, high_open: bool = False) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return (" " + " and ".join(parts)) if parts else ""


def _choices(choices) -> str:
    return f" (one of {list(choices)})" if choices is not None else ""
