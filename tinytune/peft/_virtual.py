"""What prompt tuning and prefix tuning share: P *virtual* positions in front of the real tokens.

Both methods act through forward hooks on the model's root module (no tinytune.models import), and
both rely on a small calling protocol that tinytune's `CausalLM` and Hugging Face causal LMs follow:

- the forward takes its inputs by keyword name: `input_ids` / `inputs_embeds` (B, T[, d]),
  `attention_mask` (B, S) over cached + new tokens (1 = real, 0 = padding) or a boolean 4-D
  (B, 1, T, T) mask, `position_ids` (B, T), and a KV cache as `cache` (tinytune's `KVCache`,
  whose `.length` counts what it holds, or a transformers `Cache` with `get_seq_length()`) or
  `past_key_values`;
- the root module carries the int attribute `num_virtual_tokens` (set here): how many positions
  come before the real tokens. Real tokens sit at positions P, P+1, ... (as PEFT places them), and
  `tinytune.generate` reserves P more cache slots and positions for it.
"""
from __future__ import annotations

import contextlib
import inspect

import torch
import torch.nn as nn

VIRTUAL_TOKENS_ATTR = "num_virtual_tokens"
# PEFT task types whose files these methods read: decoders, with or without a classification head
TASK_TYPES = (None, "CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS")
CACHE_NAMES = ("cache", "past_key_values")
_NOT_STRIPPED = ("attentions", "cache", "past_key_values", "loss")


def forward_signature(model: nn.Module, needed: tuple[str, ...], method: str, hint: str = "") -> inspect.Signature:
    """The signature of `model.forward`, checked to name every parameter in `needed`.

    Raises:
        TypeError: a needed parameter is not an explicit parameter of the forward (named in the message).
    """
    signature = inspect.signature(model.forward)
    missing = [name for name in needed if name not in signature.parameters]
    if missing:
        raise TypeError(f"{method} needs a model whose forward takes {', '.join(map(repr, needed))} by name; "
                        f"{type(model).__name__}.forward has no {', '.join(map(repr, missing))}{hint}")
    return signature


def call_kwargs(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """One forward call's arguments, all by name (positional ones bound to their parameter names)."""
    bound = signature.bind_partial(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"cannot add virtual tokens to a call with extra positional arguments {value!r}")
        else:
            out[name] = value
    return out


def cached_length(kwargs: dict) -> int:
    """Positions already in the call's KV cache (0 without one): `.length`, `get_seq_length()` or a
    legacy tuple of per-layer (k, v) of shape (B, h, S, hd)."""
    for name in CACHE_NAMES:
        cache = kwargs.get(name)
        if cache is None:
            continue
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        if hasattr(cache, "length"):
            return int(cache.length)
        if isinstance(cache, (tuple, list)):
            return int(cache[0][0].shape[-2]) if len(cache) else 0
        raise TypeError(f"cannot tell how many positions the {name}={type(cache).__name__} holds "
                        "(expected .length, get_seq_length() or a tuple of (k, v) tensors)")
    return 0


def new_tokens(kwargs: dict) -> tuple[int, int, torch.device]:
    """(B, T, device) of the call's `input_ids` (B, T) or `inputs_embeds` (B, T, d).

    Raises:
        ValueError: neither is given.
    """
    ref = kwargs.get("input_ids")
    ref = ref if ref is not None else kwargs.get("inputs_embeds")
    if ref is None:
        raise ValueError("the call has neither input_ids nor inputs_embeds")
    return ref.shape[0], ref.shape[1], ref.device


def real_positions(kwargs: dict, past: int, T: int, device) -> torch.Tensor:
    """Positions (B or 1, T) of the T new tokens counted over real tokens only (left padding counts
    nothing), before any virtual offset: the caller's `position_ids` when given, else derived from a
    2-D `attention_mask` over cached + new tokens, else `past .. past + T - 1` (tinytune's rule)."""
    given = kwargs.get("position_ids")
    if given is not None:
        return given
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + T]  # (B, T)
    return torch.arange(past, past + T, device=device)[None]  # (1, T)


def strip_front(out, n: int, length: int):
    """`out` with the first `n` positions cut from every (B, length, ...) tensor in it.

    Handles a tensor, a tuple/list of outputs, and a dict-like output (a transformers `ModelOutput`:
    `logits`, `last_hidden_state`, `hidden_states` are cut; `loss`, `attentions` and caches are not).
    """
    if isinstance(out, torch.Tensor):
        return out[:, n:] if out.dim() >= 2 and out.shape[1] == length else out
    if isinstance(out, dict):
        for key in list(out.keys()):
            if key not in _NOT_STRIPPED and out[key] is not None:
                out[key] = strip_front(out[key], n, length)
        return out
    if isinstance(out, (tuple, list)) and not hasattr(out, "_fields"):
        return type(out)(strip_front(item, n, length) for item in out)
    return out


