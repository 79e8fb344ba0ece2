"""Chunked linear + cross-entropy: the loss of `hidden @ weight.T` without the full (N, V) logits.

A language model's loss is `cross_entropy(hidden @ W.T, labels)` with W the (V, d) output head. Done
plainly, forward keeps the (N, V) logits and the log-softmax for backward, and backward makes an (N, V)
gradient: with N = 2048 tokens and V = 8192 that is 64 MiB each in fp32. Here forward walks the rows in
chunks, keeping only each row's logsumexp (N,) and a reference to `hidden`; backward recomputes each
chunk's logits and turns them into `softmax - onehot` on the spot. Peak extra memory: one chunk of logits.
"""
from __future__ import annotations

import torch

_REDUCTIONS = ("mean", "sum")


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on for hidden's device, else the promoted input dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(C, d) x (V, d) -> (C, V) logits in `dtype` (what autocast's matmul would give); `w` already in dtype."""
    return h.to(dtype) @ w.T


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` over the rows whose label is not ignored.

    forward(hidden (N, d), weight (V, d), labels (N,), ignore_index, chunk_size, dtype) -> scalar sum, in fp32
    (fp64 when dtype is fp64); `dtype` is the matmul dtype.
    Saved for backward: hidden and weight (references), labels, the (N,) fp32 logsumexp.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk_size: int, dtype: torch.dtype):
        valid = labels != ignore_index  # (N,)
        safe = torch.where(valid, labels, torch.zeros_like(labels))  # ignored rows gather column 0, masked below
        acc = torch.promote_types(torch.float32, dtype)  # log-softmax dtype: fp32, or fp64 for gradcheck
        lse = torch.empty(labels.shape[0], dtype=acc, device=hidden.device)  # (N,)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)  # (V, d): cast once, not per chunk
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                logits = _chunk_logits(hidden[rows], w, dtype).to(acc)  # (C, V) fp32, as F.cross_entropy
                lse[rows] = torch.logsumexp(logits, dim=-1)
                target = logits.gather(1, safe[rows, None]).squeeze(1)  # (C,)
                total += ((lse[rows] - target) * valid[rows]).sum()
        ctx.save_for_backward(hidden, weight, safe, valid, lse)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, safe, valid, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = lse.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        scale = valid.to(acc) * grad_total.to(acc)  # (N,): 0 on ignored rows
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(ctx.dtype)
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                h = hidden[rows].to(ctx.dtype)  # (C, d)
                # d(lse - z_y)/dz = softmax(z) - onehot(y), per row times the upstream scale.
                g = _chunk_logits(h, w, ctx.dtype).to(acc).sub_(lse[rows, None]).exp_()  # (C, V)
                g.scatter_add_(1, safe[rows, None], torch.full_like(lse[rows, None], -1.0))
                g = g.mul_(scale[rows, None]).to(ctx.dtype)
                if need_h:
                    grad_h[rows] = g @ w  # (C, d)
                if need_w:
                    grad_w += g.T @ h  # (V, d), accumulated in fp32
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", chunk_size: int = 512) -> torch.Tensor:
    """`F.cross_entropy(hidden @ weight.T, labels)` chunk by chunk, never holding the full logits.

    Under autocast the chunk logits are computed in the autocast dtype (as `hidden @ weight.T` would be)
    and the log-softmax in fp32. Gradients flow to `hidden` and, when it requires grad, to `weight`.

    Args:
        hidden: (..., d) hidden states, any leading dims.
        weight: (V, d) output head (e.g. `lm_head.weight`; no bias).
        labels: (...) class ids matching hidden's leading dims; `ignore_index` where not scored.
        ignore_index: the label of positions left out of the loss and its count.
        reduction: "mean" (over scored positions; NaN when none, as F.cross_entropy) or "sum" (divide it
            yourself, e.g. by the scored tokens of a whole accumulated batch).
        chunk_size: rows per chunk; peak extra memory is about chunk_size x V x 8 bytes.

    Returns:
        A scalar fp32 loss.

    Raises:
        ValueError: mismatched shapes, an unknown reduction or a chunk_size < 1.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1] or tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"expected hidden (..., d), weight (V, d), labels (...) with hidden's leading dims; got "
                         f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, labels {tuple(labels.shape)}")
    dtype = _compute_dtype(hidden, weight)
    flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)  # (N, d), (N,)
    total = LinearCrossEntropyFunction.apply(flat_h, weight, flat_y, ignore_index, chunk_size, dtype)
    if reduction == "sum":
        return total
    return total / (flat_y != ignore_index).sum()
