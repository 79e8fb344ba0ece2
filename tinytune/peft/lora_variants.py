"""The maths of the LoRA variants: DoRA (weight-decomposed LoRA) and PiSSA (SVD initialisation).

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

import torch
import torch.nn.functional as F

from ..ops import lora_linear


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
