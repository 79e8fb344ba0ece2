"""Chunked per-token log-probabilities of `hidden @ weight.T`, without the full (N, V) logits.

Preference losses (DPO, reward models, PPO's ratios) need `log p(target)` for every token, not one
scalar loss, so the trick of `linear_cross_entropy` (turn each chunk's softmax into its gradient rows
during forward) does not apply: the upstream gradient differs per row and is only known in backward.
Here forward walks the rows in chunks and keeps nothing but (N,) outputs; backward recomputes each
chunk's logits and turns them, with that chunk's upstream gradients, into rows of grad_hidden (and
grad_weight when the head trains). Peak extra memory: one chunk of logits, in forward and in backward;
the price is a second (N, d) x (d, V) matmul in backward.

With z = h W^T, log p = z - lse(z), p = softmax(z) and the entropy H = -sum p log p:
    d log p_y / dz = onehot(y) - p
    d H / dz       = -p * (log p + H)
"""
from __future__ import annotations

import torch

from .backend import choose_backend
from .cross_entropy import _check_head_args, _chunk_logits, _compute_dtype


def _chunk_log_softmax(h: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, acc: torch.dtype) -> torch.Tensor:
    """(C, d) x (V, d) -> (C, V) log-softmax in `acc` of the logits computed in `dtype`."""
    logits = _chunk_logits(h, w, dtype).to(acc)  # (C, V)
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """Per-row `log_softmax(hidden @ weight.T)[target]` (and the entropy), 0 on ignored rows.

    forward(hidden (N, d), weight (V, d), targets (N,), ignore_index, chunk_size, dtype, with_entropy)
    -> logprobs (N,), or (logprobs (N,), entropy (N,)) when with_entropy; in fp32 (fp64 when dtype is
    fp64); `dtype` is the matmul dtype. Saved for backward: the inputs only (references, no logits);
    backward recomputes the logits chunk by chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_size: int, dtype: torch.dtype,
                with_entropy: bool = False):
        valid = targets != ignore_index  # (N,)
        safe = torch.where(valid, targets, torch.zeros_like(targets))  # ignored rows gather column 0
        acc = torch.promote_types(torch.float32, dtype)  # log-softmax dtype: fp32, or fp64 for gradcheck
        logprobs = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)  # (N,)
        entropy = torch.zeros_like(logprobs) if with_entropy else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)  # (V, d): cast once, not per chunk
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                logp = _chunk_log_softmax(hidden[rows], w, dtype, acc)  # (C, V)
                logprobs[rows] = logp.gather(1, safe[rows, None]).squeeze(1) * valid[rows]
                if with_entropy:
                    entropy[rows] = -(logp.exp() * logp).sum(-1) * valid[rows]
        ctx.save_for_backward(hidden, weight, safe, valid)
        ctx.dtype, ctx.chunk_size = dtype, chunk_size
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros
        return (logprobs, entropy) if with_entropy else logprobs

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy=None):
        hidden, weight, safe, valid = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype, acc = ctx.dtype, torch.promote_types(torch.float32, ctx.dtype)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        if grad_logprobs is None and grad_entropy is None or not (need_h or need_w):
            return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None, None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                h = hidden[rows].to(dtype)  # (C, d)
                g = _chunk_grad_logits(_chunk_log_softmax(h, w, dtype, acc), safe[rows], valid[rows],
                                       _rows(grad_logprobs, rows, acc), _rows(grad_entropy, rows, acc)).to(dtype)
                if need_h:
                    grad_h[rows] = g @ w  # (C, d)
                if need_w:
                    grad_w += g.T @ h  # (V, d), accumulated in fp32
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None, None


def _rows(grad: torch.Tensor | None, rows: slice, acc: torch.dtype) -> torch.Tensor | None:
    """One chunk of an upstream gradient (N,) as a (C, 1) column in `acc`, or None."""
    return None if grad is None else grad[rows, None].to(acc)


def _chunk_grad_logits(logp: torch.Tensor, safe: torch.Tensor, valid: torch.Tensor,
                       g_lp: torch.Tensor | None, g_ent: torch.Tensor | None) -> torch.Tensor:
    """The gradient w.r.t. one chunk's logits (C, V), in place on `logp`, zero on ignored rows.

    Args: logp (C, V) log-softmax; safe (C,) targets; valid (C,) bool; g_lp, g_ent (C, 1) or None.
    """
    p = logp.exp()  # (C, V)
    g = torch.zeros_like(logp)
    if g_lp is not None:  # g_lp * (onehot(y) - p)
        g.sub_(p * g_lp).scatter_add_(1, safe[:, None], g_lp)
    if g_ent is not None:  # -g_ent * p * (log p + H)
        ent = -(p * logp).sum(-1, keepdim=True)  # (C, 1)
        g.sub_(logp.add_(ent).mul_(p).mul_(g_ent))
    return g.mul_(valid[:, None])


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int = 512, ignore_index: int = -100, return_entropy: bool = False,
                          backend: str | None = None):
    """`log_softmax(hidden @ weight.T).gather(-1, targets)` chunk by chunk, never holding the full logits.

    Under autocast the chunk logits are computed in the autocast dtype (as `hidden @ weight.T` would be)
    and the log-softmax in fp32. Gradients flow to `hidden` and, when it requires grad, to `weight`; the
    logits are recomputed per chunk in backward.

    Args:
        hidden: (..., d) hidden states, any leading dims.
        weight: (V, d) output head (e.g. `lm_head.weight`; no bias).
        targets: (...) token ids matching hidden's leading dims; `ignore_index` where not scored.
        chunk_size: rows per chunk; peak extra memory is about chunk_size x V x 8 bytes.
        ignore_index: the target of rows that get 0 (and no gradient).
        return_entropy: also return the entropy of each row's distribution (0 on ignored rows).
        backend: "torch", "triton" (the kernels of `tinytune.ops.triton_kernels.logprob_kernels`; with a
            frozen head they compute grad_hidden's rows in the forward) or "auto"; None reads
            $TINYTUNE_KERNELS, else "auto" (Triton on CUDA when installed). See `choose_backend`.

    Returns:
        logprobs (...) in fp32 (fp64 for fp64 inputs), and entropy (...) when return_entropy.

    Raises:
        ValueError: mismatched shapes, a chunk_size < 1 or an unknown backend.
        RuntimeError: backend "triton" where it cannot run (see `tinytune.ops.backend.choose_backend`).
    """
    if choose_backend(backend, hidden) == "triton":
        from .triton_kernels.logprob_kernels import linear_token_logprobs_triton  # imports triton

        return linear_token_logprobs_triton(hidden, weight, targets, chunk_size, ignore_index, return_entropy)
    _check_head_args(hidden, weight, targets, chunk_size, "targets")
    dtype = _compute_dtype(hidden, weight)
    flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (N, d), (N,)
    out = LinearTokenLogprobsFunction.apply(flat_h, weight, flat_y, ignore_index, chunk_size, dtype,
                                            bool(return_entropy))
    if return_entropy:
        return out[0].reshape(targets.shape), out[1].reshape(targets.shape)
    return out.reshape(targets.shape)
