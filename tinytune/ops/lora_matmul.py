"""The fused LoRA linear: `y = x W^T + b + s * dropout(x) A^T B^T` as one autograd Function.

Against the usual two-module LoRA (`base(x) + B(A(dropout(x))) * s`) it
- allocates one output: the base product, then the low-rank term added in place (`addmm_`);
- keeps for backward `x` by reference (shared with sibling projections such as q/k/v), the small
  `(N, r)` product `dropout(x) A^T`, and the dropout mask as packed bits or a seed: never a
  dropped copy of `x`;
- does no gradient work for a frozen `W` / `b` (the weight gradient of the base is the single
  largest matmul of a backward pass), yet gives correct gradients when they do require grad;
- computes `grad_x = g W + s (g B) A` with the second term added in place.

On the CPU the dropout-masked work runs over blocks of rows small enough to stay in cache: each
block of the mask is drawn (or unpacked), applied to one reused buffer and consumed by a skinny
matmul, so no full-size mask or masked copy of `x` is ever allocated (large fresh allocations
cost page faults here, and the passes over memory cost more than the skinny matmuls). Elsewhere
the mask is dense and regenerated from its seed in backward.

Under `torch.compile` (`torch.compiler.is_compiling()`) `lora_linear` takes a twin instead,
`lora_linear_traceable`: the same maths in plain differentiable torch ops. The CPU path above draws
masks with numpy and asks for `torch.get_num_threads()`; neither can be traced, so every layer broke
the graph (32 to 43 graphs for a two-block decoder with LoRA on every linear). Why a twin and not a
custom op (`torch.library.custom_op`): a custom op is opaque, so the compiler could fuse nothing
across it, and sending eager calls through the dispatcher would slow the benchmarked eager path. The
twin leaves the eager path as it was (one flag test per call) and lets the compiler see, differentiate
and fuse the whole layer. AOTAutograd then does no gradient work for a frozen W / b either, but what
it keeps for backward is its partitioner's choice: a boolean mask (a byte per element, not a bit) and
often the masked copy of x (about +20% saved bytes for a small decoder at p = 0.1, and fewer than
eager without dropout; see docs/benchmarks.md). The twin's mask is `traceable_keep_mask`: the same
16-bit-lane draw and quantised probability as here, from torch's default generator, so it is correct
dropout with a fresh mask per call, but not the eager path's mask bits (and a `seed` is refused).

Shapes: x (..., d_in), W (d_out, d_in), b (d_out,), A (r, d_in), B (d_out, r), y (..., d_out).
"""
from __future__ import annotations

import numpy as np
import torch

from .backend import choose_backend
from .dropout_mask import (MaskStream, draw_seed, keep_mask, pack_bits, quantised_probability, traceable_keep_mask,
                           unpack_bits)

_BLOCK_ELEMS = 1 << 19  # elements of x per CPU block (2 MiB in fp32): fastest of 2^16..2^22 here


