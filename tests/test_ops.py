"""Tests for tinytune.ops: the fused LoRA linear and its dropout masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tinytune.ops.lora_matmul as lora_matmul
from tinytune.ops import MaskStream, PackedMask, keep_mask, lora_linear, lora_linear_reference
from tinytune.ops import quantised_probability, saved_storages

SCALING = 1.5
SEED = 1234


def make(n=(2, 3), d_in=9, d_out=5, r=3, dtype=torch.float64, train_base=False, bias=True):
    """x (*n, d_in) and the weights; W/b trainable only when `train_base`."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    x = rand(*n, d_in).requires_grad_()
    w = rand(d_out, d_in).requires_grad_(train_base)
    b = rand(d_out).requires_grad_(train_base) if bias else None
    a = rand(r, d_in).requires_grad_()
    bb = rand(d_out, r).requires_grad_()
    return x, w, b, a, bb


def reference(x, w, b, a, bb, p, seed=SEED):
    mask = keep_mask(x.shape, p, seed, x.device) if p > 0 else None
    return lora_linear_reference(x, w, b, a, bb, SCALING, mask=mask, p=p)


@pytest.fixture
def small_blocks(monkeypatch):
    """Force the CPU block loop to run several (8-row) blocks, the last one partial."""
    monkeypatch.setattr(lora_matmul, "_BLOCK_ELEMS", 16)


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("train_base", [False, True])
@pytest.mark.parametrize("d_out", [4, 12])  # 4: folded input gradient (2 d_out <= d_in); 12: not
def test_gradcheck(p, train_base, d_out):
    inputs = make(n=(2, 3), d_out=d_out, train_base=train_base)
    fn = lambda *t: lora_linear(*t[:3], t[3], t[4], SCALING, dropout=p, seed=SEED)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_several_blocks_no_bias(small_blocks, p):
    inputs = make(n=(3, 7), d_in=9, d_out=12, train_base=True, bias=False)  # 21 rows: 8 + 8 + 5
    fn = lambda x, w, a, bb: lora_linear(x, w, None, a, bb, SCALING, dropout=p, seed=SEED)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (inputs[0], inputs[1], inputs[3], inputs[4]))


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_gradients_match_reference(small_blocks, p):
    x, w, b, a, bb = make(n=(5, 6), d_in=13, d_out=7, r=4, train_base=True)
    grad = torch.randn(5, 6, 7, dtype=torch.float64)
    lora_linear(x, w, b, a, bb, SCALING, dropout=p, seed=SEED).backward(grad)
    got = [t.grad.clone() for t in (x, w, b, a, bb)]
    for t in (x, w, b, a, bb):
        t.grad = None
    reference(x, w, b, a, bb, p).backward(grad)
    for g_fused, t in zip(got, (x, w, b, a, bb)):
        torch.testing.assert_close(g_fused, t.grad, rtol=1e-12, atol=1e-12)


def test_frozen_base_gets_no_grad():
    x, w, b, a, bb = make(train_base=False)
    lora_linear(x, w, b, a, bb, SCALING, dropout=0.1, seed=SEED).sum().backward()
    assert w.grad is None and b.grad is None
    assert x.grad is not None and a.grad is not None and bb.grad is not None


# ---------------------------------------------------------------- forward values

