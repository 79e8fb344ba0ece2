"""Chunked linear + cross-entropy: the loss of `hidden @ weight.T` without the full (N, V) logits.

A language model's loss is `cross_entropy(hidden @ W.T, labels)` with W the (V, d) output head. Done
plainly, forward keeps the (N, V) logits and the log-softmax for backward, and backward makes an (N, V)
gradient: with N = 2048 tokens and V = 8192 that is 64 MiB each in fp32. Here forward walks the rows in
chunks and, since the loss is a scalar, turns each chunk's `softmax - onehot` straight into its rows of
the gradient with respect to `hidden` (N, d): that is all backward keeps, and backward only scales it.
Peak extra memory: one chunk of logits; no logits are recomputed.

`torch.compile` traces it as it is, with no twin: dynamo inlines the autograd Function and unrolls the
chunk loop into the surrounding graph, and the compiled step still keeps only grad_hidden's chunks (and
grad_weight), never logits (checked in tests/test_compile.py).
"""
from __future__ import annotations

import torch

from .backend import choose_backend

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


def _check_head_args(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                     name: str) -> None:
    """Raise ValueError unless chunk_size is an int >= 1 and hidden (..., d), weight (V, d) and the
    targets (...) called `name` (with hidden's leading dims) fit together."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1] or tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"expected hidden (..., d), weight (V, d), {name} (...) with hidden's leading dims; got "
                         f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, {name} {tuple(targets.shape)}")


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` over the rows whose label is not ignored.

    forward(hidden (N, d), weight (V, d), labels (N,), ignore_index, chunk_size, dtype) -> scalar sum, in fp32
    (fp64 when dtype is fp64); `dtype` is the matmul dtype.

    The loss is a scalar, so its gradient is known up to the upstream factor as soon as each chunk's
    softmax is: forward computes `softmax - onehot` per chunk and turns it straight into the (C, d)
    rows of grad_hidden (and into grad_weight when the head trains). Saved for backward: grad_hidden
    (N, d), the size of `hidden` itself, instead of (N, V) logits; backward only scales it, so no
    logits are recomputed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk_size: int, dtype: torch.dtype,
                grad_enabled: bool = True):
        # Inside forward grad mode is always off, so the caller says whether a backward can follow.
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        valid = labels != ignore_index  # (N,)
        safe = torch.where(valid, labels, torch.zeros_like(labels))  # ignored rows gather column 0, masked below
        acc = torch.promote_types(torch.float32, dtype)  # log-softmax dtype: fp32, or fp64 for gradcheck
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)  # (V, d): cast once, not per chunk
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                h = hidden[rows].to(dtype)  # (C, d)
                logits = _chunk_logits(h, w, dtype).to(acc)  # (C, V) fp32, as F.cross_entropy
                lse = torch.logsumexp(logits, dim=-1)  # (C,)
                target = logits.gather(1, safe[rows, None]).squeeze(1)  # (C,)
                total += ((lse - target) * valid[rows]).sum()
                if need_h or need_w:
                    # d(lse - z_y)/dz = softmax(z) - onehot(y), zero on ignored rows; in place on logits.
                    g = logits.sub_(lse[:, None]).exp_()
                    g.scatter_add_(1, safe[rows, None], torch.full_like(lse[:, None], -1.0))
                    g = g.mul_(valid[rows, None]).to(dtype)
                    if need_h:
                        grad_h[rows] = g @ w  # (C, d)
                    if need_w:
                        grad_w += g.T @ h  # (V, d), accumulated in fp32
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        return (*scaled_saved_grads(ctx, grad_total), None, None, None, None, None)


def scaled_saved_grads(ctx, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The (grad_hidden, grad_weight) a forward computed and saved, times the upstream scalar gradient (the
    weight's in its own dtype): the whole backward of a loss whose gradient is made in the forward."""
    grad_h, grad_w = ctx.saved_tensors
    if grad_h is not None:
        grad_h = grad_h * grad_total.to(grad_h.dtype)
    if grad_w is not None:
        grad_w = (grad_w * grad_total.to(grad_w.dtype)).to(ctx.weight_dtype)
    return grad_h, grad_w


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean", chunk_size: int = 512,
                         backend: str | None = None) -> torch.Tensor:
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
        backend: "torch", "triton" (the kernel of `tinytune.ops.triton_kernels.cross_entropy_kernels`:
            softmax, loss and dlogits in one pass per chunk) or "auto"; None reads $TINYTUNE_KERNELS,
            else "auto" (Triton on CUDA when installed). See `tinytune.ops.backend.choose_backend`.

    The gradients are computed during the forward pass (see `LinearCrossEntropyFunction`) when grad
    mode is on and an input requires grad; under `torch.no_grad()` only the loss is computed.

    Returns:
        A scalar fp32 loss.

    Raises:
        ValueError: mismatched shapes, an unknown reduction, a chunk_size < 1 or an unknown backend.
        RuntimeError: backend "triton" where it cannot run (see `choose_backend`).
    """
    if choose_backend(backend, hidden) == "triton":
        from .triton_kernels.cross_entropy_kernels import linear_cross_entropy_triton  # imports triton

        return linear_cross_entropy_triton(hidden, weight, labels, ignore_index, reduction, chunk_size)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    _check_head_args(hidden, weight, labels, chunk_size, "labels")
    dtype = _compute_dtype(hidden, weight)
    flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)  # (N, d), (N,)
    total = LinearCrossEntropyFunction.apply(flat_h, weight, flat_y, ignore_index, chunk_size, dtype,
                                             torch.is_grad_enabled())
    if reduction == "sum":
        return total
    return total / (flat_y != ignore_index).sum()
