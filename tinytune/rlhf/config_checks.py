"""Checks the online-RL configs (`GRPOConfig`, `PPOConfig`) share: the sampling fields of `tt.generate` and
the optional lists (stop ids, reward weights), each named as `Config.field` in its error."""
from __future__ import annotations

from .. import _check


def optional_list(owner: str, name: str, values, check) -> None:
    """None or a non-empty list whose every entry passes `check` (ValueError naming `owner.name` otherwise)."""
    if values is None:
        return
    try:
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError
        for v in values:
            check(v)
    except (TypeError, ValueError):
        kind = "token ids" if name == "stop_token_ids" else "finite numbers"
        raise ValueError(f"{owner}.{name} must be None or a non-empty list of {kind}, got {values!r}") from None


def check_sampling(cfg, owner: str) -> None:
    """`max_new_tokens`, `temperature`, `top_k`, `top_p`, `stop_token_ids` and `reward_weights` of `cfg`."""
    _check.integer(cfg.max_new_tokens, f"{owner}.max_new_tokens", 1)
    _check.number(cfg.temperature, f"{owner}.temperature", 0, low_open=True)
    _check.integer(cfg.top_k, f"{owner}.top_k", 1, none=True)
    _check.number(cfg.top_p, f"{owner}.top_p", 0, 1, low_open=True)
    optional_list(owner, "stop_token_ids", cfg.stop_token_ids, lambda v: _check.integer(v, "", 0))
    optional_list(owner, "reward_weights", cfg.reward_weights, lambda v: _check.number(v, ""))
