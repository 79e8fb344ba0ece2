"""The Triton LoRA kernels (tinytune/ops/triton_kernels) against naive float64 torch, masks reproduced from the seed.

Runs under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set here before triton is imported), and on
CUDA when one is present and the interpreter is off (`TRITON_INTERPRET=0 pytest -m gpu tests/test_triton_lora.py`).
Tolerances: the largest error against float64 on the same rounded inputs, relative to the largest reference
entry: fp32 1e-5 (measured ~2e-7), fp16 2e-3, bf16 2e-2 (measured <= 8e-3; the naive torch computation in those
dtypes errs up to 7e-4 and 8e-3); fp64 by gradcheck.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if os.environ["TRITON_INTERPRET"] not in ("", "0") and not isinstance(triton.language.zeros, InterpretedFunction):
    # triton was imported (torch._dynamo imports it) before TRITON_INTERPRET=1 was set: its own library is
    # compiled-mode and the interpreter cannot call it. tests/conftest.py or the environment must set it first.
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; set it in the environment or conftest",
                allow_module_level=True)

from tinytune.ops import lora_linear, lora_linear_reference, quantised_probability, saved_storages  # noqa: E402
from tinytune.ops.backend import interpreting  # noqa: E402
from tinytune.ops.triton_kernels import hash_dropout_reference, hash_keep_mask  # noqa: E402
from tinytune.ops.triton_kernels.lora_function import TritonLoRALinearFunction  # noqa: E402
from tinytune.ops.triton_kernels.lora_kernels import grad_x_  # noqa: E402

SCALING, SEED = 2.0, 2**61 + 12345  # a seed with both 32-bit halves non-zero
N, D_IN, D_OUT, R = 37, 70, 45, 5  # none a multiple of the blocks
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not interpreting(), reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        interpreting() or not torch.cuda.is_available(), reason="compiled kernels: CUDA, TRITON_INTERPRET=0")]),
]


def _inputs(device, dtype, bias: bool, n=N, d_in=D_IN, d_out=D_OUT, r=R):
    """x, W (frozen), b (trainable or None), A, B with O(1) products; leaves in `dtype` on `device`."""
    def leaf(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(device, dtype).requires_grad_(grad)

    x = leaf(n, d_in)
    w = leaf(d_out, d_in, scale=d_in**-0.5, grad=False)
    b = leaf(d_out) if bias else None
    return x, w, b, leaf(r, d_in, scale=d_in**-0.5), leaf(d_out, r, scale=r**-0.5)


def _node(y) -> str:
    """The autograd Function under lora_linear's final view."""
    return y.grad_fn.next_functions[0][0].name()


def _assert_near(got, want, tol, name):
    """Largest error relative to the largest reference entry (module docstring)."""
    err = (got.double() - want).abs().max().item() / want.abs().max().item()
    assert err <= tol, f"{name}: relative max error {err:.2e} > {tol:.0e}"


def _grads(y, grad, tensors):
    return torch.autograd.grad(y, [t for t in tensors if t is not None], grad)


