"""The Triton fused loss kernels (tinytune.ops.triton_kernels.cross_entropy_kernels / logprob_kernels),
run under Triton's interpreter on CPU (and on CUDA when present), against a float64 naive reference
(logits = h W^T, then F.cross_entropy / log_softmax): values and gradients w.r.t. hidden and weight.

Shapes are odd on purpose: N = 37 rows in chunks of 16 (the last chunk short), d = 24, V = 101 in blocks
of 32 (the last block partial); rows 16..31 are all ignored (a whole chunk) plus a few more.
Tolerances: fp32 inputs atol 1e-5 / rtol 1e-5 on values and gradients; fp16 and bf16 inputs (logits in
that dtype, softmax in fp32, the gradient stored in that dtype before its matmuls) against the fp64
reference on the same rounded inputs: fp16 atol 2e-2, bf16 atol 1e-1 (values), and gradients within
those atols plus rtol 5e-2; fp64 through torch.autograd.gradcheck (fast mode) with its defaults;
backend="triton" against backend="torch" within 1e-5 (fp32) and 1e-4 (bf16 autocast, the same bf16 logits).
Row tiles of 1 (the GPU layout) and 4 (not dividing the chunk) are checked as well as the interpreter's 16.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from tinytune.ops import linear_cross_entropy, linear_token_logprobs  # noqa: E402
from tinytune.ops.backend import interpreting  # noqa: E402
from tinytune.ops.triton_kernels import cross_entropy_kernels  # noqa: E402
from tinytune.ops.triton_kernels.cross_entropy_kernels import (  # noqa: E402
    TritonLinearCrossEntropyFunction, linear_cross_entropy_triton)
from tinytune.ops.triton_kernels.logprob_kernels import (  # noqa: E402
    TritonLinearTokenLogprobsFunction, linear_token_logprobs_triton)

N, D, V, CHUNK, BLOCK = 37, 24, 101, 16, 32
# CPU tensors need the interpreter; with TRITON_INTERPRET=0 on a CUDA machine the cuda cases run compiled.
DEVICES = (["cpu"] if interpreting() else []) + [pytest.param("cuda", marks=pytest.mark.gpu)]
cpu_interpreted = pytest.mark.skipif(not interpreting(), reason="CPU tensors need TRITON_INTERPRET=1")
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-2, 5e-2), torch.bfloat16: (1e-1, 5e-2)}  # (atol, rtol)


def _inputs(device, dtype, frozen=False, seed=0):
    """hidden (N, D), weight (V, D) in dtype, labels (N,) with rows 16..31 (one whole chunk) and 3 more ignored."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=gen) * 0.5).to(device, dtype).requires_grad_(not frozen)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[16:32] = -100
    labels[[0, 5, 36]] = -100
    return hidden, weight, labels.to(device)


