"""Prefix tuning (Li & Liang, 2021): learned keys and values of P virtual tokens in every layer.

    cfg = prefix.PrefixConfig(num_virtual_tokens=20)              # or reparam_hidden=512
    names = prefix.apply(model, cfg)                              # hooks the model; freezes every base weight
    prefix.fold(model)                                            # after training with reparam_hidden

Every layer's attention runs over [K_prefix; K] and [V_prefix; V], where K_prefix, V_prefix
(nkv, P, hd) are learned and seen by every query (no mask, no rotary embedding: they are stored as
attention sees them). Trainable: L * 2 * P * nkv * hd. With `reparam_hidden=h` they are computed by
Li & Liang's MLP from P embeddings: E (P, d) -> Linear(d, h) -> tanh -> Linear(h, L * 2 * nkv * hd),
P d + (d h + h) + (h + 1) L 2 nkv hd trainable parameters; `fold` computes the prefixes once and
drops the MLP (for inference and saving).

Protocol (what the model must offer; tinytune's `CausalLM` does):
- `forward(..., position_ids=, prefix_kv=)`: `prefix_kv` is per layer a (k, v) pair of shape
  (B or 1, nkv, P, hd) attended by every query, on top of the attention mask and any KV cache;
  positions are the caller's: the hook passes real tokens at P, P + 1, ... (PEFT's placement);
- `model.config` with the layer count, key/value heads and head size, read by name: `num_layers`
  (or `num_hidden_layers`), `num_kv_heads` (or `num_key_value_heads`; default: the query heads),
  `head_dim`, or `hidden_size` / `num_heads` (or `num_attention_heads`).
Hugging Face models take their prefix through the KV cache instead and do not offer `prefix_kv`:
use PEFT's prefix tuning there (adapter files move between the two, see below).

The state dict is PEFT's: `{"prompt_embeddings": (P, L * 2 * nkv * hd)}`, the prefixes flattened per
virtual token as (layer, key|value, head, head_dim), keys before values, with `peft_type:
"PREFIX_TUNING"` and PEFT's GQA convention (token_dim = nkv * hd, num_attention_heads = nkv).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .. import _check
from ._method import Method
from .modules_to_save import applies, check_names, read_field
from ._virtual import (
    TASK_TYPES, check_virtual_sizes,
    refuse_other_virtual_tokens,
    VIRTUAL_TOKENS_ATTR, cached_length, call_kwargs, check_not_virtual, config_value, forward_signature,
    load_embeddings, model_device, new_tokens, real_positions, switched_off, trainable_dtype,
)

__all__ = [
    "PrefixConfig", "PrefixDims", "PrefixEncoder", "apply", "fold", "disabled", "state_dict", "load_state_dict",
    "prefix_dims", "prefix_encoder", "peft_config_dict", "config_from_peft", "PEFT_TYPE",
]

PEFT_TYPE = "PREFIX_TUNING"
STATE_KEY = "prompt_embeddings"
MODULE_NAME = "prefix_encoder"
_HINT = " (tinytune's CausalLM does; for a Hugging Face model use peft's PrefixTuningConfig)"


def _check_positive(value, field: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"PrefixConfig.{field} must be an integer >= 1{' or None' if allow_none else ''}, "
                         f"got {field}={value!r}")


@dataclass
class PrefixConfig:
    """What `apply` does. Validated on construction (ValueError naming the field).

    Attributes:
        num_virtual_tokens: P >= 1, the prefix length in every layer.
        reparam_hidden: None for plain learned prefixes (N(0, 1) at init, as PEFT), or h >= 1 for the
            MLP reparameterisation (PEFT's `prefix_projection=True`, `encoder_hidden_size=h`).
        modules_to_save: modules trained whole and saved with the prefixes (PEFT's field; names equal
            or a dotted suffix); see tinytune/peft/modules_to_save.py.
    """

    num_virtual_tokens: int = 20
    reparam_hidden: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        self.modules_to_save = check_names(self.modules_to_save, "PrefixConfig.modules_to_save")
        _check_positive(self.num_virtual_tokens, "num_virtual_tokens")
        _check_positive(self.reparam_hidden, "reparam_hidden", allow_none=True)


@dataclass(frozen=True)
class PrefixDims:
    """The shapes prefix tuning needs from a model: L layers, nkv key/value heads of size hd, width d."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def token_dim(self) -> int:
        """nkv * hd: one virtual token's key (or value) in one layer (PEFT's `token_dim`)."""
        return self.num_kv_heads * self.head_dim

    @property
    def width(self) -> int:
        """L * 2 * nkv * hd: one virtual token's keys and values in every layer."""
        return self.num_layers * 2 * self.token_dim


def prefix_dims(model: nn.Module) -> PrefixDims:
    """Read L, nkv, hd and d from `model.config` by name (see the module docstring).

    Raises:
        ValueError: `model.config` is missing, or lacks the layer count or the head size (named).
    """
    if getattr(model, "config", None) is None:
        raise ValueError(f"prefix tuning reads the layer and head shapes from model.config; "
                         f"{type(model).__name__} has no config")
    layers = config_value(model, ("num_layers", "num_hidden_layers", "n_layer"))
    heads = config_value(model, ("num_heads", "num_attention_heads", "n_head"))
    hidden = config_value(model, ("hidden_size", "n_embd"))
    head_dim = config_value(model, ("head_dim",))
    if head_dim is None and hidden is not None and heads is not None:
        head_dim = hidden // heads
    kv_heads = config_value(model, ("num_kv_heads", "num_key_value_heads")) or heads
    missing = [name for name, value in (("num_layers (or num_hidden_layers)", layers),
                                        ("num_kv_heads (or num_key_value_heads, num_heads)", kv_heads),
                                        ("head_dim (or hidden_size and num_heads)", head_dim)) if value is None]
    if missing:
        raise ValueError(f"prefix tuning: {type(model).__name__}.config lacks {', '.join(missing)}")
    hidden = hidden if hidden is not None else heads * head_dim if heads else kv_heads * head_dim
    return PrefixDims(int(layers), int(kv_heads), int(head_dim), int(hidden))


class PrefixEncoder(nn.Module):
    """The learned prefixes (or their MLP) and the forward pre-hook that hands them to the model.

    Parameters: plain, `embedding` (P, L * 2 * nkv * hd); reparameterised, `embedding` (P, d) and
    `transform` = Linear(d, h), Tanh, Linear(h, L * 2 * nkv * hd).
    """

    def __init__(self, cfg: PrefixConfig, dims: PrefixDims, signature, dtype: torch.dtype, device):
        super().__init__()
        P, h = cfg.num_virtual_tokens, cfg.reparam_hidden
        self.cfg, self.dims, self._signature = cfg, dims, signature
        self.enabled = True  # set only by tinytune.peft.prefix.disabled()
        width = dims.width if h is None else dims.hidden_size
        self.embedding = nn.Parameter(torch.randn(P, width, device=device).to(dtype))  # PEFT: nn.Embedding's N(0, 1)
        self.transform = None if h is None else nn.Sequential(
            nn.Linear(dims.hidden_size, h), nn.Tanh(), nn.Linear(h, dims.width)).to(device=device, dtype=dtype)

    @property
    def folded(self) -> bool:
        """Whether the parameters are the prefixes themselves (no MLP)."""
        return self.transform is None

    def flat(self) -> torch.Tensor:
        """(P, L * 2 * nkv * hd): every layer's key and value prefixes, PEFT's saved layout."""
        return self.embedding if self.transform is None else self.transform(self.embedding)

    def layer_prefixes(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k, v), each (1, nkv, P, hd), views of `flat()` (computed once per call)."""
        d = self.dims
        x = self.flat()  # (P, L * 2 * nkv * hd)
        x = x.view(x.shape[0], 2 * d.num_layers, d.num_kv_heads, d.head_dim).permute(1, 2, 0, 3)  # (2L, nkv, P, hd)
        return [(x[2 * i][None], x[2 * i + 1][None]) for i in range(d.num_layers)]

    def pre_hook(self, model: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook (with kwargs): add `prefix_kv` and put the real tokens at positions P, P+1, ..."""
        if not self.enabled:
            return None
        kw = call_kwargs(self._signature, args, kwargs)
        if kw.get("prefix_kv") is not None:
            raise ValueError("prefix_kv was passed to a model with prefix tuning applied; use prefix.disabled(model) "
                             "to pass your own")
        B, T, device = new_tokens(kw)
        P = self.embedding.shape[0]
        kw["position_ids"] = real_positions(kw, cached_length(kw), T, device) + P  # (B or 1, T)
        kw["prefix_kv"] = self.layer_prefixes()
        return (), kw

    def extra_repr(self) -> str:
        """The shapes and switches shown in `print(model)`."""
        d = self.dims
        return (f"num_virtual_tokens={self.embedding.shape[0]}, layers={d.num_layers}, kv_heads={d.num_kv_heads}, "
                f"head_dim={d.head_dim}, reparam_hidden={self.cfg.reparam_hidden}, folded={self.folded}")


@applies
def apply(model: nn.Module, cfg: PrefixConfig) -> list[str]:
    """Give `model` trainable per-layer prefixes, in place, and freeze every other parameter.

    Registers a `PrefixEncoder` as `model.prefix_encoder`, a forward pre-hook on `model`, and sets
    `model.num_virtual_tokens = P` (read by `tinytune.generate` for the position limit).

    Returns:
        ["prefix_encoder"], the name of the module holding the trainable parameters.

    Raises:
        TypeError: cfg is not a PrefixConfig; the model's forward takes no `prefix_kv` or
            `position_ids` (the protocol in the module docstring; e.g. a transformers model).
        ValueError: the model already has prefix or prompt tuning; `model.config` lacks a shape.
    """
    if not isinstance(cfg, PrefixConfig):
        raise TypeError(f"prefix.apply expects a prefix.PrefixConfig, got {type(cfg).__name__}")
    check_not_virtual(model, "prefix.apply")
    signature = forward_signature(model, ("prefix_kv", "position_ids"), "prefix tuning", _HINT)
    dims = prefix_dims(model)
    if hasattr(model, MODULE_NAME):
        raise ValueError(f"prefix.apply: {type(model).__name__} already has an attribute {MODULE_NAME!r}")
    model.requires_grad_(False)
    encoder = PrefixEncoder(cfg, dims, signature, trainable_dtype(model), model_device(model))
    model.add_module(MODULE_NAME, encoder)
    encoder._handle = model.register_forward_pre_hook(encoder.pre_hook, with_kwargs=True)
    setattr(model, VIRTUAL_TOKENS_ATTR, cfg.num_virtual_tokens)
    model._tinytune_virtual_method = "prefix tuning"
    return [MODULE_NAME]


def prefix_encoder(model: nn.Module) -> PrefixEncoder:
    """The model's `PrefixEncoder`.  Raises: ValueError: `prefix.apply` was not called on it."""
    module = getattr(model, MODULE_NAME, None)
    if not isinstance(module, PrefixEncoder):
        raise ValueError(f"{type(model).__name__} has no prefix tuning; call prefix.apply(model, cfg) first")
    return module


@torch.no_grad()
def fold(model: nn.Module) -> nn.Module:
    """Replace the MLP by the prefixes it computes (one way); a plain or folded model is left as is.

    The folded `embedding` (P, L * 2 * nkv * hd) stays trainable; an optimizer built before holds the
    old parameters. Returns: model.  Raises: ValueError: no prefix tuning.
    """
    encoder = prefix_encoder(model)
    if not encoder.folded:
        prefixes = encoder.flat().detach().clone()
        encoder.transform = None
        encoder.embedding = nn.Parameter(prefixes)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside the block the model computes exactly its base (no prefixes, no position offset).

    Raises: ValueError: the model has no prefix tuning.
    """
    with switched_off(model, prefix_encoder(model)):
        yield model


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Returns: `{"prompt_embeddings": (P, L * 2 * nkv * hd)}` as PEFT saves it: the prefixes, computed
    through the MLP when not folded (the model is not changed), detached.

    Raises: ValueError: the model has no prefix tuning.
    """
    encoder = prefix_encoder(model)
    with torch.no_grad():
        return {STATE_KEY: encoder.flat().detach()}


def load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], strict: bool = True) -> tuple[list[str], list[str]]:
    """Copy the prefixes from `sd` (`{"prompt_embeddings": (P, L * 2 * nkv * hd)}`, PEFT's layout).

    Returns:
        (missing, unexpected) key lists (both empty under strict=True).

    Raises:
        ValueError: no prefix tuning; an unfolded MLP (saved prefixes cannot be turned back into
            MLP weights: `fold(model)` first, or apply with reparam_hidden=None); a mis-shaped
            tensor; with strict, the key missing or others present. Nothing is copied when it raises.
    """
    encoder = prefix_encoder(model)
    if not encoder.folded:
        raise ValueError("prefix.load_state_dict: the model computes its prefixes with an MLP (reparam_hidden="
                         f"{encoder.cfg.reparam_hidden}); saved prefixes cannot be loaded into it: call "
                         "prefix.fold(model) first, or apply PrefixConfig(reparam_hidden=None)")
    return load_embeddings(encoder.embedding, sd, STATE_KEY, strict, "the prefix-tuning state dict",
                           " (P, L * 2 * nkv * hd)")


