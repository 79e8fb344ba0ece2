"""The LoRA variants: DoRA (weight-decomposed LoRA), PiSSA (SVD initialisation) and LoRA+ (a learning rate for B).

Plain functions on tensors, used by `LoRALinear` / `LoRAEmbedding`; they know nothing of modules.
Both follow Hugging Face PEFT (`peft/tuners/lora/dora.py`, `variants.py`, `layer.py::pissa_init`)
so that adapter files interoperate; see docs/lora_variants.md.

DoRA (Liu et al., 2024) rewrites the adapted weight as a magnitude times a direction:

    W' = m * (W + s B A) / ||W + s B A||          m: one trainable scale per output row

The norm is taken along the input axis (per output feature of a linear; for an embedding, as
PEFT does, per embedding dimension over the vocabulary) and is DETACHED (paper, section 4.3): it
reflects the current B A but gets no gradient, which saves the memory of its backward.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...ops import lora_linear


# ----------------------------------------------------------------------------------------- DoRA
@torch.no_grad()
def dora_weight_norm(weight: torch.Tensor, delta: torch.Tensor, axis: int) -> torch.Tensor:
    """`||W + delta||_2` along `axis`, in `delta`'s dtype, with no autograd history.

    Args:
        weight: the base weight (any float dtype; upcast to `delta`'s dtype).
        delta: `scaling * B A` in the weight's layout.
        axis: the axis summed over: 1 for a linear (one norm per output row), 0 for an embedding.

    Returns:
        A 1-D tensor: `out_features` norms (linear) or `embedding_dim` norms (embedding).
    """
    # (out, in) or (num_embeddings, dim): a full-size temporary, the main extra memory of DoRA
    return torch.linalg.vector_norm(weight.to(delta.dtype) + delta, dim=axis)


def dora_factor(magnitude: torch.Tensor, norm: torch.Tensor, axis: int) -> torch.Tensor:
    """`m / ||W + s B A||`, shaped to broadcast against the weight (`unsqueeze(axis)`)."""
    return (magnitude / norm).unsqueeze(axis)


@torch.no_grad()
def dora_fold(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
              axis: int) -> torch.Tensor:
    """The merged weight `m / norm * (W + delta)`, in the weight's dtype (PEFT's `merge`)."""
    merged = dora_factor(magnitude, norm, axis) * (weight.to(delta.dtype) + delta)
    return merged.to(weight.dtype)


@torch.no_grad()
def dora_unfold(merged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor,
                axis: int) -> torch.Tensor:
    """Invert `dora_fold` given the norm used when folding: `merged / (m / norm) - delta`.

    The norm cannot be recovered from the merged weight (its rows have norm |m| whatever the
    original was), so the caller keeps the one it folded with.
    """
    restored = merged.to(delta.dtype) / dora_factor(magnitude, norm, axis) - delta
    return restored.to(merged.dtype)


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, scaling: float,
                p: float) -> torch.Tensor:
    """DoRA for a linear layer, as PEFT computes it.

    Without dropout (p = 0): `y = f * (x W^T + s x A^T B^T) + b` with `f = m / ||W + s B A||`
    (detached norm, one per output). The bracket is the fused op `lora_linear`, so the extra cost
    over plain LoRA is the norm (a B A product and a pass over W) and one elementwise scale.

    With dropout (p > 0, training), PEFT's formula, which applies dropout only to the adapter's
    path: `y = x W^T + b + (f - 1) * drop(x) W^T + f * s * drop(x) A^T B^T`, computed as
    `(x - drop(x)) W^T + b + f * (drop(x) W^T + s drop(x) A^T B^T)` (the bracket fused). It costs
    a second full base matmul (as in PEFT); its expectation over masks is the formula above.

    Args:
        x: (..., d_in). weight: (d_out, d_in). bias: (d_out,) or None. lora_A: (r, d_in).
        lora_B: (d_out, r). magnitude: (d_out,). norm: `dora_weight_norm(W, s B A, 1)`, (d_out,),
        detached. scaling: s. p: dropout probability in [0, 1).

    Returns:
        (..., d_out) in the compute dtype (the autocast dtype inside `torch.autocast`, else x's).
    """
    if p == 0.0:
        y = lora_linear(x, weight, None, lora_A, lora_B, scaling, 0.0)  # (..., d_out)
        factor = (magnitude / norm).to(y.dtype)
        # one pass and one allocation for scale-and-bias; autograd keeps y to give m its gradient
        return y * factor if bias is None else torch.addcmul(bias.to(y.dtype), y, factor)
    dropped = F.dropout(x, p, training=True)  # (..., d_in)
    y = lora_linear(dropped, weight, None, lora_A, lora_B, scaling, 0.0)  # drop(x) (W + s B A)^T
    if not torch.is_autocast_enabled(x.device.type):  # autocast casts by itself; else compute in y's dtype
        weight, bias = weight.to(y.dtype), None if bias is None else bias.to(y.dtype)
    rest = F.linear(x - dropped, weight, bias)  # the base's share that dropout took from the adapter path
    return torch.addcmul(rest.to(y.dtype), y, (magnitude / norm).to(y.dtype))

def dora_embedding(base_out: torch.Tensor, after_a: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor,
                   norm: torch.Tensor, scaling: float) -> torch.Tensor:
    """DoRA for an embedding (PEFT's formula): `f * (W[ids] + s A^T[ids] B^T)`, f = m / norm per dim.

    Args:
        base_out: the base embedding output (..., dim). after_a: `A^T[ids]`, (..., r).
        lora_B: (dim, r). magnitude, norm: (dim,), the norm detached. scaling: s.

    Returns:
        (..., dim) in `base_out`'s dtype.
    """
    low_rank = (after_a @ lora_B.t()) * scaling  # (..., dim), adapter dtype
    factor = magnitude / norm  # (dim,)
    return (factor * (base_out.to(low_rank.dtype) + low_rank)).to(base_out.dtype)


# ---------------------------------------------------------------------------------------- PiSSA
@torch.no_grad()
def pissa_factors(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA (Meng et al., 2024): A, B from the top-`rank` singular triplets, and the residual.

    With `W = U S V^T`: `A = sqrt(S_r / s) V_r^T`, `B = U_r sqrt(S_r / s)`, so that
    `s B A = U_r S_r V_r^T` is the principal part, and the residual `W - s B A` replaces the base
    weight (PEFT's `pissa_init`, same operations in the same order). The SVD runs in float32
    (float64 for a float64 weight): O(d_out d_in min(d_out, d_in)) per layer.

    Args:
        weight: (d_out, d_in), any float dtype.
        rank: r <= min(d_out, d_in).
        scaling: s, the layer's LoRA scaling.

    Returns:
        (A (r, d_in), B (d_out, r)) in the SVD dtype, and the residual in the weight's dtype.

    Raises:
        ValueError: rank larger than min(d_out, d_in).
    """
    if rank > min(weight.shape):
        raise ValueError(f"PiSSA needs rank <= min(d_out, d_in) = {min(weight.shape)} for a weight of shape "
                         f"{tuple(weight.shape)}, got rank={rank}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)  # u (d_out, k), s (k,), vh (k, d_in)
    s_r = s[:rank] / scaling
    lora_A = torch.diag(torch.sqrt(s_r)) @ vh[:rank]  # (r, d_in)
    lora_B = u[:, :rank] @ torch.diag(torch.sqrt(s_r))  # (d_out, r)
    residual = w - scaling * lora_B @ lora_A
    return lora_A, lora_B, residual.to(weight.dtype)


# ---------------------------------------------------------------------------------------- LoRA+
# LoRA+ (Hayou et al., 2024): a larger learning rate for B than for A.
# 
# With one learning rate for both factors, LoRA's B learns too slowly at large width; LoRA+ gives B
# (`lora_B`, and `lora_embedding_B` for embeddings) the learning rate `lr * lr_ratio` and every
# other trainable parameter `lr`. The ratio the paper recommends is around 16.

def lora_b_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The B factors of every adapter of every LoRA layer of `model` (`lora_B`, `lora_embedding_B`), in
    model order (only the trainable ones, the active adapter's, reach an optimizer's groups)."""
    from .base import LoRALayer  # here: the layers import this module for the DoRA maths

    out = []
    for module in model.modules():
        if isinstance(module, LoRALayer):
            out.extend(module._factor(kind_b, name) for name in module.adapters for _, kind_b in module._factor_pairs())
    return out


def _check(lr, lr_ratio, weight_decay) -> None:
    for field, value in (("lr", lr), ("lr_ratio", lr_ratio)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"loraplus_param_groups: {field} must be a finite number > 0, got {field}={value!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"loraplus_param_groups: weight_decay must be a number >= 0, got weight_decay={weight_decay!r}")


def loraplus_param_groups(model: nn.Module, lr: float, lr_ratio: float = 16.0,
                          weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups for LoRA+: B factors at `lr * lr_ratio`, the rest at `lr`.

    Use as `torch.optim.AdamW(tt.lora.loraplus_param_groups(model, lr=2e-4))`. Every trainable
    parameter appears in exactly one group: A factors, DoRA magnitude vectors, trained biases and
    any other trainable parameter get `lr`. `weight_decay` applies to matrices only (2-D and up);
    1-D parameters (magnitudes, biases) get 0, as in `tinytune.train`.

    Args:
        model: a model with LoRA applied (`tt.lora.apply`).
        lr: the learning rate of A and of every non-B parameter (> 0).
        lr_ratio: B's learning rate divided by A's (> 0; the paper suggests 2**4 = 16).
        weight_decay: decoupled weight decay of matrix parameters (>= 0).

    Returns:
        Non-empty groups `{"params", "names", "lr", "weight_decay"}`, the B groups last (one
        group per learning rate when `weight_decay` is 0, else split into decayed / not decayed).

    Raises:
        ValueError: a bad lr, lr_ratio or weight_decay, or `model` has no LoRA layer.
    """
    _check(lr, lr_ratio, weight_decay)
    b_ids = {id(p) for p in lora_b_parameters(model)}
    if not b_ids:
        raise ValueError(f"loraplus_param_groups: {type(model).__name__} has no LoRA layers; call tt.lora.apply first")
    groups: dict[tuple[bool, bool], dict] = {}
    for is_b in (False, True):
        for decays in (True, False):
            groups[is_b, decays] = {"params": [], "names": [], "lr": lr * lr_ratio if is_b else lr,
                                    "weight_decay": weight_decay if decays else 0.0}
    for name, param in model.named_parameters():  # a tied parameter is yielded once
        if param.requires_grad:
            group = groups[id(param) in b_ids, param.ndim >= 2 and weight_decay > 0]
            group["params"].append(param)
            group["names"].append(name)
    return [g for g in groups.values() if g["params"]]


__all__ = ["loraplus_param_groups", "lora_b_parameters"]