def check_ids(ids: torch.Tensor, embedding: nn.Module) -> None:
    """Refuse non-integer token ids and ids outside an `nn.Embedding`'s rows, naming the id and its position
    (a hook that embeds ids itself bypasses the model's own checks). Skipped under torch.compile."""
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        dtype = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"input_ids must be an int64 or int32 tensor of token ids, got {dtype}")
    if not isinstance(embedding, nn.Embedding) or ids.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = (int(v) for v in torch.aminmax(ids))
    if low < 0 or high >= embedding.num_embeddings:
        bad = low if low < 0 else high
        where = tuple(int(i) for i in (ids == bad).nonzero()[0])
        raise ValueError(f"input_ids holds id {bad} at {where}, outside the vocabulary "
                         f"[0, {embedding.num_embeddings}) of the embedding")


def trainable_dtype(model: nn.Module) -> torch.dtype:
    """fp32 when the model's floating weights are half precision (adapters train in fp32), else theirs."""
    ref = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = ref.dtype if ref is not None else torch.get_default_dtype()
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    ref = next(model.parameters(), None)
    return ref.device if ref is not None else torch.device("cpu")


def check_not_virtual(model: nn.Module, method: str) -> None:
    """Raise ValueError when `model` already has prompt or prefix tuning (they cannot be stacked)."""
    current = getattr(model, "_tinytune_virtual_method", None)
    if current is not None:
        raise ValueError(f"{method}: {type(model).__name__} already has {current} applied; a model takes one "
                         "virtual-token method once (build a fresh model to apply it again)")


def config_value(model: nn.Module, names: tuple[str, ...]):
    """The first of `names` set (not None) on `model.config` (an object or a dict); None when none is."""
    config = getattr(model, "config", None)
    for name in names:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is not None:
            return value
    return None


@contextlib.contextmanager
def switched_off(model: nn.Module, module: nn.Module):
    """Within: the method `module` (a soft prompt or prefix encoder) does nothing and the model reports
    no virtual tokens, so it computes exactly its base; after: both as they were."""
    was, count = module.enabled, getattr(model, VIRTUAL_TOKENS_ATTR)
    module.enabled = False
    setattr(model, VIRTUAL_TOKENS_ATTR, 0)
    try:
        yield
    finally:
        module.enabled = was
        setattr(model, VIRTUAL_TOKENS_ATTR, count)


def load_embeddings(param: torch.Tensor, sd: dict[str, torch.Tensor], key: str, strict: bool, what: str,
                    shape_note: str = "") -> tuple[list[str], list[str]]:
    """Copy `sd[key]` into `param` (the one tensor prompt and prefix tuning save), strictly.

    Returns:
        (missing, unexpected) key lists (both empty under strict=True).

    Raises:
        ValueError: a mis-shaped tensor (`shape_note` says what the shape means), or, with strict, the
            key missing or others present. Nothing is copied when it raises.
    """
    missing = [] if key in sd else [key]
    unexpected = sorted(k for k in sd if k != key)
    problems = [f"missing keys: {missing}"] if strict and missing else []
    problems += [f"unexpected keys: {unexpected}"] if strict and unexpected else []
    if not missing and tuple(sd[key].shape) != tuple(param.shape):
        problems.append(f"mis-shaped {key!r}: given {tuple(sd[key].shape)}, model {tuple(param.shape)}{shape_note}")
    if problems:
        raise ValueError(f"cannot load {what}; " + "; ".join(problems))
    if not missing:
        with torch.no_grad():
            param.copy_(sd[key].to(device=param.device, dtype=param.dtype))
    return missing, unexpected


def check_virtual_sizes(cfg, tensors: dict[str, torch.Tensor], where) -> None:
    """A soft prompt's or prefix's file holds `prompt_embeddings` with `num_virtual_tokens` rows, checked
    BEFORE the method allocates anything (`Method.check_sizes` of prompt and prefix tuning)."""
    shape = tensors["prompt_embeddings"].shape if "prompt_embeddings" in tensors else None
    if shape is None or len(shape) != 2 or shape[0] != cfg.num_virtual_tokens:
        raise ValueError(f"load_adapter: {where / 'adapter_model.safetensors'} tensor 'prompt_embeddings' has shape "
                         f"{None if shape is None else tuple(shape)}, but {where / 'adapter_config.json'} says "
                         f"num_virtual_tokens={cfg.num_virtual_tokens}")


def refuse_other_virtual_tokens(what: str, have: int, cfg, where) -> None:
    """Refuse a file whose `num_virtual_tokens` differs from the `have` tokens on the model (`check_compatible`)."""
    if have != cfg.num_virtual_tokens:
        from ._method import refuse_mixed

        refuse_mixed(what, f"num_virtual_tokens={have}", f"num_virtual_tokens={cfg.num_virtual_tokens}", where)
