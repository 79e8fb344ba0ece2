"""The LoRA linear in two halves, so that projections reading one input share one shrink pass.

    u = lora_shrink(x, torch.cat([A_q, A_k, A_v]))             # one pass over x for every rank
    u_q, u_k, u_v = u.split([r_q, r_k, r_v], dim=-1)
    q = lora_expand_linear(x, W_q, b_q, u_q, B_q, s_q)         # x W^T + b + s u B^T

`lora_linear(x, W, b, A, B, s)` (no dropout) equals `lora_expand_linear(x, W, b, lora_shrink(x, A), B, s)`.
Split in two, the shrink `x A^T` of q, k and v (or gate and up) becomes one product with the ranks stacked:
x is read once instead of three times in the forward, and once instead of three times for `dA` in the backward
(on a GPU these passes over the N x d activation, not the skinny matmuls, are what the side products cost; see
docs/kernels.md). There is no dropout here: independent dropout masks per projection (PEFT's semantics) cannot
share the masked input, so `tinytune.peft.lora` shares the shrink only where the dropout is 0.

`lora_shrink` keeps `x` (a reference) and `A` for backward; `lora_expand_linear` keeps W, u and B, and `x`
only for a trainable W (under autocast the shrink's cast of x is then the group's one saved copy), and
does no gradient work for a frozen W / b. Both choose their backend as `lora_linear` does (`ops.backend.choose_backend`): "torch" runs `LoRAShrinkFunction` / `LoRAExpandFunction`
below, "triton" the kernels of `triton_kernels/lora_kernels.py` (`triton_kernels/shared_function.py`).
Under torch.compile both are plain differentiable torch ops, which the compiler traces.

Shapes: x (..., d_in), A (r, d_in), u (..., r), W (d_out, d_in), b (d_out,), B (d_out, r), y (..., d_out).
"""
from __future__ import annotations

import torch

from .backend import choose_backend
from .lora_matmul import _base_forward, _cast, _col_major, _compute_dtype, _tn


class LoRAShrinkFunction(torch.autograd.Function):
    """`u = x A^T` on 2-D x; backward `grad_x = gu A`, `dA = gu^T x`. Use `lora_shrink`."""

    @staticmethod
    def forward(ctx, x, lora_A):
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, lora_A)
        return torch.mm(x, lora_A.t())  # (N, r); A^T is column-major, torch's fast layout

    @staticmethod
    def backward(ctx, grad_u):
        x, lora_A = ctx.saved_tensors
        grad_u = grad_u.contiguous()  # the concatenated slices' gradients; _tn's split needs contiguous rows
        grad_x = torch.mm(grad_u, lora_A) if ctx.needs_input_grad[0] else None  # (N, d_in)
        grad_a = _tn(grad_u, x.contiguous()) if ctx.needs_input_grad[1] else None  # (r, d_in), one pass over x
        return grad_x, grad_a


class LoRAExpandFunction(torch.autograd.Function):
    """`y = x W^T + b + s u B^T` on 2-D x and u; use `lora_expand_linear`."""

    @staticmethod
    def forward(ctx, x, weight, bias, u, lora_B, scaling: float):
        y = _base_forward(x, weight, bias)  # the one output allocation
        y.addmm_(u, lora_B.t(), alpha=scaling)
        save_for_expand_backward(ctx, x, weight, bias, u, lora_B, scaling)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, u, lora_B = ctx.saved_tensors
        need_u, need_b_lora = ctx.needs_input_grad[3:5]
        grad_u = grad_b = None
        if need_u:
            grad_u = torch.mm(grad_y, _col_major(lora_B)).mul_(ctx.scale)  # (N, r)
        if need_b_lora:
            grad_b = _tn(u.contiguous(), grad_y).t().mul_(ctx.scale)  # (d_out, r); u is a slice of the group's
        return (*expand_base_grads(ctx, grad_y, x, weight), grad_u, grad_b, None)


def save_for_expand_backward(ctx, x, weight, bias, u, lora_B, scaling: float) -> None:
    """What an expand Function's backward needs: W, u, B and the scale, and x only for a trainable W (the
    shrink keeps the one x of the group: under autocast a second saved cast of it would cost memory)."""
    ctx.scale, ctx.has_bias = scaling, bias is not None
    if any(ctx.needs_input_grad):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight, u, lora_B)


