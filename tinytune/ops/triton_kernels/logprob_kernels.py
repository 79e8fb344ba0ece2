"""Triton path of `linear_token_logprobs`: per-token log p(target), entropy and their logits' gradients.

With z = h W^T (torch's matmul, one chunk of C rows at a time), p = softmax(z), H = -sum p log p:
    d log p_y / dz = onehot(y) - p          d H / dz = -p (log p + H)
A stats kernel (one program per row, blocks of BLOCK_V columns, fp32 or fp64) gives lse, log p_y and H;
a gradient kernel overwrites a chunk's logits in place with g_lp (onehot - p) - g_ent p (log p + H).

Unlike the cross-entropy, the upstream gradient differs per row, so where it goes decides the schedule:
- frozen head (weight.requires_grad False, the RL case: every role is an adapter on one frozen base):
  grad_hidden is linear in the per-row upstream gradients, grad_h = g_lp * [(onehot - p) W] + g_ent *
  [-p (log p + H) W], so the forward computes the bracketed (N, d) rows (one more with entropy) and
  backward only scales them: no logits recomputed.
- trained head: grad_weight = dz^T h needs the upstream gradients inside the V-sized product, so backward
  recomputes each chunk's logits (as the torch path does) and runs the gradient kernel on them.
Peak extra memory: one (C, V) chunk of logits (two in the frozen-head forward with entropy).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..cross_entropy import _check_head_args, _chunk_logits, _compute_dtype
from .cross_entropy_kernels import (_row_stats, _write_grad, acc_dtype, kernel_targets, pick_block_v, pick_rows,
                                    tl_dtype)


@triton.jit
def _logprob_stats_kernel(z_ptr, target_ptr, lse_ptr, logp_ptr, ent_ptr, C, V, stride, ACC: tl.constexpr,
                          BLOCK_V: tl.constexpr, ROWS: tl.constexpr, WITH_ENT: tl.constexpr):
    """Rows r of a (C, V) chunk, ROWS per program: lse[r], logp[r] = z_y - lse and (WITH_ENT) ent[r];
    logp and ent are 0 where target < 0."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (R,)
    row_ok = rows < C
    target = tl.load(target_ptr + rows, mask=row_ok, other=-1)
    valid = target >= 0
    m, s, t = _row_stats(z_ptr + rows[:, None] * stride, row_ok[:, None], V, ACC, BLOCK_V, WITH_ENT)
    lse = m + tl.log(s)
    z_y = tl.load(z_ptr + rows * stride + tl.maximum(target, 0), mask=row_ok, other=0.0).to(ACC)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(logp_ptr + rows, tl.where(valid, z_y - lse, 0.0), mask=row_ok)
    if WITH_ENT:
        tl.store(ent_ptr + rows, tl.where(valid, tl.log(s) - t / s, 0.0), mask=row_ok)


@triton.jit
def _logprob_grad_kernel(z_ptr, target_ptr, lse_ptr, ent_ptr, g_lp_ptr, g_ent_ptr, C, V, stride,
                         ACC: tl.constexpr, BLOCK_V: tl.constexpr, ROWS: tl.constexpr, HAS_LP: tl.constexpr,
                         HAS_ENT: tl.constexpr):
    """Rows r of a (C, V) chunk become g_lp[r] (onehot - p) - g_ent[r] p (log p + H[r]), zeros where
    target < 0; a term whose HAS_ flag is off is left out (its upstream gradient is None)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (R,)
    row_ok = rows < C
    target = tl.load(target_ptr + rows, mask=row_ok, other=-1)
    valid = target >= 0
    c_lp = tl.zeros([ROWS], ACC)
    c_ent = tl.zeros([ROWS], ACC)
    ent = tl.zeros([ROWS], ACC)
    if HAS_LP:
        c_lp = tl.where(valid, tl.load(g_lp_ptr + rows, mask=row_ok, other=0.0).to(ACC), 0.0)
    if HAS_ENT:
        c_ent = tl.where(valid, tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0).to(ACC), 0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(ACC)
    _write_grad(z_ptr + rows[:, None] * stride, row_ok[:, None], V, target, lse, ent, c_lp, c_ent, ACC, BLOCK_V,
                HAS_ENT)


def _grad_logits(z, tgt, lse, ent, g_lp, g_ent, block: int) -> torch.Tensor:
    """Run the gradient kernel in place on one chunk z (C, V); g_lp / g_ent (C,) or None. Returns z."""
    dummy = lse  # never read when its flag is off
    per, grid = pick_rows(z.shape[0])
    _logprob_grad_kernel[grid](z, tgt, lse, dummy if ent is None else ent, dummy if g_lp is None else g_lp.contiguous(),
                               dummy if g_ent is None else g_ent.contiguous(), z.shape[0], z.shape[1], z.stride(0),
                               ACC=tl_dtype(lse.dtype), BLOCK_V=block, ROWS=per, HAS_LP=g_lp is not None,
                               HAS_ENT=g_ent is not None)
    return z


class TritonLinearTokenLogprobsFunction(torch.autograd.Function):
    """`LinearTokenLogprobsFunction` on Triton kernels (see the module docstring for the two schedules).

    forward(hidden (N, d), weight (V, d), targets (N,), ignore_index, chunk_size, dtype, with_entropy,
    grad_enabled, block_v) -> logprobs (N,) or (logprobs, entropy), fp32 (fp64 for fp64 dtype), 0 on
    ignored rows.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_size: int, dtype: torch.dtype,
                with_entropy: bool = False, grad_enabled: bool = True, block_v: int | None = None):
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        N, V, acc = hidden.shape[0], weight.shape[0], acc_dtype(dtype)
        _, tgt = kernel_targets(targets, ignore_index, V)
        block = pick_block_v(V, block_v)
        lse, logprobs = (torch.zeros(N, dtype=acc, device=hidden.device) for _ in range(2))  # (N,)
        entropy = torch.zeros_like(lse) if with_entropy else None
        early = need_h and not need_w  # frozen head: grad_hidden's rows now, nothing recomputed later
        rows_lp = torch.empty_like(hidden) if early else None  # (N, d): (onehot - p) W
        rows_ent = torch.empty_like(hidden) if early and with_entropy else None  # (N, d): -p (log p + H) W
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)  # (V, d)
            for start in range(0, N, chunk_size):
                rows = slice(start, start + chunk_size)
                z = _chunk_logits(hidden[rows], w, dtype).contiguous()  # (C, V)
                per, grid = pick_rows(z.shape[0])
                _logprob_stats_kernel[grid](z, tgt[rows], lse[rows], logprobs[rows],
                                            lse[rows] if entropy is None else entropy[rows], z.shape[0], V, z.stride(0),
                                            ACC=tl_dtype(acc), BLOCK_V=block, ROWS=per, WITH_ENT=with_entropy)
                if early:
                    _early_rows(z, tgt[rows], lse[rows], entropy, rows, w, rows_lp, rows_ent, block)
        if early:
            ctx.save_for_backward(rows_lp, rows_ent)
        else:
            ctx.save_for_backward(hidden, weight, tgt, lse, entropy)
        ctx.early, ctx.dtype, ctx.chunk_size, ctx.block = early, dtype, chunk_size, block
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros
        return (logprobs, entropy) if with_entropy else logprobs

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy=None):
        nones = (None,) * 7
        if ctx.early:
            return (_scale_rows(*ctx.saved_tensors, grad_logprobs, grad_entropy), None) + nones
        return _recompute_backward(ctx, grad_logprobs, grad_entropy) + nones


