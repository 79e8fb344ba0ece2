"""Triton kernels for the LoRA side products of `y = x W^T + b + s * dropout(x) A^T B^T` (W frozen).

The base product `x W^T + b` and the base part of `grad_x` (`g W`) stay cuBLAS matmuls; these kernels do the
low-rank work around them, each reading the big (N, d) operand once and never materialising a mask:

    shrink      u  = (x * keep) A^T                      (N, r)    reads x once, keep from the hash
    expand      y += scale * u B^T                       in place  reads and writes y once
    grad_g      gu = scale * g B ; dB = scale * g^T u    (N, r), (d_out, r)   reads g once
    grad_x      dA = gu^T (x * keep) ; gx += keep * (gu A)          reads x and gx once
                (or gx = gu A, written only: the shared shrink's backward, `tinytune.ops.lora_shared`)

`keep` is the counter-based hash of `hash_dropout` (bit for bit `hash_keep_mask`), and `scale` is
`s / (1 - p_quantised)`: the inverted-dropout factor is folded into the scale, so `u` is the unscaled
product (as on the torch path). Reductions over N (dA, dB) are atomic adds into an fp32 (fp64 for fp64
inputs) buffer, one per block of rows. Importing this module imports triton: only the Triton path does.

Shapes: x (N, d_in), A (r, d_in), B (d_out, r), y and g (N, d_out), u and gu (N, r).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import interpreting
from .hash_dropout import drop_threshold, split_seed


@triton.jit
def _fmix32(h):
    # MurmurHash3's finaliser on uint32 (wrapping multiplies, logical shifts).
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _keep(rows, cols, d_in, seed_lo, seed_hi, THRESHOLD: tl.constexpr):
    """(BM, BK) keep bits for rows x cols of an (N, d_in) input; see hash_dropout."""
    counter = (rows[:, None].to(tl.int64) * d_in + cols[None, :]).to(tl.uint32)  # mod 2^32
    h = _fmix32(counter ^ seed_lo.to(tl.uint32, bitcast=True))
    h = _fmix32(h ^ seed_hi.to(tl.uint32, bitcast=True))
    return (h >> 16).to(tl.int32) >= THRESHOLD


@triton.jit
def _dot(a, b, acc, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """`acc + a @ b`; UPCAST: in fp32 (the interpreter's bf16 dot is wrong, so bf16 is upcast there only)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _shrink_kernel(x_ptr, a_ptr, u_ptr, N, D, R, sxm, sxk, sar, sak, sum_, sur, seed_lo, seed_hi,
                   THRESHOLD: tl.constexpr, DROPOUT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.arange(0, BR)
    acc = tl.zeros((BM, BR), dtype=ACC)
    for k0 in range(0, D, BK):
        cols = k0 + tl.arange(0, BK)
        x_mask = (rows[:, None] < N) & (cols[None, :] < D)
        xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * sxm + cols[None, :] * sxk, mask=x_mask, other=0.0)
        if DROPOUT:
            xt = tl.where(_keep(rows, cols, D, seed_lo, seed_hi, THRESHOLD), xt, 0.0)
        a_mask = (cols[:, None] < D) & (rr[None, :] < R)
        at = tl.load(a_ptr + cols[:, None] * sak + rr[None, :] * sar, mask=a_mask, other=0.0)  # (BK, BR) = A^T
        acc = _dot(xt, at, acc, ACC, PRECISION, UPCAST)
    u_mask = (rows[:, None] < N) & (rr[None, :] < R)
    tl.store(u_ptr + rows[:, None].to(tl.int64) * sum_ + rr[None, :] * sur, acc.to(u_ptr.dtype.element_ty),
             mask=u_mask)