def peft_config_dict(model: nn.Module) -> dict:
    """The adapter_config.json dict in PEFT's PREFIX_TUNING format for a model with prefix tuning.

    As PEFT writes it: `prefix_projection` / `encoder_hidden_size` record an MLP training
    (reparam_hidden), while the weights are always the prefixes themselves (`state_dict`), which
    PEFT loads for inference (PEFT refuses to load any prompt-learning adapter as trainable).

    Raises: ValueError: the model has no prefix tuning.
    """
    encoder = prefix_encoder(model)
    d = encoder.dims
    return {
        "peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "num_virtual_tokens": encoder.cfg.num_virtual_tokens,
        "token_dim": d.token_dim, "num_attention_heads": d.num_kv_heads, "num_layers": d.num_layers,
        "num_transformer_submodules": 1, "encoder_hidden_size": encoder.cfg.reparam_hidden or d.token_dim,
        "prefix_projection": encoder.cfg.reparam_hidden is not None,
        "init_weights": None, "inference_mode": True, "modules_to_save": None, "base_model_name_or_path": None,
        "revision": None, "auto_mapping": None,
    }


_PEFT_FIELDS = {  # PeftConfig's, PromptLearningConfig's and PrefixTuningConfig's fields (peft 0.21)
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "modules_to_save", "num_virtual_tokens", "token_dim", "num_transformer_submodules",
    "num_attention_heads", "num_layers", "encoder_hidden_size", "prefix_projection", "init_weights",
}


