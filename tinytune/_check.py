"""Typed, bounded values at the boundary: one small checker per kind of value.

Every value read from a file (config.json, adapter_config.json, manifests, CLI config files) or given
by a user (`TrainConfig`, method configs) goes through one of these before it is used. Each checker
returns the value in its canonical type and raises `FieldError` naming `where` (the file and field,
e.g. "config.json (/ckpt/config.json) field 'hidden_size'"), what was expected and what was given:

    config.json (/ckpt/config.json) field 'hidden_size' must be an integer >= 1, got '64' (str)
    LoraConfig.rank must be an integer >= 1, got rank=2.5 (float)        # with name="rank"

Every checker takes two keyword options: `name` shows the given value as `name=value` (the habit of
the dataclass configs' messages), and `none=True` also accepts None (what `optional` passes).

`FieldError` is both a ValueError and a TypeError: a wrong type is a bad value of the field, and
callers that catch either keep working.
"""
from __future__ import annotations

import difflib
import math
import numbers
import os


class FieldError(ValueError, TypeError):
    """A value of the wrong type or out of range; the message names where it came from."""


def _given(value, name: str | None = None) -> str:
    shown = f"{name}={value!r}" if name else repr(value)
    return f"got {shown} ({type(value).__name__})"


def _fail(where: str, what: str, value, name: str | None, none: bool) -> FieldError:
    return FieldError(f"{where} must be {'None or ' if none else ''}{what}, {_given(value, name)}")


def integer(value, where: str, low: int | None = None, high: int | None = None, *,
            name: str | None = None, none: bool = False) -> int | None:
    """`value` as an int in [low, high]; bools, floats and strings are refused (2.0 is not an id)."""
    if none and value is None:
        return None
    what = f"an integer{_range(low, high)}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(where, what, value, name, none)
    if (low is not None and value < low) or (high is not None and value > high):
        raise _fail(where, what, value, name, none)
    return int(value)


def number(value, where: str, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, *,
           name: str | None = None, none: bool = False) -> float | None:
    """`value` as a finite float in the range (`low_open`/`high_open`: the bound itself excluded)."""
    if none and value is None:
        return None
    what = f"a finite number{_range(low, high, low_open, high_open)}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise _fail(where, what, value, name, none)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise _fail(where, what, value, name, none)
    return float(value)


def boolean(value, where: str, *, name: str | None = None, none: bool = False) -> bool | None:
    """`value` as a bool: only True and False (not 0/1, not "false")."""
    if none and value is None:
        return None
    if not isinstance(value, bool):
        raise _fail(where, "None, true or false" if none else "true or false", value, name, False)
    return value


def string(value, where: str, choices=None, *, name: str | None = None, none: bool = False) -> str | None:
    """`value` as a str, one of `choices` when given."""
    if none and value is None:
        return None
    if not isinstance(value, str):
        raise _fail(where, f"a string{_choices(choices)}", value, name, none)
    if choices is not None and value not in choices:
        raise FieldError(f"{where}={value!r} is not one of {list(choices)}{_closest(value, choices)}")
    return value


def string_list(value, where: str, allow_empty: bool = False, *,
                name: str | None = None, none: bool = False) -> list[str] | None:
    """`value` as a list of non-empty str (a tuple is accepted)."""
    if none and value is None:
        return None
    what = "a list of strings" if allow_empty else "a non-empty list of strings"
    if (not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value)
            or (not value and not allow_empty)):
        raise _fail(where, what, value, name, none)
    return list(value)


def string_or_list(value, where: str, *, name: str | None = None, none: bool = False) -> str | list[str] | None:
    """A module spec as files hold it: a non-empty str (a name or regex) or a list of non-empty str."""
    if none and value is None:
        return None
    if isinstance(value, str) and value:
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise _fail(where, "a string or a list of strings", value, name, none)


def integer_or_list(value, where: str, low: int | None = None, *,
                    name: str | None = None, none: bool = False) -> int | list[int] | None:
    """An int >= low, or a non-empty list of them (HF's `eos_token_id`)."""
    if none and value is None:
        return None
    what = f"an integer{_range(low, None)} or a non-empty list of them"
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or (low is not None and v < low)
                        for v in items):
        raise _fail(where, what, value, name, none)
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else int(value)


def path(value, where: str, *, name: str | None = None, none: bool = False):
    """A filesystem path: a non-empty str or an os.PathLike (returned as given)."""
    if none and value is None:
        return None
    if isinstance(value, os.PathLike) or (isinstance(value, str) and value):
        return value
    raise _fail(where, "a path (a non-empty string or os.PathLike)", value, name, none)


def mapping(value, where: str, *, name: str | None = None, none: bool = False) -> dict | None:
    """`value` as a dict (a JSON object)."""
    if none and value is None:
        return None
    if not isinstance(value, dict):
        raise _fail(where, "a JSON object", value, name, none)
    return value


def optional(check, value, where: str, *args, **kwargs):
    """None, or `check(value, where, ...)` (whose message then says "must be None or ...")."""
    return check(value, where, *args, none=True, **kwargs)


def known_keys(keys, known, where: str) -> None:
    """Raise FieldError naming the keys of `keys` not in `known`, the closest known key, and all known ones."""
    unknown = sorted(set(keys) - set(known))
    if unknown:
        raise FieldError(f"{where}: unknown key(s) {unknown}{_closest(unknown[0], known)}; "
                         f"known keys: {sorted(known)}")


class Fields:
    """A dict read from a file; `get` checks one field, naming the file and the field in errors.

        fields = Fields(data, "config.json", "/ckpt/config.json")
        size = fields.get("hidden_size", integer, low=1)
        eps = fields.get("rms_norm_eps", number, 0, low_open=True, default=1e-6)

    Args:
        data: the parsed JSON (refused unless a dict).
        file: the file's name, e.g. "adapter_config.json".
        source: its path (or any string naming it); None when unknown.
    """

    _MISSING = object()

    def __init__(self, data, file: str, source=None):
        self.label = f"{file} ({source})" if source is not None else file
        self.data = mapping(data, self.label)

    def where(self, key: str) -> str:
        """How errors name the field `key`: "<file> (<path>) field '<key>'"."""
        return f"{self.label} field {key!r}"

    def get(self, key: str, check, *args, default=_MISSING, **kwargs):
        """`check(data[key], where, *args, **kwargs)`; `default` when the key is absent (else FieldError)."""
        if key not in self.data:
            if default is Fields._MISSING:
                raise FieldError(f"{self.label} lacks the field {key!r}")
            return default
        return check(self.data[key], self.where(key), *args, **kwargs)


def _range(low, high, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def _choices(choices) -> str:
    return f" (one of {list(choices)})" if choices is not None else ""


def _closest(value: str, choices) -> str:
    close = difflib.get_close_matches(value, [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
