"""LoRA on any `nn.Module`: config, injection, merge, disable, adapter state dicts.

    cfg = tt.lora.LoraConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"])
    names = tt.lora.apply(model, cfg)      # swaps modules in place, freezes everything else

The adapter state dict uses Hugging Face PEFT's key names
(`base_model.model.<module path>.lora_A.weight`, ...), so files interoperate with `peft`.
Variants: `dora=True` (DoRA), `init="pissa"` (PiSSA), and `loraplus_param_groups` (LoRA+);
see docs/lora_variants.md.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from ._targets import TargetSpec, describe_candidates, find_targets, get_parent, replace_module, validate_spec
from .lora_layers import (
    INITS,
    LORA_LAYER_TYPES,
    LoRAEmbedding,
    LoRALinear,
    check_dora,
    check_hyperparameters,
    lora_scaling,
)
from .loraplus import loraplus_param_groups

PEFT_PREFIX = "base_model.model."

__all__ = [
    "LoraConfig", "LoRALinear", "LoRAEmbedding", "apply", "merge", "unmerge", "merge_and_unload",
    "disabled", "state_dict", "load_state_dict", "lora_layers", "lora_scaling", "INITS", "loraplus_param_groups",
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
        ValueError: a bad rank, alpha, dropout, init, dora, targets or exclude (naming the field).
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
        check_hyperparameters(self.rank, self.alpha, self.dropout, self.init)
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


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear | LoRAEmbedding]]:
    """The (name, layer) pairs of every LoRA layer in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LORA_LAYER_TYPES):
            yield name, module


def _check_target(model: nn.Module, name: str, module: nn.Module) -> None:
    """Raise if `module` cannot take LoRA (already has it, wrong type, read by its parent)."""
    parent, _ = get_parent(model, name)
    if isinstance(module, LORA_LAYER_TYPES) or isinstance(parent, LORA_LAYER_TYPES):
        owner = name if isinstance(module, LORA_LAYER_TYPES) else name.rpartition(".")[0]
        raise ValueError(f"module {owner!r} already has LoRA; call merge_and_unload first to apply it again")
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


def _wrap(module: nn.Module, cfg: LoraConfig) -> LoRALinear | LoRAEmbedding:
    cls = LoRALinear if isinstance(module, nn.Linear) else LoRAEmbedding
    return cls(module, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora, cfg.init, cfg.dora)


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


def apply(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Put LoRA on every module of `model` that `cfg.targets` matches, in place.

    Every parameter that is not an adapter parameter is frozen (base biases of adapted layers stay
    trainable with `cfg.train_bias`). Nothing is changed unless every match can be adapted.
    With `init="pissa"` the adapted linear weights are replaced by their SVD residuals (one
    float32 SVD per layer), so `disabled()` then gives the residual model, not the original.

    Returns:
        The dotted names of the replaced modules, in model order.

    Raises:
        ValueError: nothing matched (the message lists module names that exist), a matched
            module already has LoRA, or (PiSSA) a rank above a layer's smaller dimension or a
            weight shared with another module.
        TypeError: a matched module is not an nn.Linear / nn.Embedding, or is read directly by
            its parent (nn.MultiheadAttention).
    """
    if not isinstance(cfg, LoraConfig):
        raise TypeError(f"apply expects a tt.lora.LoraConfig, got {type(cfg).__name__}")
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
        layer = _wrap(module, cfg)
        if cfg.train_bias and getattr(module, "bias", None) is not None:
            module.bias.requires_grad_(True)
        replace_module(model, name, layer)
        _guard_fused_fast_paths(model, name, layer)
    return [name for name, _ in found]


def _require_lora(model: nn.Module, what: str) -> list[tuple[str, nn.Module]]:
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"{what}: {type(model).__name__} has no LoRA layers; call tt.lora.apply first")
    return layers


def merge(model: nn.Module) -> nn.Module:
    """Add `scaling * B A` into every adapted base weight. Safe to call twice. Returns model.

    DoRA layers write `m / ||W + s B A|| * (W + s B A)` instead and keep that norm until `unmerge`.
    With a bf16/fp16 base the merged weight is rounded to that dtype (see docs/lora.md).
    """
    for _, layer in _require_lora(model, "merge"):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge` (exact up to the base dtype's rounding). Safe to call twice. Returns model."""
    for _, layer in _require_lora(model, "unmerge"):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then put the plain base modules back in place of the LoRA layers. Returns model.

    The restored modules keep the requires_grad flags `apply` gave them (frozen).
    """
    for name, layer in _require_lora(model, "merge_and_unload"):
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
    previous = [layer._disabled for _, layer in layers]
    for _, layer in layers:
        layer._disabled = True
    try:
        yield model
    finally:
        for (_, layer), was in zip(layers, previous):
            layer._disabled = was


def _layer_tensors(name: str, layer: nn.Module) -> dict[str, torch.Tensor]:
    key = PEFT_PREFIX + name
    if isinstance(layer, LoRALinear):
        tensors = {f"{key}.lora_A.weight": layer.lora_A, f"{key}.lora_B.weight": layer.lora_B}
    else:
        tensors = {f"{key}.lora_embedding_A": layer.lora_embedding_A, f"{key}.lora_embedding_B": layer.lora_embedding_B}
    if layer.dora:
        tensors[f"{key}.lora_magnitude_vector"] = layer.lora_magnitude_vector  # PEFT's key (no ".weight")
    bias = getattr(layer.base, "bias", None)
    if bias is not None and bias.requires_grad:
        tensors[f"{key}.bias"] = bias  # train_bias=True (PEFT's bias="lora_only")
    return tensors


def _parameters_by_key(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in lora_layers(model):
        out.update(_layer_tensors(name, layer))
    return out


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, under PEFT key names, detached (not copied)."""
    return {k: v.detach() for k, v in _parameters_by_key(model).items()}


def _normalise_key(key: str) -> str:
    return key if key.startswith(PEFT_PREFIX) else PEFT_PREFIX + key


def load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], strict: bool = True) -> tuple[list[str], list[str]]:
    """Copy adapter weights from `sd` (PEFT key names; the `base_model.model.` prefix is optional).

    Returns:
        (missing, unexpected) key lists (both empty under strict=True).

    Raises:
        ValueError: the model has no LoRA; a key is mis-shaped; with strict, a key is missing or
            unexpected. Each message names the keys. Nothing is copied when it raises.
    """
    params = _parameters_by_key(_require_lora_model(model))
    given = {_normalise_key(k): v for k, v in sd.items()}
    missing = sorted(set(params) - set(given))
    unexpected = sorted(set(given) - set(params))
    problems = []
    if strict and missing:
        hint = ""
        if all(k.endswith(".lora_magnitude_vector") for k in missing):
            hint = " (the model has DoRA layers but the weights hold no magnitude vectors: use_dora mismatch?)"
        problems.append(f"missing keys: {missing}{hint}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    shapes = [f"{k}: file {tuple(given[k].shape)} vs model {tuple(p.shape)}"
              for k, p in params.items() if k in given and given[k].shape != p.shape]
    if shapes:
        problems.append(f"mis-shaped keys: {shapes}")
    if problems:
        raise ValueError("cannot load the LoRA state dict; " + "; ".join(problems))
    with torch.no_grad():
        for key, param in params.items():
            if key in given:
                param.copy_(given[key].to(device=param.device, dtype=param.dtype))
    return missing, unexpected


def _require_lora_model(model: nn.Module) -> nn.Module:
    _require_lora(model, "load_state_dict")
    return model