CASES = [(torch.float32, p, bias) for p in (0.0, 0.1) for bias in (False, True)]
CASES += [(torch.float16, 0.1, True), (torch.bfloat16, 0.1, False), (torch.bfloat16, 0.0, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,p,bias", CASES)
def test_matches_float64_reference(device, dtype, p, bias):
    x, w, b, a, bb = _inputs(device, dtype, bias)
    y = lora_linear(x, w, b, a, bb, SCALING, dropout=p, seed=SEED, backend="triton")
    assert y.dtype == dtype and _node(y) == "TritonLoRALinearFunctionBackward"
    grad = torch.randn_like(y)
    got = _grads(y, grad, (x, b, a, bb))

    ref_in = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in (x, w, b, a, bb)]
    keep = hash_keep_mask((N, D_IN), p, SEED, device)  # the kernels' mask, rebuilt from the seed in torch
    ref = lora_linear_reference(*ref_in, SCALING, mask=keep, p=p)
    want = _grads(ref, grad.double(), [ref_in[i] for i in (0, 2, 3, 4)])
    tol = TOL[dtype]
    _assert_near(y, ref, tol, "y")
    for name, g, r in zip(("x", "bias", "A", "B") if bias else ("x", "A", "B"), got, want):
        assert g.dtype == dtype, name
        _assert_near(g, r, tol, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    x, w, b, a, bb = _inputs(device, torch.float64, True, n=6, d_in=19, d_out=7, r=3)
    w.requires_grad_(True)  # the base gradients too, when W is trainable

    def fn(*t):
        return TritonLoRALinearFunction.apply(*t, SCALING, 0.25, SEED)

    assert torch.autograd.gradcheck(fn, (x, w, b, a, bb), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_mask_is_the_hash_of_the_seed(device):
    # grad_x_ with gu = 1 (N, 1) and A = 1 (1, d) writes keep * 1 into a zero grad_x: the kernel's own mask.
    for p, seed in ((0.1, SEED), (0.5, 0), (0.3, 2**64 - 1)):
        gx, ones = torch.zeros(N, D_IN, device=device), torch.ones(N, 1, device=device)
        grad_x_(torch.zeros_like(gx), torch.ones(1, D_IN, device=device), ones, gx, p, seed, need_da=False)
        assert torch.equal(gx.bool(), hash_keep_mask((N, D_IN), p, seed, device)), (p, seed)


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_output_other_seed_other(device):
    x, w, b, a, bb = _inputs(device, torch.float32, True)
    run = lambda seed: lora_linear(x, w, b, a, bb, SCALING, dropout=0.5, seed=seed, backend="triton")  # noqa: E731
    assert torch.equal(run(7), run(7))
    assert not torch.allclose(run(7), run(8))


def test_hash_mask_seeds_and_keep_rate():
    shape, p = (100, 200), 0.1
    masks = [hash_keep_mask(shape, p, s) for s in (0, 1, 2**32, 2**62 - 1)]  # low half, high half, both
    assert torch.equal(masks[1], hash_keep_mask(shape, p, 1))
    n = masks[0].numel()
    bound = 5 * (n * p * (1 - p)) ** 0.5  # 5 standard deviations of a binomial count
    for i, m in enumerate(masks):
        assert abs(int(m.sum()) - n * (1 - p)) < bound, i
        for other in masks[i + 1:]:
            agree = int((m == other).sum())  # independent masks agree on p^2 + (1-p)^2 of the entries
            assert abs(agree - n * 0.82) < 5 * (n * 0.82 * 0.18) ** 0.5
    assert hash_keep_mask(shape, 0.0, 3).all()
    kept = hash_keep_mask(shape, p, 5).double() / (1 - quantised_probability(p))  # 1 / (1 - 0.100006)
    torch.testing.assert_close(hash_dropout_reference(torch.ones(shape, dtype=torch.float64), p, 5), kept)


@pytest.mark.parametrize("device", DEVICES)
def test_saves_x_by_reference_and_no_mask(device):
    x, w, b, a, bb = _inputs(device, torch.float32, True)
    fn = lambda: lora_linear(x, w, b, a, bb, SCALING, dropout=0.1, seed=SEED, backend="triton")  # noqa: E731
    seen, y = saved_storages(fn, exclude=[w, b, a, bb])
    assert seen.pop(x.untyped_storage().data_ptr()) == x.numel() * 4  # x itself, not a copy
    assert sum(seen.values()) == N * R * 4  # only u (N, r): no mask, no dropped x
    y.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_dispatch(device, monkeypatch):
    x, w, b, a, bb = _inputs(device, torch.float32, True)
    x3 = x.detach().view(1, N, D_IN)  # leading dims go through the same 2-D Function
    assert _node(lora_linear(x3, w, b, a, bb, SCALING, backend="torch")) == "LoRALinearFunctionBackward"
    monkeypatch.setenv("TINYTUNE_KERNELS", "triton")
    y = lora_linear(x3, w, b, a, bb, SCALING)
    assert y.shape == (1, N, D_OUT) and _node(y) == "TritonLoRALinearFunctionBackward"
    torch.testing.assert_close(y, lora_linear(x3, w, b, a, bb, SCALING, backend="torch"), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dropout seed must be in"):
        lora_linear(x3, w, b, a, bb, SCALING, dropout=0.1, seed=-1)
    with pytest.raises(ValueError, match="backend='cuda' is not one of"):
        lora_linear(x3, w, b, a, bb, SCALING, backend="cuda")


# ------------------------------------------------------------------ the shared-shrink halves (ops.lora_shared)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.bfloat16, False), (torch.float16, True)])
def test_shared_halves_match_float64_reference(device, dtype, bias):
    """u = x [A_1; A_2]^T by the shrink kernel, then the second member's slice through expand_ / grad_g, and
    the shrink's backward writing grad_x and dA in one pass (`grad_x_(accumulate=False)`)."""
    from tinytune.ops import lora_expand_linear, lora_shrink

    x, w, b, a, bb = _inputs(device, dtype, bias)
    other = (torch.randn(R + 2, D_IN, dtype=torch.float64) * D_IN**-0.5).to(device, dtype).requires_grad_()
    stacked = torch.cat([other, a])  # (2R + 2, d_in): this member's rows second, at an offset
    u = lora_shrink(x, stacked, backend="triton")
    y = lora_expand_linear(x, w, b, u[:, R + 2:], bb, SCALING, backend="triton")
    assert y.grad_fn.next_functions[0][0].name() == "TritonLoRAExpandFunctionBackward"
    grad = torch.randn_like(y)
    got = _grads(y, grad, (x, b, a, bb))

    ref_in = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in (x, w, b, a, bb)]
    ref = lora_linear_reference(*ref_in, SCALING)
    want = _grads(ref, grad.double(), [ref_in[i] for i in (0, 2, 3, 4)])
    _assert_near(y, ref, TOL[dtype], "y")
    for name, g, r in zip(("x", "bias", "A", "B") if bias else ("x", "A", "B"), got, want):
        assert g.dtype == dtype, name
        _assert_near(g, r, TOL[dtype], f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_shared_halves_gradcheck_float64(device):
    from tinytune.ops.triton_kernels.shared_function import TritonLoRAExpandFunction, TritonLoRAShrinkFunction

    x, w, b, a, bb = _inputs(device, torch.float64, True, n=6, d_in=19, d_out=7, r=3)
    w.requires_grad_(True)

    def fn(x, w, b, a, bb):
        u = TritonLoRAShrinkFunction.apply(x, a)
        return TritonLoRAExpandFunction.apply(x, w, b, u, bb, SCALING)

    assert torch.autograd.gradcheck(fn, (x, w, b, a, bb), fast_mode=True)


@pytest.mark.parametrize("device", DEVICES)
def test_auto_mode_shares_where_triton_runs(device, monkeypatch):
    """`share_shrink(model, "auto")` (apply's default) shares on the Triton backend: q/k/v of one attention."""
    import copy

    import tinytune as tt

    monkeypatch.setenv("TINYTUNE_KERNELS", "triton")

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(D_IN, 16) for _ in range(3))

        def forward(self, x):
            q, k, v = self.q(x), self.k(x), self.v(x)
            self.node = k.grad_fn.next_functions[0][0].name()
            return torch.tanh(q * k) * v

    model = Attention().to(device)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=R, alpha=2 * R, targets=["q", "k", "v"]))
    with torch.no_grad():
        for _, layer in tt.lora.lora_layers(model):
            layer.lora_B.normal_(0.0, 0.3)
    separate = copy.deepcopy(model)
    tt.lora.share_shrink(separate, "off")
    x = torch.randn(N, D_IN, device=device)
    for _ in range(2):
        model.zero_grad(), separate.zero_grad()
        y, y_ref = model(x), separate(x)
        (y.square().sum() + y_ref.square().sum()).backward()
    assert model.node == "TritonLoRAExpandFunctionBackward" and separate.node == "TritonLoRALinearFunctionBackward"
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for (name, p), p_ref in zip(model.named_parameters(), separate.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-5, msg=name)
    # non-reentrant checkpointing: the pass is shared without grad, each layer runs its own Function on it
    from torch.utils.checkpoint import checkpoint

    model.zero_grad(), separate.zero_grad()
    y = checkpoint(model, x, use_reentrant=False)
    y_ref = checkpoint(separate, x, use_reentrant=False)
    (y.square().sum() + y_ref.square().sum()).backward()
    assert model.node == "TritonLoRALinearFunctionBackward"
    for (name, p), p_ref in zip(model.named_parameters(), separate.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-5, msg=name)