def _block_rows(d_in: int) -> int:
    """Rows per CPU block: a multiple of 8, so every block but the last packs into whole bytes."""
    return max(8, (_BLOCK_ELEMS // d_in) // 8 * 8)


def _row_blocks(n: int, rows: int):
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def _as_factor(keep: np.ndarray, buf: torch.Tensor, d_in: int) -> torch.Tensor:
    """Copy a 0/1 block into `buf` (x's dtype) as a (rows, d_in) multiplier.

    Multiplying by a float mask is ~8x faster than by a bool one, and torch copies uint8 to
    float ~10x faster than bool to float, hence the uint8 view.
    """
    out = buf.view(-1)[: keep.size]
    out.copy_(torch.from_numpy(keep.reshape(-1).view(np.uint8)))
    return out.view(-1, d_in)


def _col_major(m: torch.Tensor) -> torch.Tensor:
    """`m` (d, r) laid out column-major, so that `tall @ m` takes torch's fast path.

    (N, d) @ (d, r) with a row-major right factor is ~2x slower on the CPU than with a
    column-major one; the copy is tiny (d x r).
    """
    return m if m.stride(0) == 1 else m.t().contiguous().t()


def _tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a^T b` for tall a (N, r) and b (N, d): the adapter-gradient products, reducing over N.

    On the CPU one skinny gemm with r rows parallelises poorly (~65 GFLOP/s on 2 cores); split
    over N into one batch per thread, `bmm` runs each on its own core (~1.4x faster here).
    """
    k = torch.get_num_threads()
    n = a.shape[0]
    if a.device.type != "cpu" or k < 2 or n % k or n < 64 * k:
        return torch.mm(a.t(), b)
    if not (a.is_contiguous() and b.is_contiguous()):
        return torch.mm(a.t(), b)
    return torch.bmm(a.view(k, n // k, -1).transpose(1, 2), b.view(k, n // k, -1)).sum(0)


def _masked_down_cpu(x, lora_A, p: float, seed: int):
    """`(x * keep) A^T` (N, r) and the keep-mask packed in bits, one block of rows at a time."""
    n, d = x.shape
    rows = _block_rows(d)
    stream = MaskStream(p, seed)
    bits = np.empty(-(-n * d // 8), dtype=np.uint8)
    xa = x.new_empty(n, lora_A.shape[0])
    factor_buf, masked_buf = x.new_empty(rows * d), x.new_empty(rows * d)
    a_t = lora_A.t()
    for start, stop in _row_blocks(n, rows):
        keep = stream.next((stop - start) * d)
        packed = pack_bits(keep)
        bits[start * d // 8 : start * d // 8 + packed.size] = packed
        factor = _as_factor(keep, factor_buf, d)
        masked = torch.mul(x[start:stop], factor, out=masked_buf[: factor.numel()].view_as(factor))
        torch.mm(masked, a_t, out=xa[start:stop])
    return xa, torch.from_numpy(bits)


def _masked_backward_cpu(x, bits, gyb, lora_A, grad_x, need_a: bool):
    """Adds `keep * (gyb A)` to `grad_x` (if given) and returns `gyb^T (x * keep)` (if `need_a`).

    One block of rows at a time, unpacking the mask block by block. `gyb` is (N, r), already scaled.
    """
    n, d = x.shape
    rows = _block_rows(d)
    bits_np = bits.numpy()
    factor_buf, work_buf = x.new_empty(rows * d), x.new_empty(rows * d)
    grad_a = torch.zeros(lora_A.shape, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype)
    for start, stop in _row_blocks(n, rows):
        numel = (stop - start) * d
        keep = unpack_bits(bits_np[start * d // 8 :], numel)
        factor = _as_factor(keep, factor_buf, d)
        work = work_buf[:numel].view_as(factor)
        if need_a:
            torch.mul(x[start:stop], factor, out=work)
            grad_a.add_(_tn(gyb[start:stop], work))
        if grad_x is not None:
            torch.mm(gyb[start:stop], lora_A, out=work)
            grad_x[start:stop].addcmul_(work, factor)
    return grad_a.to(lora_A.dtype) if need_a else None


def _masked_down_dense(x, lora_A, p: float, seed: int):
    """Non-CPU devices: `(x * keep) A^T` with a full mask; backward regenerates it from the seed."""
    mask = keep_mask(x.shape, p, seed, x.device)
    return torch.mm(x * mask, lora_A.t())  # (N, r); the dropped copy dies here


def _masked_backward_dense(x, p, seed, gyb, lora_A, grad_x, need_a: bool):
    """Non-CPU twin of `_masked_backward_cpu`, on a regenerated full mask."""
    mask = keep_mask(x.shape, p, seed, x.device)
    if grad_x is not None:
        grad_x.add_(torch.mm(gyb, lora_A).mul_(mask))
    return torch.mm(gyb.t(), x * mask) if need_a else None


def _base_forward(x, weight, bias):
    """`x W^T + b`: the one output allocation."""
    if bias is not None:
        return torch.addmm(bias, x, weight.t())
    return torch.mm(x, weight.t())


def _fold_input_grad(d_in: int, d_out: int) -> bool:
    """Whether to compute `grad_x = [g, gyb] [W; A]` as one matmul (no dropout only).

    Worth it when `d_out` is small against `d_in`: concatenating g (N x d_out) costs less than a
    second pass over grad_x (N x d_in).
    """
    return 2 * d_out <= d_in


def _input_grad(grad_y, gyb, weight, lora_A, masked: bool):
    """`g W + gyb A`; with dropout only `g W`, the masked low-rank term being added blockwise."""
    if masked:
        return torch.mm(grad_y, weight)  # (N, d_in)
    if _fold_input_grad(weight.shape[1], weight.shape[0]):
        return torch.mm(torch.cat([grad_y, gyb], dim=1), torch.cat([weight, lora_A], dim=0))
    return torch.mm(grad_y, weight).addmm_(gyb, lora_A)


class LoRALinearFunction(torch.autograd.Function):
    """Autograd Function on 2-D `x`; use `lora_linear`, which handles leading dims and autocast."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, p: float, seed: int, given_xa=None):
        bits = None
        scale = scaling
        if given_xa is not None:  # x A^T from a pass shared with sibling layers (p is 0), a constant here
            xa = given_xa
        elif p > 0.0:
            scale = scaling / (1.0 - quantised_probability(p))
            if x.device.type == "cpu":
                xa, bits = _masked_down_cpu(x, lora_A, p, seed)
            else:
                xa = _masked_down_dense(x, lora_A, p, seed)
        else:
            xa = torch.mm(x, lora_A.t())  # (N, r)
        y = _base_forward(x, weight, bias)
        y.addmm_(xa, lora_B.t(), alpha=scale)

        ctx.scale, ctx.p, ctx.seed = scale, p, seed
        ctx.has_bias = bias is not None
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, weight, lora_A, lora_B, xa, bits)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, xa, bits = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_b_lora = ctx.needs_input_grad[:5]
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        masked = ctx.p > 0.0

        if need_b_lora:
            grad_b = _tn(xa, grad_y).t().mul_(ctx.scale)  # (d_out, r); g^T xa is ~8x slower
        if need_a or need_x:
            gyb = torch.mm(grad_y, _col_major(lora_B)).mul_(ctx.scale)  # (N, r), already scaled
            if need_x:
                grad_x = _input_grad(grad_y, gyb, weight, lora_A, masked)
            if not masked and need_a:
                grad_a = _tn(gyb, x)  # (r, d_in)
            elif masked and x.device.type == "cpu":
                grad_a = _masked_backward_cpu(x, bits, gyb, lora_A, grad_x, need_a)
            elif masked:
                grad_a = _masked_backward_dense(x, ctx.p, ctx.seed, gyb, lora_A, grad_x, need_a)
        if need_w:
            grad_w = torch.mm(grad_y.t(), x)  # (d_out, d_in), only when the base is trainable
        if need_b and ctx.has_bias:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.is_floating_point():
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None or t.dtype == dtype:
        return t
    return t.to(dtype)


def _check_arguments(x, weight, lora_A, lora_B, dropout: float) -> None:
    """Raise ValueError naming a dropout outside [0, 1) or shapes that do not fit together."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if x.shape[-1] != weight.shape[1] or lora_A.shape[1] != weight.shape[1]:
        raise ValueError(
            f"lora_linear: x has {x.shape[-1]} features, weight expects {weight.shape[1]}, "
            f"lora_A expects {lora_A.shape[1]}"
        )
    if tuple(lora_B.shape) != (weight.shape[0], lora_A.shape[0]):
        raise ValueError(
            f"lora_linear: lora_B has shape {tuple(lora_B.shape)}, expected "
            f"{(weight.shape[0], lora_A.shape[0])} (d_out, r)"
        )


def _traced(x2, weight, bias, lora_A, lora_B, scaling, dropout, seed) -> torch.Tensor:
    """`lora_linear` under torch.compile: the twin, whose mask comes from torch's generator (so no seed)."""
    if seed is not None:
        raise ValueError(f"lora_linear: seed={seed!r} cannot be honoured under torch.compile, where the mask "
                         "comes from torch's generator (torch.manual_seed); pass seed=None")
    with torch.autocast(x2.device.type, enabled=False):
        return lora_linear_traceable(x2, weight, bias, lora_A, lora_B, float(scaling), float(dropout))


def _checked_xa(given_xa: torch.Tensor, lead: torch.Size, r: int, dropout: float, dtype) -> torch.Tensor:
    """`lora_linear`'s given `x A^T` as its Function takes it, (N, r) in the compute dtype, without grad.
    Raises ValueError unless dropout is 0 and the shape is x's leading shape + (r,)."""
    if dropout > 0.0 or given_xa.shape != (*lead, r):
        raise ValueError(f"lora_linear: given_xa of shape {tuple(given_xa.shape)} needs dropout 0 and shape "
                         f"{(*lead, r)}; got dropout={dropout}")
    return _cast(given_xa.detach(), dtype).reshape(-1, r)


def _function_for(backend: str | None, x: torch.Tensor):
    """The autograd Function the chosen backend runs (`ops.backend.choose_backend`)."""
    if choose_backend(backend, x) == "triton":
        from .triton_kernels.lora_function import TritonLoRALinearFunction  # imports triton: only here

        return TritonLoRALinearFunction
    return LoRALinearFunction


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    seed: int | None = None,
    *, backend: str | None = None,
    given_xa: torch.Tensor | None = None,
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
            fixed mask (used by gradcheck). Under torch.compile the mask comes from torch's
            generator instead (`lora_linear_traceable`) and a seed is refused.
        given_xa: `x A^T` (..., r), computed elsewhere without grad, used instead (dropout 0 only; see
            `tinytune.peft.lora.shared_shrink`). Gradients are as without it: backward uses x and A.
        backend: "torch" (`LoRALinearFunction`), "triton" (`TritonLoRALinearFunction`: the low-rank side
            products as Triton kernels, the mask hashed from the seed; see docs/kernels.md) or "auto"; None
            reads `$TINYTUNE_KERNELS`, then "auto" (Triton on CUDA when installed). See `ops.backend`. A seed
            gives a different mask on each backend. Ignored under torch.compile, which traces the twin.

    Returns:
        y of shape (..., d_out) in the compute dtype: the autocast dtype inside `torch.autocast`,
        else `x.dtype`.

    Raises:
        ValueError: `dropout` outside [0, 1), shapes of `x`, `weight`, `lora_A`, `lora_B` (or `given_xa`) that
            do not fit together (named), a `seed` under torch.compile, or an unknown `backend`.
        RuntimeError: backend "triton" where it cannot run (no triton; a CPU tensor without the interpreter).
    """
    _check_arguments(x, weight, lora_A, lora_B, dropout)
    dtype = _compute_dtype(x)
    x, weight, bias = _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype)
    lora_A, lora_B = _cast(lora_A, dtype), _cast(lora_B, dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # a view when x is contiguous
    if torch.compiler.is_compiling():  # numpy masks cannot be traced: the twin (module docstring)
        return _traced(x2, weight, bias, lora_A, lora_B, scaling, dropout, seed).view(*lead, weight.shape[0])
    if dropout > 0.0 and seed is None:
        seed = draw_seed()
    if given_xa is not None:
        given_xa = _checked_xa(given_xa, lead, lora_A.shape[0], dropout, dtype)
    function = _function_for(backend, x2)
    with torch.autocast(x.device.type, enabled=False):
        y = function.apply(x2, weight, bias, lora_A, lora_B, float(scaling), float(dropout), seed or 0, given_xa)
    return y.view(*lead, weight.shape[0])


def lora_linear_traceable(x, weight, bias, lora_A, lora_B, scaling: float, p: float = 0.0) -> torch.Tensor:
    """The compile twin of `LoRALinearFunction`: `x W^T + b + s * dropout(x) A^T B^T` in plain torch ops.

    What `lora_linear` runs under `torch.compile`; autograd (AOTAutograd there) differentiates it. The
    mask is `traceable_keep_mask`: drawn from torch's default generator, fresh per call, dropping with
    the same quantised probability as the eager path; kept values are scaled by `1 / (1 - p_effective)`.
    Arguments as `LoRALinearFunction.forward` (2-D x, tensors already in one dtype), without the seed.
    """
    if p > 0.0:
        x_seen = x * traceable_keep_mask(x.shape, p, x.device)  # (N, d_in), the compiler fuses the mask in
        scaling = scaling / (1.0 - quantised_probability(p))  # the 1 / (1 - p) of inverted dropout, on (N, d_out)
    else:
        x_seen = x
    xa = torch.mm(x_seen, lora_A.t())  # (N, r)
    return torch.addmm(_base_forward(x, weight, bias), xa, lora_B.t(), alpha=scaling)  # (N, d_out)


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, mask=None, p=0.0):
    """The unfused reference (plain autograd): for tests and benchmarks. `mask` is a keep-mask."""
    x_seen = x if mask is None else x * mask / (1.0 - quantised_probability(p))
    return torch.nn.functional.linear(x, weight, bias) + (x_seen @ lora_A.t() @ lora_B.t()) * scaling
