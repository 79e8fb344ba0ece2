"""`TritonLoRALinearFunction`: the fused LoRA linear with its low-rank side products in Triton kernels.

Same maths, arguments and gradients as `tinytune.ops.lora_matmul.LoRALinearFunction`; what differs is where
the work runs and what is kept for backward:

    forward   y = x W^T + b          one cuBLAS matmul (torch), the one output allocation
              u = (x * keep) A^T     `shrink`: one pass over x, the mask hashed in registers
              y += scale * u B^T     `expand_`: in place on y
    backward  gu, dB                 `grad_g`: one pass over g
              grad_x = g W           one cuBLAS matmul (only if x needs a gradient)
              grad_x += keep*(gu A), dA    `grad_x_`: one pass over x (and grad_x), mask re-hashed

with `scale = s / (1 - p_quantised)`. Saved for backward: x (a reference, shared with sibling projections),
W, A, B (parameters), u (N, r) and the integer seed in `ctx`: no mask and no dropped copy of x. The masks are
`hash_dropout.hash_keep_mask`, not the torch path's SFC64 masks: a seed gives a different (equally valid)
mask on each backend. Importing this module imports triton; `lora_linear(backend="triton")` does so lazily.
"""
from __future__ import annotations

import torch

from ..dropout_mask import quantised_probability
from .lora_kernels import expand_, grad_g, grad_x_, shrink


class TritonLoRALinearFunction(torch.autograd.Function):
    """Autograd Function on 2-D `x`, tensors in one dtype; use `lora_linear(..., backend="triton")`.

    forward(x (N, d_in), weight (d_out, d_in), bias (d_out,) or None, lora_A (r, d_in), lora_B (d_out, r),
    scaling: float, p: float in [0, 1), seed: int in [0, 2^64)) -> y (N, d_out).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, p: float, seed: int, given_xa=None):
        scale = scaling / (1.0 - quantised_probability(p)) if p > 0.0 else scaling
        u = shrink(x, lora_A, p, seed) if given_xa is None else given_xa  # (N, r); given: a shared pass's slice
        y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())  # (N, d_out)
        expand_(y, u, lora_B, scale)
        ctx.scale, ctx.p, ctx.seed = scale, p, seed
        ctx.has_bias = bias is not None
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, weight, lora_A, lora_B, u)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, u = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_b_lora = ctx.needs_input_grad[:5]
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x or need_a or need_b_lora:
            gu, db = grad_g(grad_y, lora_B, u, ctx.scale, need_b_lora)  # (N, r) scaled; (d_out, r)
            grad_b = db.to(lora_B.dtype) if need_b_lora else None
            if need_x:
                grad_x = torch.mm(grad_y, weight)  # (N, d_in), the base part
            if need_x or need_a:
                da = grad_x_(x, lora_A, gu, grad_x, ctx.p, ctx.seed, need_a)
                grad_a = da.to(lora_A.dtype) if need_a else None
        if need_w:
            grad_w = torch.mm(grad_y.t(), x)  # (d_out, d_in), only when the base is trainable
        if need_b and ctx.has_bias:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None
