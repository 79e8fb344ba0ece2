"""Several named LoRA adapters on one model: switch, delete, combine, and mix them per batch row.

    tt.lora.apply(model, cfg)                      # adapter "default", active
    tt.lora.add_adapter(model, "french", cfg2)     # a second one, inactive and frozen
    tt.lora.set_adapter(model, "french")           # active: the forward uses it, only it trains
    with tt.lora.adapter_per_row(model, ["default", "french", None]):
        logits = model(ids)                        # row 0: default, row 1: french, row 2: the base

Each LoRA layer holds its adapters side by side (`base`); the functions here keep the
layers of one model in step (one active adapter for all of them). `add_adapter` lives in
`inject` beside `apply`, with which it shares the target matching. See docs/multi_adapter.md.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from .._targets import replace_module
from .base import LORA_LAYER_TYPES, LoRALayer
from .config import LoraSpec, check_adapter_name

COMBINATIONS = ("cat", "linear", "svd")


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """The (name, layer) pairs of every LoRA layer in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LORA_LAYER_TYPES):
            yield name, module


def require_lora(model: nn.Module, what: str) -> list[tuple[str, nn.Module]]:
    """The LoRA layers of `model`; ValueError naming `what` when there are none."""
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"{what}: {type(model).__name__} has no LoRA layers; call tt.lora.apply first")
    return layers


def list_adapters(model: nn.Module) -> list[str]:
    """The names of the LoRA adapters on `model`, in order of first appearance (model order, then
    the order they were added to a layer). Empty when the model has no LoRA."""
    names: dict[str, None] = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.adapters))
    return list(names)


def active_adapter(model: nn.Module) -> str:
    """The name of the active adapter: the one `forward`, `merge`, `state_dict` and training use.

    Raises:
        ValueError: `model` has no LoRA.
        RuntimeError: its layers disagree (a layer's `set_adapter` was called directly).
    """
    names = {layer.active_adapter for _, layer in require_lora(model, "active_adapter")}
    if len(names) > 1:
        raise RuntimeError(f"the LoRA layers of {type(model).__name__} have different active adapters "
                           f"{sorted(names)}; call tt.lora.set_adapter(model, name) to make them agree")
    return names.pop()


def adapter_layers(model: nn.Module, name: str) -> list[tuple[str, LoRALayer]]:
    """The (name, layer) pairs of the LoRA layers that hold adapter `name`, in model order."""
    return [(path, layer) for path, layer in lora_layers(model) if name in layer.adapters]


def resolve_adapter(model: nn.Module, adapter: str | None, what: str) -> str:
    """`adapter`, or the active adapter when None, checked to exist on `model`.

    Raises:
        ValueError: the model has no LoRA, or no adapter of that name (the message lists them).
    """
    require_lora(model, what)
    if adapter is None:
        return active_adapter(model)
    names = list_adapters(model)
    if adapter not in names:
        raise ValueError(f"{what}: {type(model).__name__} has no LoRA adapter {adapter!r}; its adapters are {names}")
    return adapter


def adapter_spec(model: nn.Module, name: str) -> LoraSpec:
    """The hyperparameters of adapter `name`, as its first layer holds them."""
    return adapter_layers(model, name)[0][1].adapters[name]


