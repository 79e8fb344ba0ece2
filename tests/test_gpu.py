"""CUDA checks (issue 14, point 4): the fused LoRA op, the fused loss, fit in bf16 and fp16 (GradScaler), DDP over
nccl with one process, and generation, each on a tiny shape against its reference. Every test is `gpu`-marked and
skipped without CUDA (conftest.py); `benchmarks/gpu_check.sh` runs them on a GPU machine with TRITON_INTERPRET=0.

Run as a script (`torchrun --nproc-per-node 1 tests/test_gpu.py OUT`) it is the one-process nccl worker of
`test_ddp_nccl_one_process`.
"""
import inspect
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tinytune as tt
from tinytune.ops import linear_cross_entropy, lora_linear, lora_linear_reference
from tinytune.ops.backend import interpreting, triton_installed

HERE = Path(__file__).parent
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Tolerances against a float64 reference computed on the GPU from the same (rounded) inputs, as a fraction of the
# reference's largest magnitude (`assert_near`): elementwise relative bounds fail on sums that cancel, and a bf16
# result of magnitude 16 is rounded to 1/8 already. fp32: accumulation order only (no TF32, torch's default for
# matmuls); bf16 / fp16 round inputs, the (N, r) intermediate and the output to 8 / 11 significant bits: a few
# units of their epsilon (2^-8, 2^-11).
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
DTYPES = list(TOL)
SHAPES = [((37,), 100, 52, 8), ((3, 17), 64, 96, 16)]  # (leading dims, d_in, d_out, r): odd, not block multiples


def assert_near(got: torch.Tensor, ref: torch.Tensor, rel: float, what: str) -> None:
    """max |got - ref| <= rel * max |ref| (see TOL), shapes equal; the message names `what` and both numbers."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err, scale = (got.double() - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} x max |ref| {scale:.3g}"


def takes_backend(fn) -> bool:
    """Whether a tinytune op accepts `backend=` (the Triton kernels of issue 14 add it)."""
    return "backend" in inspect.signature(fn).parameters


def backends(fn) -> list:
    """"torch" always; "triton" where the op takes `backend=`, triton is installed and its interpreter is off
    (these tests are of the compiled kernels: tests/test_triton_*.py cover the interpreter), else a skip."""
    triton = pytest.param("triton", marks=pytest.mark.skipif(
        not (takes_backend(fn) and triton_installed()) or interpreting(),
        reason="op takes no backend= yet, triton is missing, or TRITON_INTERPRET is on"))
    return ["torch", triton]


def call(fn, *args, backend: str, **kw):
    """`fn(*args, **kw)` with `backend=` when the op takes it (the torch path is the default otherwise)."""
    return fn(*args, **kw, backend=backend) if takes_backend(fn) else fn(*args, **kw)


def lora_inputs(lead, d_in, d_out, r, dtype):
    """x (requires grad) and the frozen base in `dtype`; A, B fp32 trainable adapters (as tinytune keeps them)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s, scale=1.0: (torch.randn(*s, device="cuda", generator=g) * scale)  # noqa: E731
    x = rand(*lead, d_in).to(dtype).requires_grad_()
    w, b = rand(d_out, d_in, scale=d_in ** -0.5).to(dtype), rand(d_out, scale=0.1).to(dtype)
    a = rand(r, d_in, scale=d_in ** -0.5).requires_grad_()
    bb = rand(d_out, r, scale=r ** -0.5).requires_grad_()
    return x, w, b, a, bb