def _ref_logits(hidden, weight):
    """float64 leaves and their logits (N, V), from the same (rounded) input values."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_(weight.requires_grad)
    return h, w, h @ w.T


def _close(actual, expected, dtype, what):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("frozen", [False, True])
def test_cross_entropy_matches_fp64_reference(device, dtype, reduction, frozen):
    hidden, weight, labels = _inputs(device, dtype, frozen)
    loss = linear_cross_entropy_triton(hidden, weight, labels, reduction=reduction, chunk_size=CHUNK, block_v=BLOCK)
    h, w, logits = _ref_logits(hidden, weight)
    ref = F.cross_entropy(logits, labels, reduction=reduction)
    assert loss.dtype == torch.float32
    _close(loss, ref, dtype, "loss")
    (loss * 3).backward()
    (ref * 3).backward()
    _close(hidden.grad, h.grad, dtype, "grad hidden")
    assert hidden.grad.dtype == dtype
    if frozen:
        assert weight.grad is None
    else:
        _close(weight.grad, w.grad, dtype, "grad weight")
        assert weight.grad.dtype == dtype


@cpu_interpreted
def test_frozen_weight_allocates_no_weight_gradient():
    hidden, weight, labels = _inputs("cpu", torch.float32, frozen=True)
    total = TritonLinearCrossEntropyFunction.apply(hidden, weight, labels, -100, CHUNK, torch.float32, True, BLOCK)
    grad_h, grad_w = total.grad_fn.saved_tensors
    assert grad_w is None and grad_h.shape == hidden.shape


@cpu_interpreted
def test_cross_entropy_dispatch_and_default_block():
    """backend="triton" (default block: all of V in one step) equals backend="torch"; no_grad gives the loss only."""
    hidden, weight, labels = _inputs("cpu", torch.float32)
    fused = linear_cross_entropy(hidden, weight, labels, chunk_size=CHUNK, backend="triton")
    plain = linear_cross_entropy(hidden, weight, labels, chunk_size=CHUNK, backend="torch")
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, backend="triton"), plain)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # same bf16 logits, fp32 softmax on both paths
        fused = linear_cross_entropy(hidden, weight, labels, chunk_size=CHUNK, backend="triton")
        plain = linear_cross_entropy(hidden, weight, labels, chunk_size=CHUNK, backend="torch")
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)
    all_ignored = torch.full_like(labels, -100)
    assert torch.isnan(linear_cross_entropy(hidden, weight, all_ignored, backend="triton"))  # as F.cross_entropy


@cpu_interpreted
def test_errors_name_the_value():
    hidden, weight, labels = _inputs("cpu", torch.float32)
    labels[3] = V
    with pytest.raises(ValueError, match=f"target {V} is outside the vocabulary"):
        linear_cross_entropy(hidden, weight, labels, backend="triton")
    with pytest.raises(ValueError, match="block_v must be a power of two >= 1, got 24"):
        linear_token_logprobs_triton(hidden, weight, labels.clamp(max=0), block_v=24)
    with pytest.raises(ValueError, match="reduction must be one of"):
        linear_cross_entropy(hidden, weight, labels, reduction="none", backend="triton")


def _ref_logprobs(logits, labels):
    """fp64 (logprobs, entropy), 0 on ignored rows."""
    valid = labels != -100
    logp = torch.log_softmax(logits, -1)
    lp = logp.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1) * valid
    ent = -(logp.exp() * logp).sum(-1) * valid
    return lp, ent


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("terms", ["logprobs", "both", "entropy"])
def test_token_logprobs_match_fp64_reference(device, dtype, frozen, terms):
    """Values, entropies and gradients for random upstream gradients, frozen head (gradient rows made in
    the forward) and trained head (logits recomputed in backward); "entropy": only the entropy is used."""
    if dtype != torch.float32 and terms == "entropy":
        pytest.skip("the entropy-only case once, in fp32")
    hidden, weight, labels = _inputs(device, dtype, frozen)
    with_ent = terms != "logprobs"
    out = linear_token_logprobs_triton(hidden, weight, labels, chunk_size=CHUNK, return_entropy=with_ent,
                                       block_v=BLOCK)
    lp, ent = out if with_ent else (out, None)
    h, w, logits = _ref_logits(hidden, weight)
    ref_lp, ref_ent = _ref_logprobs(logits, labels)
    _close(lp, ref_lp, dtype, "logprobs")
    gen = torch.Generator().manual_seed(1)
    g_lp, g_ent = (torch.randn(N, generator=gen, dtype=torch.float64).to(device) for _ in range(2))
    if with_ent:
        _close(ent, ref_ent, dtype, "entropy")
    used = {"logprobs": [(lp, ref_lp, g_lp)], "both": [(lp, ref_lp, g_lp), (ent, ref_ent, g_ent)],
            "entropy": [(ent, ref_ent, g_ent)]}[terms]
    sum((out_ * g.float()).sum() for out_, _, g in used).backward()
    sum((ref_ * g).sum() for _, ref_, g in used).backward()
    _close(hidden.grad, h.grad, dtype, "grad hidden")
    if frozen:
        assert weight.grad is None
    else:
        _close(weight.grad, w.grad, dtype, "grad weight")


@cpu_interpreted
def test_token_logprobs_dispatch_equals_torch_path():
    hidden, weight, labels = _inputs("cpu", torch.float32, frozen=True)
    lp, ent = linear_token_logprobs(hidden, weight, labels, chunk_size=CHUNK, return_entropy=True, backend="triton")
    lp0, ent0 = linear_token_logprobs(hidden, weight, labels, chunk_size=CHUNK, return_entropy=True, backend="torch")
    torch.testing.assert_close(lp, lp0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent0, atol=1e-5, rtol=1e-5)


@cpu_interpreted
@pytest.mark.parametrize("rows", [1, 4])
def test_row_tiles(monkeypatch, rows):
    """One row per program (the GPU layout) and 4 (a tile not dividing the chunk of 7) match the reference."""
    monkeypatch.setitem(cross_entropy_kernels.BLOCK_ROWS, "interpreter", rows)
    hidden, weight, labels = _inputs("cpu", torch.float32)
    hidden, labels = hidden[:12].detach().requires_grad_(), labels[:12]
    loss = linear_cross_entropy_triton(hidden, weight, labels, chunk_size=7, block_v=64)
    lp, ent = linear_token_logprobs_triton(hidden, weight, labels, chunk_size=7, return_entropy=True, block_v=64)
    (loss + lp.sum() + ent.sum()).backward()
    h, w, logits = _ref_logits(hidden, weight)
    ref_lp, ref_ent = _ref_logprobs(logits, labels)
    (F.cross_entropy(logits, labels) + ref_lp.sum() + ref_ent.sum()).backward()
    _close(loss, F.cross_entropy(logits, labels), torch.float32, "loss")
    _close(ent, ref_ent, torch.float32, "entropy")
    _close(hidden.grad, h.grad, torch.float32, "grad hidden")
    _close(weight.grad, w.grad, torch.float32, "grad weight")


@cpu_interpreted
def test_gradcheck_float64():
    """Both Functions in float64 (the kernels accumulate in fp64 then), tiny shapes: 5 rows in chunks of 3,
    V = 7 in blocks of 4, one ignored row; the log-prob Function in both schedules, with entropy.
    gradcheck's fast mode (random projections) keeps the interpreter's cost down."""
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (5,), generator=gen)
    y[2] = -100
    f64 = torch.float64
    assert torch.autograd.gradcheck(
        lambda a, b: TritonLinearCrossEntropyFunction.apply(a, b, y, -100, 3, f64, True, 4), (h, w), fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda a, b: TritonLinearTokenLogprobsFunction.apply(a, b, y, -100, 3, f64, True, True, 4), (h, w),
        fast_mode=True)
    w_frozen = w.detach()
    assert torch.autograd.gradcheck(
        lambda a: TritonLinearTokenLogprobsFunction.apply(a, w_frozen, y, -100, 3, f64, True, True, 4), (h,),
        fast_mode=True)