def set_adapter(model: nn.Module, name: str) -> None:
    """Make adapter `name` the active one in every LoRA layer of `model`.

    The forward then computes with `name` (layers that lack it compute their base), `merge` merges
    it, `state_dict()` / `save_adapter` default to it, and only its parameters require grad: every
    other adapter is frozen (base weights stay frozen; trained biases keep their flag).

    Raises:
        ValueError: the model has no LoRA, or no adapter `name` (the message lists the adapters).
        RuntimeError: an adapter is merged (`tt.lora.unmerge(model)` first): its delta sits in the
            base weights, and switching would silently stack the next adapter on top of it.
    """
    name = resolve_adapter(model, name, "set_adapter")
    merged = [path for path, layer in lora_layers(model) if layer.merged and layer.active_adapter != name]
    if merged:
        raise RuntimeError(f"set_adapter({name!r}): adapter {active_adapter(model)!r} is merged into {merged[:3]}; "
                           "call tt.lora.unmerge(model) before switching adapters")
    for _, layer in lora_layers(model):
        layer.set_adapter(name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` and its parameters from every layer that holds it.

    A layer left with no adapter is replaced by its plain base module again.

    Raises:
        ValueError: no adapter `name`, or `name` is the active adapter: set another one active
            first (`set_adapter`); to drop LoRA altogether use `merge_and_unload` or `disabled`.
    """
    name = resolve_adapter(model, name, "delete_adapter")
    if name == active_adapter(model):
        others = [n for n in list_adapters(model) if n != name]
        raise ValueError(f"delete_adapter: {name!r} is the active adapter; call tt.lora.set_adapter(model, ...) with "
                         f"another one first (others: {others})")
    for path, layer in adapter_layers(model, name):
        layer.delete_adapter(name)
        if not layer.adapters:
            replace_module(model, path, layer.base)
    from .shared_shrink import link_groups  # shared_shrink imports layers, which this module's users import first

    link_groups(model)  # groups without the layers that left


@contextlib.contextmanager
def adapter_per_row(model: nn.Module, names: Sequence[str | None]):
    """Inside the block, row i of the batch computes with adapter `names[i]` (None: the base model).

    Every LoRA layer splits its input's first dimension into groups of rows that share an adapter
    and runs each group through that adapter alone (the same fused op as a single-adapter forward;
    the base product is computed per group, its total cost unchanged). Row i's output therefore
    equals the output of the model with `names[i]` active (or disabled, for None) on that row, up to
    float rounding; `tt.generate` works inside the block (the rows keep their adapters at every
    step). Gradients flow to each group's adapter, so training through a mixed batch works for
    whichever adapter parameters require grad (`set_adapter` leaves only one trainable). Inside
    `disabled()` every row computes the base.

    Args:
        model: a model with LoRA adapters.
        names: one adapter name (or None) per row; the rows are the first dimension of each adapted
            layer's input (batch-first models, such as tinytune's and Hugging Face's).

    Raises:
        ValueError: the model has no LoRA, `names` is empty or not a list, or names an unknown
            adapter; (in the forward) a layer's input has another number of rows.
        RuntimeError: an adapter is merged: its delta is in every row's base weight.
    """
    layers = require_lora(model, "adapter_per_row")
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ValueError(f"adapter_per_row: names must be a non-empty list with one adapter name (or None) per row, "
                         f"got {names!r}")
    known = list_adapters(model)
    unknown = sorted({n for n in names if n is not None and n not in known}, key=str)
    if unknown:
        raise ValueError(f"adapter_per_row: unknown adapters {unknown}; the model has {known} (None = base)")
    merged = [path for path, layer in layers if layer.merged]
    if merged:
        raise RuntimeError(f"adapter_per_row: an adapter is merged into {merged[:3]}; call tt.lora.unmerge(model) "
                           "first (a merged delta would reach every row)")
    previous = [layer._rows for _, layer in layers]
    for _, layer in layers:
        layer.set_row_adapters(list(names))
    try:
        yield model
    finally:
        for (_, layer), rows in zip(layers, previous):
            layer._rows = rows  # restores an enclosing adapter_per_row, if any


# ---------------------------------------------------------------------- weighted combination
def combine_factors(factors: list[tuple[torch.Tensor, torch.Tensor, float]], weights: list[float],
                    combination: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `add_weighted_adapter` maths for one layer (the new adapter's scaling is 1).

    Args:
        factors: `(A (r_i, n_in), B (n_out, r_i), scaling s_i)` of each source adapter the layer holds.
        weights: `w_i`, one per entry of `factors`.
        combination: "cat": `A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]`, `B = [B_1, B_2, ...]`, so that
            `B A = sum_i w_i s_i B_i A_i` exactly; zero rows pad A (zero columns pad B) up to `rank`.
            "linear": with `c_i = w_i s_i`, `A = sum_i sign(c_i) sqrt(|c_i|) A_i` and
            `B = sum_i sqrt(|c_i|) B_i` (same ranks): exact for one adapter, otherwise `B A` also
            holds the cross terms `sqrt(|c_i c_j|) sign(c_j) B_i A_j`: an approximation.
            "svd": `delta = sum_i w_i s_i B_i A_i`, then its best rank-`rank` factorisation by SVD:
            `B = U_r diag(S_r)`, `A = V_r^T` (PEFT's "svd"; exact when the ranks add up to <= `rank`).
        rank: the new adapter's rank (cat: the sum of ALL sources' ranks, also those this layer lacks).

    Returns:
        The new adapter's (A (rank, n_in), B (n_out, rank)).
    """
    if combination == "cat":
        a = torch.cat([a * w * s for (a, _, s), w in zip(factors, weights)], dim=0)  # (sum r_i, n_in)
        b = torch.cat([b for _, b, _ in factors], dim=1)  # (n_out, sum r_i)
        pad = rank - a.shape[0]  # PEFT: present adapters first, then zeros
        return torch.cat([a, a.new_zeros(pad, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
    if combination == "svd":
        return _svd_factors(factors, weights, rank)
    a = sum(a * (math.copysign(1.0, w * s) * math.sqrt(abs(w * s))) for (a, _, s), w in zip(factors, weights))
    b = sum(b * math.sqrt(abs(w * s)) for (_, b, s), w in zip(factors, weights))
    return a, b


def _svd_factors(factors, weights, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    first = factors[0][0]
    delta = sum(w * s * (b.double() @ a.double()) for (a, b, s), w in zip(factors, weights))  # (n_out, n_in)
    # The reduced SVD gives the same top-r triplets as PEFT's full one (B A is invariant to their signs).
    u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = min(rank, sv.numel())
    b = (u[:, :keep] * sv[:keep]).to(first.dtype)  # (n_out, keep)
    a = vh[:keep].to(first.dtype)  # (keep, n_in)
    pad = rank - keep  # a layer narrower than the rank: zero rows/columns, as "cat" pads
    return torch.cat([a, a.new_zeros(pad, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)


def _check_weighted(model: nn.Module, names, weights, new_name: str, combination: str) -> list[LoraSpec]:
    """Validate `add_weighted_adapter`'s arguments before anything changes; the sources' specs."""
    check_adapter_name(new_name)
    require_lora(model, "add_weighted_adapter")
    known = list_adapters(model)
    if new_name in known:
        raise ValueError(f"add_weighted_adapter: the model already has an adapter {new_name!r} (adapters: {known})")
    if combination not in COMBINATIONS:
        raise ValueError(f"add_weighted_adapter: combination={combination!r} is not supported; choose one of "
                         f"{COMBINATIONS} (PEFT's ties/dare variants are not implemented)")
    if isinstance(names, str) or not names:
        raise ValueError(f"add_weighted_adapter: names must be a non-empty list of adapter names, got {names!r}")
    if isinstance(weights, (str, bytes)) or len(weights) != len(names):
        raise ValueError(f"add_weighted_adapter: weights {weights!r} must be one number per adapter in {list(names)}")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)]
    if bad:
        raise ValueError(f"add_weighted_adapter: weights must be finite numbers, got {bad}")
    specs = [adapter_spec(model, resolve_adapter(model, n, "add_weighted_adapter")) for n in names]
    for n, spec in zip(names, specs):
        if spec.dora or spec.init == "pissa":
            kind = "DoRA" if spec.dora else "PiSSA"
            raise ValueError(f"add_weighted_adapter: adapter {n!r} is {kind}; only plain LoRA adapters combine "
                             "(a DoRA magnitude or a PiSSA residual base does not add up across adapters)")
    if combination != "linear" and len(names) > 1:
        shaped = [path for path, layer in lora_layers(model) if any(
            layer._factor(layer._A, n).dim() != 2 for n in names if n in layer.adapters)]
        if shaped:
            raise ValueError(f"add_weighted_adapter: combination={combination!r} concatenates or factorises matrix "
                             f"factors, but the layers {shaped[:4]} hold convolution factors; use combination='linear'")
    if combination == "linear" and len(names) > 1 and len({s.rank for s in specs}) > 1:
        ranks = {n: s.rank for n, s in zip(names, specs)}
        raise ValueError(f"add_weighted_adapter: combination='linear' needs adapters of one rank, got {ranks}; "
                         "use combination='cat'")
    return specs


def add_weighted_adapter(model: nn.Module, names: Sequence[str], weights: Sequence[float], new_name: str,
                         combination: str = "cat", svd_rank: int | None = None) -> list[str]:
    """Add adapter `new_name` that combines adapters `names` with `weights`, as PEFT's
    `add_weighted_adapter` (combination_type "cat", "linear" or "svd") does.

    The new adapter has scaling 1 (rank = alpha, no rsLoRA), sits on every layer that holds at least
    one source, takes its dropout from `names[0]`, and is added inactive and frozen
    (`set_adapter` it). "cat": rank = the sum of the sources' ranks and `delta = sum_i w_i delta_i`
    exactly. "linear": the sources' rank; `A` and `B` are weighted sums with weights
    `sqrt(|w_i s_i|)` (the sign on `A`), so the delta is a rough approximation unless one adapter
    is given (PEFT then uses "linear" whatever is asked). See docs/multi_adapter.md for the maths.

    Args:
        model: a model with LoRA adapters.
        names: the source adapters (a name may repeat).
        weights: one finite number per source; negative values subtract.
        new_name: the new adapter's name.
        combination: "cat" (exact, rank grows), "linear" (same rank, approximate) or "svd" (the best
            rank-`svd_rank` approximation of the weighted sum of deltas; costs one SVD per layer).
        svd_rank: the rank for "svd" (default: the largest source rank, as PEFT).

    Returns:
        The names of the layers that received the new adapter.

    Raises:
        ValueError: an unknown source, `new_name` taken or invalid, weights not one finite number per
            source, an unknown combination, a DoRA or PiSSA source, or ("linear") unequal ranks.
    """
    specs = _check_weighted(model, names, weights, new_name, combination)
    combination = "linear" if len(names) == 1 else combination
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"add_weighted_adapter: svd_rank must be an int >= 1 or None, got {svd_rank!r}")
    rank = {"cat": sum(s.rank for s in specs), "svd": svd_rank or max(s.rank for s in specs)}.get(
        combination, specs[0].rank)
    touched = []
    for path, layer in lora_layers(model):
        present = [(n, w) for n, w in zip(names, weights) if n in layer.adapters]
        if not present:
            continue
        with torch.no_grad():
            combined = []
            for kind_a, kind_b in layer._factor_pairs():  # one pair per adapted weight (MHA: in_proj, out_proj)
                factors = [(layer._factor(kind_a, n).detach(), layer._factor(kind_b, n).detach(),
                            layer.adapters[n].scaling) for n, _ in present]
                combined.append(combine_factors(factors, [w for _, w in present], combination, rank))
            layer.add_adapter(new_name, LoraSpec(rank, float(rank), specs[0].dropout))
            for (kind_a, kind_b), (a, b) in zip(layer._factor_pairs(), combined):
                layer._factor(kind_a, new_name).copy_(a)
                layer._factor(kind_b, new_name).copy_(b)
        touched.append(path)
    return touched
