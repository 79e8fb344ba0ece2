"""Triton path of `linear_cross_entropy`: the softmax, the loss and the logits' gradient in one kernel.

Per chunk of C rows, torch's matmul makes the (C, V) logits z = h W^T in the matmul dtype; then one
program per row walks z in blocks of BLOCK_V columns twice: first an online max / sum-exp (fp32, or fp64
for fp64 inputs) giving lse and the row's loss lse - z_y, then it overwrites z in place with the gradient
of the loss w.r.t. the logits, softmax(z) - onehot(y) (zero on ignored rows). grad_hidden = dz W and
grad_weight += dz^T h follow as two matmuls, so the forward computes every gradient; backward only
scales them by grad_output. Peak extra memory: one (C, V) chunk of logits, reused as its own gradient.

Imported lazily by `tinytune.ops.cross_entropy` when the "triton" backend is chosen; it imports triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import interpreting
from ..cross_entropy import _check_head_args, _chunk_logits, _compute_dtype, scaled_saved_grads

MAX_BLOCK_V = 4096  # columns per step of the row loop
# Rows per program: one on a GPU (a row's V-long loop is the parallel unit, as in Liger); a tile of rows
# under the interpreter, whose cost is per program and per op, not per element.
BLOCK_ROWS = {"gpu": 1, "interpreter": 16}


@triton.jit
def _row_stats(z_rows, row_ok, V, ACC: tl.constexpr, BLOCK_V: tl.constexpr, WITH_ENT: tl.constexpr):
    """Online softmax statistics of a tile of rows (pointers (R, 1) to each row's start, row_ok (R, 1)):
    (m, s, t), each (R,), with m the max, s = sum exp(z - m) and t = sum exp(z - m) (z - m) (only when
    WITH_ENT), so lse = m + log s and entropy = log s - t / s. Rows past the chunk are never read: they
    see zeros (finite statistics, never stored)."""
    cols = tl.arange(0, BLOCK_V)[None, :]  # (1, BLOCK_V)
    m = tl.full([z_rows.shape[0]], -1e30, ACC)  # finite start: 0 * (m - m_new) stays 0 on the first block
    s = tl.zeros([z_rows.shape[0]], ACC)
    t = tl.zeros([z_rows.shape[0]], ACC)
    for start in range(0, V, BLOCK_V):
        inside = start + cols < V
        z = tl.load(z_rows + start + cols, mask=row_ok & inside, other=float("-inf")).to(ACC)  # (R, BLOCK_V)
        z = tl.where(row_ok, z, 0.0)
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])  # 0 outside V
        if WITH_ENT:
            # rebase t from m to m_new: sum e' (z - m_new) = alpha (t + s (m - m_new))
            t = alpha * (t + s * (m - m_new)) + tl.sum(e * tl.where(inside, z - m_new[:, None], 0.0), 1)
        s = alpha * s + tl.sum(e, 1)
        m = m_new
    return m, s, t


@triton.jit
def _write_grad(z_rows, row_ok, V, target, lse, ent, c_lp, c_ent, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
                WITH_ENT: tl.constexpr):
    """Overwrite a tile of rows (pointers (R, 1), row_ok (R, 1), the rest (R,)) with
    c_lp (onehot(target) - p) - c_ent p (log p + ent), p = exp(z - lse)."""
    cols = tl.arange(0, BLOCK_V)[None, :]
    for start in range(0, V, BLOCK_V):
        inside = row_ok & (start + cols < V)
        z = tl.load(z_rows + start + cols, mask=inside, other=0.0).to(ACC)  # (R, BLOCK_V)
        logp = z - lse[:, None]
        p = tl.exp(logp)
        g = c_lp[:, None] * (tl.where(start + cols == target[:, None], 1.0, 0.0) - p)
        if WITH_ENT:
            g -= c_ent[:, None] * p * (logp + ent[:, None])
        tl.store(z_rows + start + cols, g.to(z_rows.dtype.element_ty), mask=inside)


@triton.jit
def _cross_entropy_kernel(z_ptr, target_ptr, loss_ptr, C, V, stride, ACC: tl.constexpr, BLOCK_V: tl.constexpr,
                          ROWS: tl.constexpr, WRITE_GRAD: tl.constexpr):
    """Rows r of a (C, V) chunk, ROWS per program: loss[r] = lse - z_y (0 when target < 0, the ignored
    rows); when WRITE_GRAD, z[r] becomes softmax - onehot (zeros on ignored rows), in z's dtype."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (R,)
    row_ok = rows < C
    z_rows = z_ptr + rows[:, None] * stride  # (R, 1)
    target = tl.load(target_ptr + rows, mask=row_ok, other=-1)
    valid = target >= 0
    m, s, t = _row_stats(z_rows, row_ok[:, None], V, ACC, BLOCK_V, False)
    lse = m + tl.log(s)
    z_y = tl.load(z_ptr + rows * stride + tl.maximum(target, 0), mask=row_ok, other=0.0).to(ACC)
    tl.store(loss_ptr + rows, tl.where(valid, lse - z_y, 0.0), mask=row_ok)
    if WRITE_GRAD:
        # -1 * (onehot - p) = p - onehot; an ignored row gets c_lp = 0, so all zeros
        c_lp = tl.where(valid, -1.0, 0.0).to(ACC)
        _write_grad(z_rows, row_ok[:, None], V, target, lse, lse, c_lp, c_lp, ACC, BLOCK_V, False)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The softmax dtype for a matmul dtype: fp32, or fp64 for fp64 (gradcheck)."""
    return torch.promote_types(torch.float32, dtype)


def tl_dtype(dtype: torch.dtype):
    """The triton dtype of fp32 / fp64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def pick_block_v(V: int, block_v: int | None) -> int:
    """Columns per step: `block_v` (a power of two) or the next power of two of V up to MAX_BLOCK_V."""
    if block_v is None:
        return min(triton.next_power_of_2(V), MAX_BLOCK_V)
    if isinstance(block_v, bool) or not isinstance(block_v, int) or block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 1, got {block_v!r}")
    return block_v


def pick_rows(C: int) -> tuple[int, tuple[int]]:
    """(rows per program, launch grid) for a chunk of C rows."""
    rows = BLOCK_ROWS["interpreter" if interpreting() else "gpu"]
    return rows, (triton.cdiv(C, rows),)


def kernel_targets(targets: torch.Tensor, ignore_index: int, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid (N,) bool, targets (N,) int64 with ignored rows set to -1) for the kernels.

    Raises:
        ValueError: a target outside [0, V) that is not ignore_index (the kernel would read past the row).
    """
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(f"target {value} is outside the vocabulary [0, {V}) and is not ignore_index={ignore_index}")
    return valid, torch.where(valid, targets, torch.full_like(targets, -1)).long().contiguous()


class TritonLinearCrossEntropyFunction(torch.autograd.Function):
    """`LinearCrossEntropyFunction` with the softmax and dlogits in a Triton kernel.

    forward(hidden (N, d), weight (V, d), labels (N,), ignore_index, chunk_size, dtype, grad_enabled,
    block_v) -> the summed loss over scored rows, fp32 (fp64 for fp64 dtype). Saved for backward:
    grad_hidden (N, d) in hidden's dtype and, when weight requires grad, grad_weight (V, d) in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk_size: int, dtype: torch.dtype,
                grad_enabled: bool = True, block_v: int | None = None):
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        V, acc = weight.shape[0], acc_dtype(dtype)
        _, tgt = kernel_targets(labels, ignore_index, V)
        block = pick_block_v(V, block_v)
        losses = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)  # (N,)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None  # frozen: none
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)  # (V, d): cast once
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                h = hidden[rows].to(dtype)  # (C, d)
                z = _chunk_logits(h, w, dtype).contiguous()  # (C, V) in dtype; becomes dz in place
                per, grid = pick_rows(z.shape[0])
                _cross_entropy_kernel[grid](z, tgt[rows], losses[rows], z.shape[0], V, z.stride(0), ACC=tl_dtype(acc),
                                            BLOCK_V=block, ROWS=per, WRITE_GRAD=need_h or need_w)
                if need_h:
                    grad_h[rows] = z @ w  # (C, d)
                if need_w:
                    grad_w += z.T @ h  # (V, d), accumulated in fp32
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_total):
        return (*scaled_saved_grads(ctx, grad_total), None, None, None, None, None, None)


def linear_cross_entropy_triton(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                ignore_index: int = -100, reduction: str = "mean", chunk_size: int = 512,
                                block_v: int | None = None) -> torch.Tensor:
    """`linear_cross_entropy` on the Triton kernel (same arguments and semantics; `block_v` columns per
    kernel step, a power of two, default the next power of two of V up to MAX_BLOCK_V).

    Raises:
        ValueError: mismatched shapes, an unknown reduction, a chunk_size < 1, a bad block_v, or a label
            outside the vocabulary.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be one of ('mean', 'sum'), got {reduction!r}")
    _check_head_args(hidden, weight, labels, chunk_size, "labels")
    dtype = _compute_dtype(hidden, weight)
    flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)  # (N, d), (N,)
    total = TritonLinearCrossEntropyFunction.apply(flat_h, weight, flat_y, ignore_index, chunk_size, dtype,
                                                   torch.is_grad_enabled(), block_v)
    if reduction == "sum":
        return total
    return total / (flat_y != ignore_index).sum()