@pytest.mark.parametrize("p", [0.0, 0.1])
def test_forward_float64_equals_reference(small_blocks, p):
    x, w, b, a, bb = make(n=(4, 5), d_in=11, d_out=6)
    y = lora_linear(x, w, b, a, bb, SCALING, dropout=p, seed=SEED)
    assert y.shape == (4, 5, 6) and y.dtype == torch.float64
    torch.testing.assert_close(y, reference(x, w, b, a, bb, p), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_forward_float32_equals_reference(p):
    x, w, b, a, bb = make(n=(3, 100), d_in=64, d_out=48, r=8, dtype=torch.float32)
    y = lora_linear(x, w, b, a, bb, SCALING, dropout=p, seed=SEED)
    torch.testing.assert_close(y, reference(x, w, b, a, bb, p), rtol=1e-5, atol=1e-4)


def test_same_seed_same_output_and_default_seed_follows_torch():
    x, w, b, a, bb = make()
    y1 = lora_linear(x, w, b, a, bb, SCALING, dropout=0.5, seed=7)
    torch.testing.assert_close(y1, lora_linear(x, w, b, a, bb, SCALING, dropout=0.5, seed=7))
    torch.manual_seed(3)
    y2 = lora_linear(x, w, b, a, bb, SCALING, dropout=0.5)
    torch.manual_seed(3)
    torch.testing.assert_close(y2, lora_linear(x, w, b, a, bb, SCALING, dropout=0.5))


# ---------------------------------------------------------------- masks

def test_drop_fraction_close_to_p():
    p = 0.1
    mask = keep_mask((1000, 1000), p, SEED, "cpu")
    drop = 1.0 - mask.float().mean().item()
    assert abs(drop - quantised_probability(p)) < 0.002  # 6 sigma at n = 1e6
    assert quantised_probability(p) == round(0.1 * 65536) / 65536


def test_same_seed_same_mask_other_seed_other_mask():
    m1 = keep_mask((64, 33), 0.3, SEED, "cpu")
    assert torch.equal(m1, keep_mask((64, 33), 0.3, SEED, "cpu"))
    assert not torch.equal(m1, keep_mask((64, 33), 0.3, SEED + 1, "cpu"))


def test_stream_blocks_equal_whole_mask():
    stream = MaskStream(0.25, SEED)
    blocks = np.concatenate([stream.next(40), stream.next(16), stream.next(13)])
    assert np.array_equal(blocks, keep_mask((69,), 0.25, SEED, "cpu").numpy())


@pytest.mark.parametrize("shape", [(7, 13), (16, 8), (1,)])
def test_packed_round_trip_bit_exact(shape):
    mask = keep_mask(shape, 0.4, SEED, "cpu")
    packed = PackedMask.pack(mask, 0.4, SEED)
    assert packed.nbytes == -(-mask.numel() // 8)
    assert torch.equal(packed.unpack(), mask)


# ---------------------------------------------------------------- precision

@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_low_precision_base_fp32_adapter(dtype, tol, p):
    x, w, b, a, bb = make(n=(4, 16), d_in=32, d_out=24, r=4, dtype=torch.float32)
    xl = x.detach().to(dtype).requires_grad_()
    wl, bl = w.detach().to(dtype), b.detach().to(dtype)
    y = lora_linear(xl, wl, bl, a, bb, SCALING, dropout=p, seed=SEED)
    assert y.dtype == dtype
    ref = reference(xl.detach().float(), wl.float(), bl.float(), a, bb, p)
    # Relative to the output's scale: inputs are rounded to `dtype`, then summed over d_in = 32.
    assert (y.float() - ref).abs().max().item() <= tol * ref.abs().max().item()
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and torch.isfinite(a.grad).all()
    assert xl.grad.dtype == dtype


def test_under_autocast_bf16():
    x, w, b, a, bb = make(n=(4, 16), d_in=32, d_out=24, r=4, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, w, b, a, bb, SCALING, dropout=0.1, seed=SEED)
    assert y.dtype == torch.bfloat16
    ref = reference(x.detach(), w, b, a, bb, 0.1)
    assert (y.float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and a.grad.dtype == torch.float32


# ---------------------------------------------------------------- memory kept for backward

def test_no_copy_of_x_kept_with_dropout():
    torch.manual_seed(0)
    x = torch.randn(4, 64, 96, requires_grad=True)
    base = torch.nn.Linear(96, 80).requires_grad_(False)
    a = torch.nn.Parameter(torch.randn(8, 96))
    bb = torch.nn.Parameter(torch.randn(80, 8))
    params = [base.weight, base.bias, a, bb]
    fn = lambda: lora_linear(x, base.weight, base.bias, a, bb, SCALING, dropout=0.1)  # noqa: E731
    seen, _ = saved_storages(fn, params)
    x_ptr = x.untyped_storage().data_ptr()
    assert x_ptr in seen
    others = {ptr: n for ptr, n in seen.items() if ptr != x_ptr}
    # Kept besides x: the (N, r) product (N r 4 bytes) and the mask bits (N d_in / 8 bytes).
    assert max(others.values()) < x.untyped_storage().nbytes() // 4
    assert sum(others.values()) == 256 * 8 * 4 + 256 * 96 // 8


# ---------------------------------------------------------------- errors

def test_bad_dropout_raises():
    x, w, b, a, bb = make()
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        lora_linear(x, w, b, a, bb, SCALING, dropout=1.0)


def test_feature_mismatch_raises():
    x, w, b, a, bb = make(d_in=9)
    with pytest.raises(ValueError, match="x has 8 features, weight expects 9"):
        lora_linear(x[..., :8], w, b, a, bb, SCALING)


def test_rank_mismatch_raises():
    x, w, b, a, bb = make(r=3)
    with pytest.raises(ValueError, match=r"lora_B has shape \(5, 2\), expected \(5, 3\)"):
        lora_linear(x, w, b, a, bb[:, :2], SCALING)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cuda_matches_reference(p):
    x, w, b, a, bb = (t.detach().cuda().requires_grad_(t.requires_grad) for t in make(train_base=True))
    fn = lambda *t: lora_linear(*t[:3], t[3], t[4], SCALING, dropout=p, seed=SEED)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, a, bb))
    torch.testing.assert_close(fn(x, w, b, a, bb), reference(x, w, b, a, bb, p))


@pytest.mark.parametrize("n,r,d", [(256, 8, 33), (300, 4, 16), (10, 3, 5)])
def test_split_reduction_product_equals_mm(n, r, d):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the batched split path needs >= 2 threads
    try:
        a, b = torch.randn(n, r, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
        torch.testing.assert_close(lora_matmul._tn(a, b), a.t() @ b, rtol=1e-12, atol=1e-12)
    finally:
        torch.set_num_threads(threads)


def test_gradients_match_reference_float32_large():
    x, w, b, a, bb = make(n=(2, 256), d_in=64, d_out=96, r=8, dtype=torch.float32)
    grad = torch.randn(2, 256, 96)
    for p in (0.0, 0.1):
        lora_linear(x, w, b, a, bb, SCALING, dropout=p, seed=SEED).backward(grad)
        got = [t.grad for t in (x, a, bb)]
        x.grad = a.grad = bb.grad = None
        reference(x, w, b, a, bb, p).backward(grad)
        for g_fused, t in zip(got, (x, a, bb)):
            torch.testing.assert_close(g_fused, t.grad, rtol=1e-4, atol=1e-3)
        x.grad = a.grad = bb.grad = None