@triton.jit
def _expand_kernel(u_ptr, b_ptr, y_ptr, N, DO, R, sum_, sur, sbn, sbr, sym, syn, scale,
                   ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    ut = tl.load(u_ptr + rows[:, None].to(tl.int64) * sum_ + rr[None, :] * sur,
                 mask=(rows[:, None] < N) & (rr[None, :] < R), other=0.0)  # (BM, BR)
    bt = tl.load(b_ptr + rr[:, None] * sbr + cols[None, :] * sbn,
                 mask=(rr[:, None] < R) & (cols[None, :] < DO), other=0.0)  # (BR, BN) = B^T
    low = _dot(ut, bt, None, ACC, PRECISION, UPCAST)
    y_mask = (rows[:, None] < N) & (cols[None, :] < DO)
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * sym + cols[None, :] * syn
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(ACC) + scale * low
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _grad_g_kernel(g_ptr, b_ptr, u_ptr, gu_ptr, db_ptr, N, DO, R, sgm, sgn, sbn, sbr, sum_, sur, scale,
                   NEED_DB: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rr = tl.arange(0, BR)
    u_mask = (rows[:, None] < N) & (rr[None, :] < R)
    if NEED_DB:
        ut = tl.load(u_ptr + rows[:, None].to(tl.int64) * sum_ + rr[None, :] * sur, mask=u_mask, other=0.0)
    acc = tl.zeros((BM, BR), dtype=ACC)
    for n0 in range(0, DO, BN):
        cols = n0 + tl.arange(0, BN)
        gt = tl.load(g_ptr + rows[:, None].to(tl.int64) * sgm + cols[None, :] * sgn,
                     mask=(rows[:, None] < N) & (cols[None, :] < DO), other=0.0)  # (BM, BN)
        b_mask = (cols[:, None] < DO) & (rr[None, :] < R)
        bt = tl.load(b_ptr + cols[:, None] * sbn + rr[None, :] * sbr, mask=b_mask, other=0.0)  # (BN, BR)
        acc = _dot(gt, bt, acc, ACC, PRECISION, UPCAST)
        if NEED_DB:  # this block's rows of g^T u, summed over blocks of rows by atomics
            part = _dot(tl.trans(gt), ut, None, ACC, PRECISION, UPCAST)  # (BN, BR)
            tl.atomic_add(db_ptr + cols[:, None] * R + rr[None, :], scale * part, mask=b_mask)
    gu = (scale * acc).to(gu_ptr.dtype.element_ty)
    tl.store(gu_ptr + rows[:, None].to(tl.int64) * R + rr[None, :], gu, mask=u_mask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _grad_x_kernel(x_ptr, a_ptr, gu_ptr, gx_ptr, da_ptr, N, D, R, sxm, sxk, sar, sak, sgxm, sgxk, seed_lo, seed_hi,
                   THRESHOLD: tl.constexpr, DROPOUT: tl.constexpr, NEED_DA: tl.constexpr, NEED_GX: tl.constexpr,
                   ACCUMULATE: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                   BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    rr = tl.arange(0, BR)
    gut = tl.load(gu_ptr + rows[:, None].to(tl.int64) * R + rr[None, :],
                  mask=(rows[:, None] < N) & (rr[None, :] < R), other=0.0)  # (BM, BR)
    tile_mask = (rows[:, None] < N) & (cols[None, :] < D)
    if DROPOUT:
        keep = _keep(rows, cols, D, seed_lo, seed_hi, THRESHOLD)
    if NEED_DA:
        xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * sxm + cols[None, :] * sxk, mask=tile_mask, other=0.0)
        if DROPOUT:
            xt = tl.where(keep, xt, 0.0)
        part = _dot(tl.trans(gut), xt, None, ACC, PRECISION, UPCAST)  # (BR, BK)
        tl.atomic_add(da_ptr + rr[:, None] * D + cols[None, :], part, mask=(rr[:, None] < R) & (cols[None, :] < D))
    if NEED_GX:
        at = tl.load(a_ptr + rr[:, None] * sar + cols[None, :] * sak,
                     mask=(rr[:, None] < R) & (cols[None, :] < D), other=0.0)  # (BR, BK)
        low = _dot(gut, at, None, ACC, PRECISION, UPCAST)  # (BM, BK)
        if DROPOUT:
            low = tl.where(keep, low, 0.0)
        gx_ptrs = gx_ptr + rows[:, None].to(tl.int64) * sgxm + cols[None, :] * sgxk
        if ACCUMULATE:  # onto the base part g W; else grad_x is this kernel's own output (the shared shrink's)
            low = tl.load(gx_ptrs, mask=tile_mask, other=0.0).to(ACC) + low
        tl.store(gx_ptrs, low.to(gx_ptr.dtype.element_ty), mask=tile_mask)


def _blocks(r: int) -> tuple[int, int, int]:
    """(rows, columns, rank) block sizes: small under the interpreter (odd test shapes then span several
    blocks), GPU-sized otherwise. tl.dot needs every dimension >= 16."""
    br = max(16, triton.next_power_of_2(r))
    return (16, 32, br) if interpreting() else (64, 64, br)


def _dot_args(dtype: torch.dtype) -> dict:
    """ACC (accumulator dtype), PRECISION (tl.dot's; fp32 follows torch's TF32 flag) and UPCAST (bf16 under
    the interpreter, whose bf16 dot is wrong) for inputs of `dtype`."""
    upcast = dtype == torch.bfloat16 and interpreting()
    if dtype == torch.float64:
        return dict(ACC=tl.float64, PRECISION="ieee", UPCAST=False)
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return dict(ACC=tl.float32, PRECISION="tf32", UPCAST=False)
    return dict(ACC=tl.float32, PRECISION="ieee", UPCAST=upcast)


def _dropout_args(p: float, seed: int) -> tuple[int, int, int, bool]:
    lo, hi = split_seed(seed)
    return lo, hi, drop_threshold(p), p > 0.0


def _reduce_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)


def shrink(x: torch.Tensor, lora_A: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """`u = (x * keep) A^T`, (N, r) in x's dtype, the keep-mask hashed from `seed` inside the kernel."""
    n, d = x.shape
    r = lora_A.shape[0]
    u = x.new_empty(n, r)
    bm, bk, br = _blocks(r)
    lo, hi, threshold, dropout = _dropout_args(p, seed)
    _shrink_kernel[(triton.cdiv(n, bm),)](
        x, lora_A, u, n, d, r, x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), u.stride(0),
        u.stride(1), lo, hi, THRESHOLD=threshold, DROPOUT=dropout, **_dot_args(u.dtype), BM=bm, BK=bk,
        BR=br)
    return u


def expand_(y: torch.Tensor, u: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """`y += scale * u B^T` in place (y is the base GEMM's output, (N, d_out)); returns y."""
    n, d_out = y.shape
    r = u.shape[1]
    bm, bn, br = _blocks(r)
    _expand_kernel[(triton.cdiv(n, bm), triton.cdiv(d_out, bn))](
        u, lora_B, y, n, d_out, r, u.stride(0), u.stride(1), lora_B.stride(0), lora_B.stride(1), y.stride(0),
        y.stride(1), float(scale), **_dot_args(u.dtype), BM=bm, BN=bn, BR=br)
    return y


def grad_g(g: torch.Tensor, lora_B: torch.Tensor, u: torch.Tensor, scale: float, need_db: bool):
    """One pass over g (N, d_out): `gu = scale * g B` (N, r, g's dtype) and, if `need_db`,
    `dB = scale * g^T u` (d_out, r, in an fp32 buffer; fp64 for fp64 inputs). Returns (gu, dB or None)."""
    n, d_out = g.shape
    r = lora_B.shape[1]
    gu = g.new_empty(n, r)
    db = _reduce_buffer((d_out, r), g.dtype, g.device) if need_db else gu  # gu: an unused placeholder
    bm, bn, br = _blocks(r)
    _grad_g_kernel[(triton.cdiv(n, bm),)](
        g, lora_B, u, gu, db, n, d_out, r, g.stride(0), g.stride(1), lora_B.stride(0), lora_B.stride(1),
        u.stride(0), u.stride(1), float(scale), NEED_DB=need_db, **_dot_args(u.dtype), BM=bm, BN=bn,
        BR=br)
    return gu, (db if need_db else None)


def grad_x_(x: torch.Tensor, lora_A: torch.Tensor, gu: torch.Tensor, grad_x: torch.Tensor | None, p: float,
            seed: int, need_da: bool, accumulate: bool = True):
    """One pass over x (N, d_in): `grad_x += keep * (gu A)` in place (if `grad_x` is given; with
    `accumulate=False`, `grad_x = keep * (gu A)`: written, never read) and, if `need_da`, returns
    `dA = gu^T (x * keep)` (r, d_in, fp32 buffer; fp64 for fp64 inputs). `gu` is contiguous, scaled."""
    n, d = x.shape
    r = lora_A.shape[0]
    da = _reduce_buffer((r, d), x.dtype, x.device) if need_da else gu  # gu: an unused placeholder
    gx = grad_x if grad_x is not None else x  # x: an unused placeholder
    bm, bk, br = _blocks(r)
    lo, hi, threshold, dropout = _dropout_args(p, seed)
    _grad_x_kernel[(triton.cdiv(n, bm), triton.cdiv(d, bk))](
        x, lora_A, gu, gx, da, n, d, r, x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1),
        gx.stride(0), gx.stride(1), lo, hi, THRESHOLD=threshold, DROPOUT=dropout, NEED_DA=need_da,
        NEED_GX=grad_x is not None, ACCUMULATE=accumulate, **_dot_args(x.dtype), BM=bm, BK=bk, BR=br)
    return da if need_da else None