def _early_rows(z, tgt, lse, entropy, rows, w, rows_lp, rows_ent, block: int) -> None:
    """Frozen head: fill rows_lp[rows] = (onehot - p) W and rows_ent[rows] = -p (log p + H) W from z (C, V)."""
    z_ent = z.clone() if rows_ent is not None else None  # the first kernel overwrites z
    ones = torch.ones_like(lse)
    rows_lp[rows] = _grad_logits(z, tgt, lse, None, ones, None, block) @ w  # (C, d)
    if rows_ent is not None:
        rows_ent[rows] = _grad_logits(z_ent, tgt, lse, entropy[rows], None, ones, block) @ w


def _scale_rows(rows_lp, rows_ent, grad_logprobs, grad_entropy):
    """grad_hidden = g_lp * rows_lp + g_ent * rows_ent (None terms left out; None when both are)."""
    grad_h = None
    if grad_logprobs is not None:
        grad_h = rows_lp * grad_logprobs[:, None].to(rows_lp.dtype)
    if grad_entropy is not None:
        term = rows_ent * grad_entropy[:, None].to(rows_ent.dtype)
        grad_h = term if grad_h is None else grad_h + term
    return grad_h if grad_h is not None else torch.zeros_like(rows_lp)


def _recompute_backward(ctx, grad_logprobs, grad_entropy):
    """Trained head: recompute each chunk's logits, turn them into dz, then grad_h = dz W, grad_w += dz^T h."""
    hidden, weight, tgt, lse, entropy = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dtype, acc = ctx.dtype, acc_dtype(ctx.dtype)
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    if grad_logprobs is None and grad_entropy is None or not (need_h or need_w):
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h = hidden[rows].to(dtype)  # (C, d)
            g = _grad_logits(_chunk_logits(h, w, dtype).contiguous(), tgt[rows], lse[rows],
                             None if entropy is None else entropy[rows],
                             None if grad_logprobs is None else grad_logprobs[rows],
                             None if grad_entropy is None else grad_entropy[rows], ctx.block)  # (C, V) dz
            if need_h:
                grad_h[rows] = g @ w  # (C, d)
            if need_w:
                grad_w += g.T @ h  # (V, d), accumulated in fp32
    return grad_h, None if grad_w is None else grad_w.to(weight.dtype)


def linear_token_logprobs_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 chunk_size: int = 512, ignore_index: int = -100, return_entropy: bool = False,
                                 block_v: int | None = None):
    """`linear_token_logprobs` on the Triton kernels (same arguments and semantics; `block_v` columns per
    kernel step, a power of two).

    Raises:
        ValueError: mismatched shapes, a chunk_size < 1, a bad block_v, or a target outside the vocabulary.
    """
    _check_head_args(hidden, weight, targets, chunk_size, "targets")
    dtype = _compute_dtype(hidden, weight)
    flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (N, d), (N,)
    out = TritonLinearTokenLogprobsFunction.apply(flat_h, weight, flat_y, ignore_index, chunk_size, dtype,
                                                  bool(return_entropy), torch.is_grad_enabled(), block_v)
    if return_entropy:
        return out[0].reshape(targets.shape), out[1].reshape(targets.shape)
    return out.reshape(targets.shape)