def config_from_peft(d: dict, path: str | os.PathLike | None = None) -> PrefixConfig:
    """The PrefixConfig for a PEFT adapter_config.json dict (written by PEFT or by `peft_config_dict`).

    PEFT saves the prefixes themselves even when it trained them through an MLP
    (`prefix_projection: true`), so the config is always a plain one (reparam_hidden=None).

    Args:
        d: the parsed adapter_config.json.
        path: the adapter DIRECTORY it was read from, named in error messages (None: just the file name).

    Raises:
        ValueError: peft_type is not "PREFIX_TUNING"; a task_type not in `TASK_TYPES`; an unknown
            field; num_transformer_submodules other than 1; a field of the
            wrong type or out of range (`_check.FieldError`, also a TypeError). Each names the file and
            the field.
    """
    fields = _check.Fields(d, "adapter_config.json", None if path is None else Path(path) / "adapter_config.json")
    where = f"config_from_peft: {fields.label}"
    if d.get("peft_type") != PEFT_TYPE:
        raise ValueError(f"{where}: peft_type={d.get('peft_type')!r}; expected {PEFT_TYPE!r}")
    unknown = sorted(set(d) - _PEFT_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown PREFIX_TUNING config fields {unknown}; "
                         f"known: {sorted(_PEFT_FIELDS)}")
    if d.get("task_type") not in TASK_TYPES:
        raise ValueError(f"{where}: task_type={d['task_type']!r}; tinytune's prefix tuning is for decoders: "
                         f"one of {list(TASK_TYPES)}")
    if fields.get("num_transformer_submodules", _check.integer, 1, none=True, default=None) not in (None, 1):
        raise ValueError(f"{where}: num_transformer_submodules={d['num_transformer_submodules']!r}; "
                         "only 1 (decoder-only models) is supported")
    return PrefixConfig(num_virtual_tokens=fields.get("num_virtual_tokens", _check.integer, 1),
                        modules_to_save=read_field(fields))


def is_applied(model: nn.Module) -> bool:
    """Whether `model` has prefix tuning."""
    return isinstance(getattr(model, MODULE_NAME, None), PrefixEncoder)


def _check_compatible(model: nn.Module, cfg: PrefixConfig, where) -> None:
    refuse_other_virtual_tokens("prefix tuning", state_dict(model)[STATE_KEY].shape[0], cfg, where)


METHOD = Method(
    peft_type=PEFT_TYPE, name="prefix tuning", config_type=PrefixConfig, is_applied=is_applied,
    peft_config_dict=peft_config_dict, config_from_peft=config_from_peft, apply=apply, state_dict=state_dict,
    load_state_dict=load_state_dict, check_sizes=check_virtual_sizes, check_compatible=_check_compatible,
    # PEFT's PeftModel wraps the model itself for prompt learning: a module to save is `base_model.<path>`
    module_prefix="base_model.", owned=lambda model: list(prefix_encoder(model).parameters()),
)