def probe_mask(lead, d_in, r, p, seed, dtype, backend) -> torch.Tensor:
    """The keep-mask the op draws for (seed, row, column) over an input of shape (*lead, d_in), read back through
    the op itself, r columns at a time (rank r, as the real call): W = 0, A = rows j..j+r of I, B = I, so
    y = s / (1 - p') * (keep * x)[..., j:j+r]. Works for any backend's mask scheme that depends on (seed, row,
    column) only, as issue 14 asks of the kernels."""
    x = (torch.randn(*lead, d_in, device="cuda") + 3.0).to(dtype)  # never 0, so y == 0 only where dropped
    eye, zero = torch.eye(d_in, device="cuda"), torch.zeros(r, d_in, device="cuda", dtype=dtype)
    keep = torch.zeros(*lead, d_in, device="cuda", dtype=torch.float64)
    for j in sorted({*range(0, d_in - r, r), d_in - r}):  # the last block overlaps, so every column is read
        y = call(lora_linear, x, zero, None, eye[j:j + r], eye[:r, :r], 1.0, dropout=p, seed=seed, backend=backend)
        keep[..., j:j + r] = (y != 0).to(torch.float64)
    return keep


@pytest.mark.parametrize("backend", backends(lora_linear))
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lora_linear_cuda_matches_float64_reference(shape, dtype, p, backend):
    lead, d_in, d_out, r = shape
    x, w, b, a, bb = lora_inputs(lead, d_in, d_out, r, dtype)
    seed = 1234
    y = call(lora_linear, x, w, b, a, bb, 2.0, dropout=p, seed=seed, backend=backend)
    assert y.dtype == dtype and y.shape == (*lead, d_out) and y.is_cuda
    g = torch.randn_like(y)
    y.backward(g)
    mask = probe_mask(lead, d_in, r, p, seed, dtype, backend) if p else None
    if mask is not None:
        assert 0.8 < mask.mean().item() < 0.97, f"keep fraction {mask.mean().item():.3f} at p={p}"
    xd, ad, bd = (t.detach().double().requires_grad_() for t in (x, a, bb))
    ref = lora_linear_reference(xd, w.double(), b.double(), ad, bd, 2.0, mask=mask, p=p)
    ref.backward(g.double())
    for what, got, want in (("y", y, ref), ("grad x", x.grad, xd.grad), ("grad A", a.grad, ad.grad),
                            ("grad B", bb.grad, bd.grad)):
        assert_near(got, want, TOL[dtype], f"{what}, {backend}, {dtype}, p={p}")


@pytest.mark.parametrize("backend", backends(lora_linear))
def test_lora_linear_cuda_dropout_is_a_function_of_the_seed(backend):
    x, w, b, a, bb = lora_inputs((64,), 48, 32, 8, torch.float32)
    y1, y2, y3 = (call(lora_linear, x, w, b, a, bb, 2.0, dropout=0.3, seed=s, backend=backend) for s in (5, 5, 6))
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


@pytest.mark.parametrize("backend", backends(linear_cross_entropy))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_cross_entropy_cuda_matches_naive_loss(dtype, backend):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(2, 37, 64, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.randn(301, 64, device="cuda", generator=g) * 0.125).to(dtype).requires_grad_()
    labels = torch.randint(0, 301, (2, 37), device="cuda", generator=g)
    labels[0, :5] = -100
    loss = call(linear_cross_entropy, h, w, labels, chunk_size=16, backend=backend)
    loss.backward()
    hd, wd = (t.detach().double().requires_grad_() for t in (h, w))
    ref = F.cross_entropy((hd @ wd.t()).view(-1, 301), labels.view(-1), ignore_index=-100)
    ref.backward()
    assert loss.dtype == torch.float32
    for what, got, want in (("loss", loss, ref), ("grad hidden", h.grad, hd.grad), ("grad weight", w.grad, wd.grad)):
        assert_near(got, want, TOL[dtype], f"{what}, {backend}, {dtype}")


def lora_model():
    """llama-tiny with rank-4 LoRA on every linear layer, the same weights on every call."""
    model = tt.models.build("llama-tiny")
    torch.manual_seed(1)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, dropout=0.05, targets="all-linear"))
    return model


