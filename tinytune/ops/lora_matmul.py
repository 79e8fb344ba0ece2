"""The fused LoRA linear: `y = x W^T + b + s * dropout(x) A^T B^T` as one autograd Function.

Against the usual two-module LoRA (`base(x) + B(A(dropout(x))) * s`) it
- allocates one output: the base product, then the low-rank term added in place (`addmm_`);
- keeps for backward `x` by reference (shared with sibling projections such as q/k/v), the small
  `(N, r)` product `dropout(x) A^T`, and the dropout mask as packed bits or a seed: never a
  dropped copy of `x`;
- does no gradient work for a frozen `W` / `b` (the weight gradient of the base is the single
  largest matmul of a backward pass), yet gives correct gradients when they do require grad;
- computes `grad_x = g W + s (g B) A` with the second term added in place.

Shapes: x (..., d_in), W (d_out, d_in), b (d_out,), A (r, d_in), B (d_out, r), y (..., d_out).
"""
from __future__ import annotations

import torch

from .dropout_mask import PackedMask, draw_seed, keep_mask, quantised_probability


class LoRALinearFunction(torch.autograd.Function):
    """Autograd Function on 2-D `x`; use `lora_linear`, which handles leading dims and autocast."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, p: float, seed: int):
        mask = None
        scale = scaling
        if p > 0.0:
            mask = keep_mask(x.shape, p, seed, x.device)
            scale = scaling / (1.0 - quantised_probability(p))
            xa = torch.mm(x * mask, lora_A.t())  # (N, r); the dropped copy dies here
        else:
            xa = torch.mm(x, lora_A.t())  # (N, r)
        if bias is not None:
            y = torch.addmm(bias, x, weight.t())  # (N, d_out): the one output allocation
        else:
            y = torch.mm(x, weight.t())
        y.addmm_(xa, lora_B.t(), alpha=scale)

        ctx.scale = scale
        ctx.has_bias = bias is not None
        ctx.packed = None
        if any(ctx.needs_input_grad):
            ctx.packed = PackedMask.pack(mask, p, seed) if mask is not None else None
            bits = ctx.packed.bits if ctx.packed is not None else None
            ctx.save_for_backward(x, weight, lora_A, lora_B, xa, bits)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, xa, _bits = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_b_lora = ctx.needs_input_grad[:5]
        s = ctx.scale
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        mask = ctx.packed.unpack() if ctx.packed is not None else None

        if need_b_lora:
            grad_b = torch.mm(grad_y.t(), xa).mul_(s)  # (d_out, r)
        if need_a or need_x:
            gyb = torch.mm(grad_y, lora_B).mul_(s)  # (N, r), already scaled
            if need_a:
                x_seen = x * mask if mask is not None else x
                grad_a = torch.mm(gyb.t(), x_seen)  # (r, d_in)
                del x_seen
            if need_x:
                grad_x = torch.mm(grad_y, weight)  # (N, d_in)
                if mask is None:
                    grad_x.addmm_(gyb, lora_A)
                else:
                    low_rank = torch.mm(gyb, lora_A).mul_(mask)
                    grad_x.add_(low_rank)
        if need_w:
            grad_w = torch.mm(grad_y.t(), x)  # (d_out, d_in), only when the base is trainable
        if need_b and ctx.has_bias:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.is_floating_point():
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None or t.dtype == dtype:
        return t
    return t.to(dtype)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """`x W^T + b + scaling * dropout(x) A^T B^T`, fused (see the module docstring).

    Args:
        x: input, shape (..., d_in); any number of leading dimensions.
        weight: base weight (d_out, d_in); frozen or trainable.
        bias: base bias (d_out,) or None.
        lora_A: (r, d_in). lora_B: (d_out, r). Cast to the compute dtype, so fp32 adapters work
            with a bf16/fp16 base.
        scaling: the LoRA scale (alpha / r, or alpha / sqrt(r) for rsLoRA).
        dropout: probability of dropping an element of `x` on the low-rank path only; pass 0.0 in
            eval mode. Quantised to a multiple of 1/65536 (see `dropout_mask`).
        seed: mask seed; drawn from torch's default generator when None. A fixed seed gives a
            fixed mask (used by gradcheck).

    Returns:
        y of shape (..., d_out) in the compute dtype: the autocast dtype inside `torch.autocast`,
        else `x.dtype`.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if x.shape[-1] != weight.shape[1] or lora_A.shape[1] != weight.shape[1]:
        raise ValueError(
            f"lora_linear: x has {x.shape[-1]} features, weight expects {weight.shape[1]}, "
            f"lora_A expects {lora_A.shape[1]}"
        )
    dtype = _compute_dtype(x)
    x, weight, bias = _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype)
    lora_A, lora_B = _cast(lora_A, dtype), _cast(lora_B, dtype)
    if dropout > 0.0 and seed is None:
        seed = draw_seed()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # a view when x is contiguous
    with torch.autocast(x.device.type, enabled=False):
        y = LoRALinearFunction.apply(x2, weight, bias, lora_A, lora_B, float(scaling), float(dropout), seed or 0)
    return y.view(*lead, weight.shape[0])


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, mask=None, p=0.0):
    """The unfused reference (plain autograd): for tests and benchmarks. `mask` is a keep-mask."""
    x_seen = x if mask is None else x * mask / (1.0 - quantised_probability(p))
    return torch.nn.functional.linear(x, weight, bias) + (x_seen @ lora_A.t() @ lora_B.t()) * scaling
