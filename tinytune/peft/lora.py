"""LoRA on any `nn.Module`: config, injection, merge, disable, adapter state dicts.

    cfg = tt.lora.LoraConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"])
    names = tt.lora.apply(model, cfg)      # swaps modules in place, freezes everything else

The adapter state dict uses Hugging Face PEFT's key names
(`base_model.model.<module path>.lora_A.weight`, ...), so files interoperate with `peft`.
Variants: `dora=True` (DoRA), `init="pissa"` (PiSSA), and `loraplus_param_groups` (LoRA+);
see docs/lora_variants.md. Several named adapters on one model (`add_adapter`, `set_adapter`,
`add_weighted_adapter`, `adapter_per_row`, ...): see docs/multi_adapter.md (`lora_multi`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from .. import _check
from ._targets import (
    TargetSpec, describe_candidates, find_targets, get_parent, layers_disabled, refuse_shared_merge, replace_module,
    validate_spec,
)
from .lora_layers import (
    DEFAULT_ADAPTER,
    INITS,
    LORA_LAYER_TYPES,
    LoRAEmbedding,
    LoRALinear,
    check_adapter_name,
    check_dora,
    check_hyperparameters,
    lora_scaling,
)
from .lora_multi import (
    active_adapter,
    adapter_layers,
    adapter_per_row,
    add_weighted_adapter,
    delete_adapter,
    list_adapters,
    lora_layers,
    require_lora as _require_lora,
    set_adapter,
)
from .lora_state import load_state_dict, state_dict
from .loraplus import loraplus_param_groups

__all__ = [
    "LoraConfig", "LoRALinear", "LoRAEmbedding", "apply", "merge", "unmerge", "merge_and_unload",
    "disabled", "state_dict", "load_state_dict", "lora_layers", "lora_scaling", "INITS", "loraplus_param_groups",
    "add_adapter", "set_adapter", "active_adapter", "list_adapters", "delete_adapter", "add_weighted_adapter",
    "adapter_per_row", "adapter_layers", "DEFAULT_ADAPTER",
]


@dataclass
class LoraConfig:
    """What `apply` does. Validated on construction (ValueError naming the field).

    Attributes:
        rank: r, the inner dimension of each update (>= 1).
        alpha: scale numerator (> 0); scaling = alpha / rank, or alpha / sqrt(rank) with `rslora`.
        dropout: dropout on the adapter input in training mode, in [0, 1).
        targets: which modules get LoRA: a list of names (equal, or a dotted suffix), a regex
            (`re.fullmatch` on the dotted name), "all-linear", or a callable `(name, module) -> bool`.
        exclude: modules to leave alone, by the same rules.
        rslora: rank-stabilised scaling.
        init: "kaiming" or "gaussian" for A, with B zero; or "pissa": A and B from the top-`rank`
            singular vectors of each adapted linear weight, whose base weight is replaced in place
            by the residual (embeddings get the "kaiming" init, as in PEFT).
        train_bias: also train the biases of the adapted layers (PEFT's bias="lora_only").
        dora: DoRA, weight-decomposed LoRA: one extra trainable magnitude per output feature
            (per embedding dim for embeddings), saved as PEFT's `lora_magnitude_vector`.

    Raises:
        ValueError: a bad rank, alpha, dropout, init, dora, rslora, train_bias, targets or exclude (naming
            the field; `_check.FieldError`, also a TypeError, for a wrong type or range).
    """

    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: TargetSpec = ("q_proj", "v_proj")
    exclude: TargetSpec = None
    rslora: bool = False
    init: str = "kaiming"
    train_bias: bool = False
    dora: bool = False

    def __post_init__(self):
        _check.integer(self.rank, "LoraConfig.rank", 1, name="rank")
        _check.number(self.alpha, "LoraConfig.alpha", 0, low_open=True, name="alpha")  # inf: NaN outputs
        _check.number(self.dropout, "LoraConfig.dropout", 0, 1, high_open=True, name="dropout")
        for name in ("rslora", "train_bias"):
            _check.boolean(getattr(self, name), f"LoraConfig.{name}", name=name)
        check_hyperparameters(self.rank, self.alpha, self.dropout, self.init)  # the init choice, as the layers say it
        check_dora(self.dora)
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if self.targets is None:
            raise ValueError("LoraConfig.targets is None; give module names, a regex, 'all-linear' or a callable")
        validate_spec(self.targets, "LoraConfig.targets")
        validate_spec(self.exclude, "LoraConfig.exclude")

    @property
    def scaling(self) -> float:
        """The factor applied to B A."""
        return lora_scaling(self.rank, self.alpha, self.rslora)


def _check_target(model: nn.Module, name: str, module: nn.Module) -> None:
    """Raise if `module` cannot take LoRA (already has it, wrong type, read by its parent)."""
    parent, _ = get_parent(model, name)
    if isinstance(module, LORA_LAYER_TYPES) or isinstance(parent, LORA_LAYER_TYPES):
        owner = name if isinstance(module, LORA_LAYER_TYPES) else name.rpartition(".")[0]
        raise ValueError(f"module {owner!r} already has LoRA; call merge_and_unload first to apply it again, or add "
                         "another adapter with tt.lora.add_adapter(model, name, cfg)")
    if isinstance(parent, nn.MultiheadAttention):
        raise TypeError(
            f"cannot put LoRA on {name!r}: nn.MultiheadAttention reads its projection weights directly "
            "(in_proj_weight, out_proj.weight) instead of calling the module, so an adapter there would be "
            "silently ignored. Target the surrounding nn.Linear layers (e.g. linear1/linear2 of "
            "nn.TransformerEncoderLayer) or use attention built from separate q/k/v/o nn.Linear modules"
        )
    if not isinstance(module, (nn.Linear, nn.Embedding)):
        raise TypeError(
            f"module {name!r} matched the LoRA targets but is a {type(module).__name__}; "
            "LoRA supports nn.Linear and nn.Embedding"
        )


def _skip_for_all_linear(model: nn.Module, name: str) -> bool:
    """"all-linear" quietly leaves out linears it cannot adapt (MultiheadAttention's out_proj)."""
    parent, _ = get_parent(model, name)
    return isinstance(parent, nn.MultiheadAttention)


def _guard_fused_fast_paths(model: nn.Module, name: str, layer: nn.Module) -> None:
    """nn.TransformerEncoderLayer's inference fast path reads linear1/linear2 weights directly and
    would skip the adapter; it is disabled while any submodule has a forward hook, so add a no-op one."""
    parts = name.split(".")
    for depth in range(len(parts)):
        ancestor = model.get_submodule(".".join(parts[:depth]))
        if isinstance(ancestor, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            layer.register_forward_pre_hook(_no_op_hook)
            return


def _no_op_hook(module, args):
    return None


def _wrap(module: nn.Module, cfg: LoraConfig, adapter_name: str) -> LoRALinear | LoRAEmbedding:
    cls = LoRALinear if isinstance(module, nn.Linear) else LoRAEmbedding
    return cls(module, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora, cfg.init, cfg.dora, adapter_name=adapter_name)


def _check_pissa(model: nn.Module, found: list[tuple[str, nn.Module]], rank: int) -> None:
    """PiSSA rewrites each adapted linear weight in place: refuse, before anything changes, a rank
    the SVD cannot give and a weight another module also uses (a tied lm_head would change the
    embedding too, and the model would no longer equal the base)."""
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            users.setdefault(id(weight), []).append(name)
    for name, module in found:
        if not isinstance(module, nn.Linear):
            continue  # embeddings keep their weight under PiSSA (PEFT's behaviour)
        if rank > min(module.in_features, module.out_features):
            raise ValueError(f"init='pissa' needs rank <= min(in_features, out_features); {name!r} is "
                             f"{module.in_features} -> {module.out_features}, got rank={rank}")
        others = [n for n in users.get(id(module.weight), []) if n != name]
        if others:
            raise ValueError(f"init='pissa' would rewrite the weight of {name!r}, which is shared with {others}; "
                             "exclude it or untie the weights first")


def apply(model: nn.Module, cfg: LoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> list[str]:
    """Put LoRA on every module of `model` that `cfg.targets` matches, in place.

    Every parameter that is not an adapter parameter is frozen (base biases of adapted layers stay
    trainable with `cfg.train_bias`). Nothing is changed unless every match can be adapted.
    With `init="pissa"` the adapted linear weights are replaced by their SVD residuals (one
    float32 SVD per layer), so `disabled()` then gives the residual model, not the original.

    Args:
        model: any module tree; changed in place.
        cfg: what to adapt and how.
        adapter_name: the name of the adapter created (the active one); add more with `add_adapter`.

    Returns:
        The dotted names of the replaced modules, in model order.

    Raises:
        ValueError: nothing matched (the message lists module names that exist), a matched
            module already has LoRA, a bad adapter name, or (PiSSA) a rank above a layer's
            smaller dimension or a weight shared with another module.
        TypeError: a matched module is not an nn.Linear / nn.Embedding, or is read directly by
            its parent (nn.MultiheadAttention).
    """
    if not isinstance(cfg, LoraConfig):
        raise TypeError(f"apply expects a tt.lora.LoraConfig, got {type(cfg).__name__}")
    check_adapter_name(adapter_name)
    found = find_targets(model, cfg.targets, cfg.exclude)
    if cfg.targets == "all-linear":
        found = [(n, m) for n, m in found if not _skip_for_all_linear(model, n)]
    if not found:
        raise ValueError(
            f"LoRA targets {cfg.targets!r} (exclude={cfg.exclude!r}) matched no module of "
            f"{type(model).__name__}; linear/embedding modules that exist: {describe_candidates(model)}"
        )
    for name, module in found:
        _check_target(model, name, module)
    if cfg.init == "pissa":
        _check_pissa(model, found, cfg.rank)

    model.requires_grad_(False)
    for name, module in found:
        layer = _wrap(module, cfg, adapter_name)
        if cfg.train_bias and getattr(module, "bias", None) is not None:
            module.bias.requires_grad_(True)
        replace_module(model, name, layer)
        _guard_fused_fast_paths(model, name, layer)
    return [name for name, _ in found]


def _lora_view(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs as target matching sees a model that may have LoRA already: a LoRA
    layer stands for its base at its own path and its `.base` child is left out, so a config
    matches the same modules before and after LoRA was applied."""
    out = []
    for name, module in model.named_modules():
        parent, child = get_parent(model, name) if name else (None, "")
        if child == "base" and isinstance(parent, LORA_LAYER_TYPES):
            continue
        out.append((name, module.base if isinstance(module, LORA_LAYER_TYPES) else module))
    return out


def _check_add(model: nn.Module, name: str, cfg: LoraConfig, found: list[tuple[str, nn.Module]]) -> None:
    """Everything `add_adapter` refuses, before anything changes."""
    if not found:
        raise ValueError(f"add_adapter({name!r}): LoRA targets {cfg.targets!r} (exclude={cfg.exclude!r}) matched no "
                         f"module of {type(model).__name__}; modules that exist: {describe_candidates(model)}")
    if cfg.train_bias:
        raise ValueError(f"add_adapter({name!r}): train_bias=True is not supported for an added adapter: a layer's bias "
                         "is shared by all its adapters (train it with the first adapter, tt.lora.apply)")
    plain = [(n, m) for n, m in found if not isinstance(m, LORA_LAYER_TYPES)]
    for n, m in plain:
        _check_target(model, n, m)
    for n, m in found:
        held = list(getattr(m, "adapters", {}))
        pissa = [a for a in held if m.adapters[a].init == "pissa"] if isinstance(m, LoRALinear) else []
        if held and isinstance(m, LoRALinear) and (cfg.init == "pissa" or pissa):
            raise ValueError(f"add_adapter({name!r}): {n!r} holds adapters {held}; PiSSA (init='pissa', here "
                             f"{pissa or [name]}) rewrites the shared base weight, so it cannot sit beside other "
                             "adapters on one layer: target other modules, or merge_and_unload first")
    if cfg.init == "pissa":
        _check_pissa(model, plain, cfg.rank)


def add_adapter(model: nn.Module, name: str, cfg: LoraConfig) -> list[str]:
    """Add a further LoRA adapter called `name` to `model`, beside the adapters it has.

    The new adapter follows its own `cfg` (PEFT's behaviour): its targets are matched as if the
    model had no LoRA; modules already adapted get the adapter beside their others, plain ones are
    wrapped. It is added INACTIVE and frozen: the forward keeps using the active adapter until
    `set_adapter(model, name)` (layers that lack the active adapter compute their base). On a model
    without LoRA this is `apply(model, cfg, adapter_name=name)`, and the adapter is active.

    Args:
        model: the model, changed in place.
        name: the new adapter's name: a non-empty string without "." ("default" is `apply`'s).
        cfg: rank, alpha, dropout, targets... of the new adapter (`train_bias` must be False).

    Returns:
        The dotted names of the modules that received the adapter, in model order.

    Raises:
        ValueError: `name` is taken (the message names it and lists the adapters) or invalid;
            nothing matched; `train_bias=True`; PiSSA beside another adapter on one layer; the
            PiSSA rank or shared-weight checks of `apply`.
        TypeError: `cfg` is not a LoraConfig, or a matched module cannot take LoRA (as `apply`).
    """
    if not isinstance(cfg, LoraConfig):
        raise TypeError(f"add_adapter expects a tt.lora.LoraConfig, got {type(cfg).__name__}")
    check_adapter_name(name)
    existing = list_adapters(model)
    if not existing:
        return apply(model, cfg, adapter_name=name)
    if name in existing:
        raise ValueError(f"add_adapter: the model already has an adapter named {name!r} (adapters: {existing}); "
                         "pick another name or delete_adapter it first")
    found = find_targets(model, cfg.targets, cfg.exclude, modules=_lora_view(model))
    found = [(n, model.get_submodule(n)) for n, _ in found]  # back from the view to the real modules
    if cfg.targets == "all-linear":
        found = [(n, m) for n, m in found if not _skip_for_all_linear(model, n)]
    _check_add(model, name, cfg, found)
    active = active_adapter(model)
    for path, module in found:
        if isinstance(module, LORA_LAYER_TYPES):
            module.add_adapter(name, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora, cfg.init, cfg.dora)
            continue
        layer = _wrap(module, cfg, name)
        layer.set_adapter(active)  # computes its base until `name` is set active; `name` frozen
        replace_module(model, path, layer)
        _guard_fused_fast_paths(model, path, layer)
    return [n for n, _ in found]


def merge(model: nn.Module) -> nn.Module:
    """Add `scaling * B A` of the ACTIVE adapter into every base weight that has it. Safe to call
    twice. Returns model. While merged, `set_adapter` to another adapter and `adapter_per_row` refuse.

    DoRA layers write `m / ||W + s B A|| * (W + s B A)` instead and keep that norm until `unmerge`.
    With a bf16/fp16 base the merged weight is rounded to that dtype (see docs/lora.md).

    Raises:
        ValueError: an unmerged layer's base weight is shared with another module (a tied lm_head /
            embedding): merging would change that module too. Nothing is merged then.
    """
    layers = _require_lora(model, "merge")
    refuse_shared_merge(model, [(n, layer) for n, layer in layers if not layer.merged], "lora.merge")
    for _, layer in layers:
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge` (exact up to the base dtype's rounding). Safe to call twice. Returns model."""
    for _, layer in _require_lora(model, "unmerge"):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter, then put the plain base modules back in place of the LoRA layers
    (every other adapter is dropped). Returns model.

    The restored modules keep the requires_grad flags `apply` gave them (frozen).

    Raises:
        ValueError: a base weight is shared with another module (tied), as for `merge`.
    """
    layers = _require_lora(model, "merge_and_unload")
    refuse_shared_merge(model, [(n, layer) for n, layer in layers if not layer.merged], "lora.merge_and_unload")
    for name, layer in layers:
        layer.merge()
        replace_module(model, name, layer.base)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module):
    """Inside the block every LoRA layer computes exactly its base layer (bit for bit).

    Raises:
        RuntimeError: a layer is merged: its base weight holds the delta, so the base model
            cannot be reproduced exactly; call `unmerge` first.
    """
    layers = _require_lora(model, "disabled")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise RuntimeError(
            f"disabled(): LoRA is merged into {merged[:5]}; call tt.lora.unmerge(model) first "
            "(a merged base weight cannot give the base model bit for bit)"
        )
    with layers_disabled(layer for _, layer in layers):
        yield model