def counting_data(n: int = 16) -> list[dict]:
    return [{"input_ids": [(i + k) % 50 for k in range(12)], "labels": [(i + k) % 50 for k in range(12)]}
            for i in range(n)]


@pytest.mark.parametrize("dtype, base_dtype", [("bf16", "bf16"), ("bf16", None), ("fp16", None)])
def test_fit_on_cuda(dtype, base_dtype):
    """A few steps of fit on CUDA: finite losses, the frozen base untouched (up to its cast), the adapters moved."""
    model = lora_model()
    frozen = {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}
    trainable = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    cfg = tt.train.TrainConfig(lr=1e-2, steps=4, batch_size=4, log_every=1, progress="none", device="cuda",
                               dtype=dtype, base_dtype=base_dtype, max_grad_norm=1.0)
    h = tt.train.fit(model, counting_data(), cfg, stream=io.StringIO())
    assert len(h.losses) == 4 and all(math.isfinite(x) for x in h.losses), h.losses
    assert not h.skipped_steps and h.stopped_reason == "completed"
    after = dict(model.named_parameters())
    cast = torch.bfloat16 if base_dtype == "bf16" else torch.float32
    for k, v in frozen.items():
        assert after[k].is_cuda and torch.equal(after[k].detach().cpu(), v.to(cast)), k
    assert all(after[k].dtype == torch.float32 for k in trainable)  # adapters stay fp32 master weights
    assert any(not torch.equal(after[k].detach().cpu(), v) for k, v in trainable.items())


def test_generate_cuda_equals_cpu_greedy():
    """Greedy tokens on CUDA equal the CPU's (fp32; the head is scaled so no step is a near tie)."""
    model = tt.models.build("llama-tiny")
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    on_cpu = tt.generate(model, ids, max_new_tokens=12, eos_token_id=[])
    on_gpu = tt.generate(model.to("cuda"), ids.to("cuda"), max_new_tokens=12, eos_token_id=[])
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), on_cpu)


def test_ddp_nccl_one_process(tmp_path):
    """torchrun with one process: an nccl group, fit under it, and a DDP-wrapped step equal to the plain one."""
    env = {**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", __file__,
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads((tmp_path / "nccl.json").read_text())
    assert got["backend"] == "nccl" and got["world_size"] == 1 and got["all_reduce"] == 3.0
    assert all(math.isfinite(x) for x in got["losses"]) and got["max_grad_diff"] < 1e-5


def ddp_worker(out: Path) -> None:
    """The torchrun process of `test_ddp_nccl_one_process`: writes what it saw to out/nccl.json."""
    import torch.distributed as dist
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    t = torch.ones(1, device="cuda") * 3
    dist.all_reduce(t)
    cfg = tt.train.TrainConfig(lr=1e-2, steps=3, batch_size=4, log_every=1, progress="none", device="cuda")
    h = tt.train.fit(lora_model(), counting_data(), cfg, stream=io.StringIO())
    ids = torch.tensor([row["input_ids"] for row in counting_data(4)], device="cuda")
    plain, wrapped = lora_model().cuda(), lora_model().cuda()
    ddp = torch.nn.parallel.DistributedDataParallel(wrapped, device_ids=[torch.cuda.current_device()])
    torch.manual_seed(0)
    plain(ids, labels=ids).loss.backward()
    torch.manual_seed(0)
    ddp(ids, labels=ids).loss.backward()  # the gradient all-reduce runs over nccl, even with one rank
    diff = max((p.grad - q.grad).abs().max().item() for p, q in zip(plain.parameters(), wrapped.parameters())
               if p.grad is not None)
    (out / "nccl.json").write_text(json.dumps({"backend": dist.get_backend(), "world_size": dist.get_world_size(),
                                               "all_reduce": t.item(), "losses": h.losses, "max_grad_diff": diff}))
    dist.destroy_process_group()


if __name__ == "__main__":
    ddp_worker(Path(sys.argv[1]))