def expand_base_grads(ctx, grad_y, x, weight) -> tuple:
    """The base part of an expand Function's backward, (grad_x, grad_W, grad_b): `g W` (the shrink adds the
    low-rank part of grad_x), `g^T x` only for a trainable W, the bias sum; None where not needed."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_x = torch.mm(grad_y, weight) if need_x else None  # (N, d_in)
    grad_w = torch.mm(grad_y.t(), x) if need_w else None  # (d_out, d_in)
    grad_bias = grad_y.sum(0) if need_b and ctx.has_bias else None
    return grad_x, grad_w, grad_bias


def _functions(backend: str | None, x: torch.Tensor):
    """(shrink Function, expand Function) of the chosen backend."""
    if choose_backend(backend, x) == "triton":
        from .triton_kernels.shared_function import TritonLoRAExpandFunction, TritonLoRAShrinkFunction

        return TritonLoRAShrinkFunction, TritonLoRAExpandFunction
    return LoRAShrinkFunction, LoRAExpandFunction


def lora_shrink(x: torch.Tensor, lora_A: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """`x A^T`: the low-rank input of one LoRA projection, or of several with their A stacked along the rank.

    Args:
        x: (..., d_in). lora_A: (r, d_in), cast to the compute dtype (the autocast dtype inside
            `torch.autocast`, else x's).
        backend: as `lora_linear`'s ("torch", "triton", "auto"; None reads `$TINYTUNE_KERNELS`).

    Returns:
        u of shape (..., r) in the compute dtype.

    Raises:
        ValueError: `lora_A` is not 2-D with x's feature count (the message gives both shapes), or a bad backend.
    """
    if lora_A.dim() != 2 or lora_A.shape[1] != x.shape[-1]:
        raise ValueError(f"lora_shrink: lora_A has shape {tuple(lora_A.shape)}, expected (r, {x.shape[-1]}) for x of "
                         f"shape {tuple(x.shape)}")
    dtype = _compute_dtype(x)
    x, lora_A = _cast(x, dtype), _cast(lora_A, dtype)
    x2 = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():
        return (x2 @ lora_A.t()).view(*x.shape[:-1], lora_A.shape[0])
    shrink_fn, _ = _functions(backend, x2)
    with torch.autocast(x.device.type, enabled=False):
        u = shrink_fn.apply(x2, lora_A)
    return u.view(*x.shape[:-1], lora_A.shape[0])


def _check_expand(x, weight, u, lora_B) -> None:
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"lora_expand_linear: x has {x.shape[-1]} features, weight has shape {tuple(weight.shape)}")
    if u.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"lora_expand_linear: u has shape {tuple(u.shape)}, expected {tuple(x.shape[:-1])} + (r,) "
                         f"for x of shape {tuple(x.shape)}")
    if tuple(lora_B.shape) != (weight.shape[0], u.shape[-1]):
        raise ValueError(f"lora_expand_linear: lora_B has shape {tuple(lora_B.shape)}, expected "
                         f"{(weight.shape[0], u.shape[-1])} (d_out, r)")


def lora_expand_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor,
                       lora_B: torch.Tensor, scaling: float, *, backend: str | None = None) -> torch.Tensor:
    """`x W^T + b + scaling * u B^T`, with `u = lora_shrink(x, A)` (or this projection's slice of a shared one).

    Args:
        x: (..., d_in); weight (d_out, d_in), frozen or trainable; bias (d_out,) or None.
        u: (..., r), x's leading shape; lora_B (d_out, r). All cast to the compute dtype.
        scaling: the LoRA scale. backend: as `lora_linear`'s.

    Returns:
        y of shape (..., d_out) in the compute dtype.

    Raises:
        ValueError: shapes of `x`, `weight`, `u`, `lora_B` that do not fit together (named), or a bad backend.
    """
    _check_expand(x, weight, u, lora_B)
    dtype = _compute_dtype(x)
    x, weight, bias, u, lora_B = (_cast(t, dtype) for t in (x, weight, bias, u, lora_B))
    lead, r = x.shape[:-1], u.shape[-1]
    x2, u2 = x.reshape(-1, x.shape[-1]), u.reshape(-1, r)
    if torch.compiler.is_compiling():
        y = torch.addmm(_base_forward(x2, weight, bias), u2, lora_B.t(), alpha=float(scaling))
        return y.view(*lead, weight.shape[0])
    _, expand_fn = _functions(backend, x2)
    with torch.autocast(x.device.type, enabled=False):
        y = expand_fn.apply(x2, weight, bias, u2, lora_B, float(scaling))
    return y.view(*lead, weight.shape[0])


__all__ = ["LoRAExpandFunction", "LoRAShrinkFunction", "lora_expand_linear", "lora_shrink"]
