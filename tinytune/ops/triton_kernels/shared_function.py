"""The shared-shrink halves of the LoRA linear (`tinytune.ops.lora_shared`) on the Triton kernels.

    shrink    u = x A^T              `shrink`: one pass over x (A may stack the ranks of q, k and v)
              backward: grad_x = gu A and dA = gu^T x in one pass over x (`grad_x_` writing, not adding)
    expand    y = x W^T + b          one cuBLAS matmul, the one output allocation
              y += s u B^T           `expand_`: in place
              backward: gu = s g B and dB = s g^T u in one pass over g (`grad_g`); grad_x = g W (cuBLAS)

Same maths, arguments and gradients as `LoRAShrinkFunction` / `LoRAExpandFunction`; no dropout (see
`lora_shared`). Importing this module imports triton.
"""
from __future__ import annotations

import torch

from ..lora_matmul import _base_forward
from ..lora_shared import expand_base_grads, save_for_expand_backward
from .lora_kernels import expand_, grad_g, grad_x_, shrink


class TritonLoRAShrinkFunction(torch.autograd.Function):
    """`u = x A^T` on 2-D x, tensors in one dtype; use `lora_shrink(..., backend="triton")`."""

    @staticmethod
    def forward(ctx, x, lora_A):
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, lora_A)
        return shrink(x, lora_A, 0.0, 0)

    @staticmethod
    def backward(ctx, grad_u):
        x, lora_A = ctx.saved_tensors
        need_x, need_a = ctx.needs_input_grad
        grad_x = x.new_empty(x.shape) if need_x else None
        da = grad_x_(x, lora_A, grad_u.contiguous(), grad_x, 0.0, 0, need_a, accumulate=False)
        return grad_x, (da.to(lora_A.dtype) if need_a else None)


class TritonLoRAExpandFunction(torch.autograd.Function):
    """`y = x W^T + b + s u B^T` on 2-D x and u; use `lora_expand_linear(..., backend="triton")`."""

    @staticmethod
    def forward(ctx, x, weight, bias, u, lora_B, scaling: float):
        y = _base_forward(x, weight, bias)
        expand_(y, u, lora_B, scaling)
        save_for_expand_backward(ctx, x, weight, bias, u, lora_B, scaling)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, u, lora_B = ctx.saved_tensors
        need_u, need_b_lora = ctx.needs_input_grad[3:5]
        grad_u = grad_b = None
        if need_u or need_b_lora:
            gu, db = grad_g(grad_y, lora_B, u, ctx.scale, need_b_lora)  # (N, r) scaled; (d_out, r)
            grad_u = gu if need_u else None
            grad_b = db.to(lora_B.dtype) if need_b_lora else None
        return (*expand_base_grads(ctx, grad_y, x, weight), grad_u, grad_b, None)
