"""Benchmark: fused `lora_linear` against a frozen nn.Linear and the usual two-module LoRA.

Variants, all with a frozen base weight and an input that requires grad (as inside a network):
  (a) base    the frozen `nn.Linear` alone;
  (b) peft    `base(x) + lora_B(lora_A(dropout(x))) * s` with `nn.Dropout` (nn.Identity at p=0),
              as Hugging Face PEFT does it;
  (c) fused   `tinytune.ops.lora_linear` (on CUDA its torch-level path, `backend="torch"`);
  (d) triton  `lora_linear(..., backend="triton")`: the Triton kernels (CUDA rows only, where installed).
`--device cuda` (issue 14): the same variants on the GPU in bf16 (every tensor, adapters included), the usual
shapes plus N = 8192, d = 4096, r = 16; CUDA-event timing, and each variant's peak of
`torch.cuda.max_memory_allocated` above what was allocated before its step. Target: (c) or (d) <= 1.15x (a) at
d = 4096, r = 16.
Each timed step is forward + backward. Runs are interleaved (a, b, c, a, b, c, ...) after a warmup;
the median is reported (at least --reps rounds, more for cheap shapes, see `common.interleaved_rounds`). Memory "kept for backward" is the bytes of every distinct storage that
autograd saves during one forward (seen through `torch.autograd.graph.saved_tensors_hooks`), each
storage counted once and parameter storages excluded (they live anyway). The input `x` is counted.

FLOP floor (c relative to a): `1 + 1.5 r (d_in + d_out) / (d_in d_out)`, see docs/benchmarks.md.

Writes `benchmarks/results/lora_linear_<device>.json` and a `.png` picture beside it (see benchmarks/common.py
for `--out`, `--quick`, `--threads`, `--device` and `--replot`).
Usage: python benchmarks/lora_linear.py [--quick] [--repeats N] [--threads N] [--device cpu|cuda] [--out PATH]
       [--replot]
"""
from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from charts import lora_linear_chart as chart  # noqa: E402
from common import (add_common_args, add_device_arg, cuda_peak, gpu_info, interleaved_rounds, machine_info,  # noqa: E402
                    output_path, replot, require_device, setup_threads, write_results)
from tinytune.ops import lora_linear, saved_bytes  # noqa: E402

SHAPES = [  # (tokens, d_in, d_out, rank)
    (2048, 1024, 1024, 8),
    (2048, 1024, 1024, 64),
    (4096, 512, 64, 8),
    (1024, 4096, 4096, 16),
]
QUICK_SHAPES = [(512, 256, 256, 8), (1024, 256, 32, 8)]
CUDA_SHAPES = SHAPES + [(8192, 4096, 4096, 16)]  # the issue-14 shape last
CUDA_DTYPE = torch.bfloat16
DROPOUTS = (0.0, 0.1)
SCALING = 2.0


class PeftLoRA(nn.Module):
    """The two-module LoRA layer as PEFT writes it (base + B(A(dropout(x))) * s)."""

    def __init__(self, base: nn.Linear, r: int, p: float):
        super().__init__()
        self.base = base
        self.dropout = nn.Dropout(p) if p > 0 else nn.Identity()
        kw = dict(bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, r, **kw)
        self.lora_B = nn.Linear(r, base.out_features, **kw)
        nn.init.normal_(self.lora_B.weight, std=0.02)  # non-zero, so every gradient is real work

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * SCALING


def triton_variant() -> bool:
    """Whether the (d) Triton row can run: `lora_linear` takes `backend=` and triton is installed."""
    from tinytune.ops.backend import triton_installed
    return "backend" in inspect.signature(lora_linear).parameters and triton_installed()


def make_variants(d_in: int, d_out: int, r: int, p: float, device: str, dtype=torch.float32):
    """The callables (a, b, c and, on CUDA with Triton, d) sharing one frozen base."""
    base = nn.Linear(d_in, d_out, device=device, dtype=dtype).requires_grad_(False)
    peft = PeftLoRA(base, r, p)
    A, B = peft.lora_A.weight, peft.lora_B.weight
    fns = {"a": base, "b": peft}
    if device == "cpu" or "backend" not in inspect.signature(lora_linear).parameters:
        fns["c"] = lambda x: lora_linear(x, base.weight, base.bias, A, B, SCALING, dropout=p)
        return fns, list(peft.parameters())
    for key, backend in (("c", "torch"), ("d", "triton")) if triton_variant() else (("c", "torch"),):
        fns[key] = lambda x, backend=backend: lora_linear(x, base.weight, base.bias, A, B, SCALING, dropout=p,
                                                           backend=backend)
    return fns, list(peft.parameters())


def step(fn, x, grad) -> None:
    """One forward + backward; gradients are dropped so nothing accumulates across steps."""
    y = fn(x)
    y.backward(grad)
    x.grad = None


def flop_floor(d_in: int, d_out: int, r: int) -> float:
    return 1 + 1.5 * r * (d_in + d_out) / (d_in * d_out)


def bench_shape(n, d_in, d_out, r, p, device, reps, warmup, budget_s) -> dict:
    torch.manual_seed(0)
    dtype = CUDA_DTYPE if device == "cuda" else torch.float32
    fns, params = make_variants(d_in, d_out, r, p, device, dtype)
    x = torch.randn(n, d_in, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(n, d_out, device=device, dtype=dtype)
    steps = {k: (lambda fn=fn: step(fn, x, grad)) for k, fn in fns.items()}
    times, reps = interleaved_rounds(steps, reps, warmup, budget_s, device, params)
    med = {k: statistics.median(v) for k, v in times.items()}
    a, b, c = med["a"], med["b"], med["c"]
    mem = {k: saved_bytes(lambda fn=fn: fn(x), params) for k, fn in fns.items()}
    row = {
        "device": device, "reps": reps, "tokens": n, "d_in": d_in, "d_out": d_out, "rank": r, "dropout": p,
        "ms": {k: v * 1e3 for k, v in med.items()},
        "c_over_a": c / a, "b_over_a": b / a,
        "overhead_ratio": (c - a) / (b - a) if b > a else float("nan"),
        "flop_floor": flop_floor(d_in, d_out, r),
        "saved_bytes": mem,
    }
    if device == "cuda":
        row["dtype"] = str(dtype).removeprefix("torch.")
        row["peak_bytes"] = {k: cuda_peak(lambda fn=fn: step(fn, x, grad))["peak_bytes"] for k, fn in fns.items()}
        if "d" in med:
            row["d_over_a"] = med["d"] / a
    return row


def qkv_memory(n: int, d: int, r: int, p: float, device: str) -> dict:
    """Bytes kept for backward by three projections (q, k, v) sharing one input."""
    torch.manual_seed(0)
    dtype = CUDA_DTYPE if device == "cuda" else torch.float32
    layers = [make_variants(d, d, r, p, device, dtype) for _ in range(3)]
    params = [prm for _, ps in layers for prm in ps]
    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    out = {}
    for k in ("b", "c"):
        out[k] = saved_bytes(lambda k=k: [fns[k](x) for fns, _ in layers], params)
    return {"device": device, "tokens": n, "d": d, "rank": r, "dropout": p,
            "saved_bytes": out, "c_over_b": out["c"] / out["b"]}


def print_rows(rows, qkv) -> None:
    triton = any("d_over_a" in row for row in rows)
    head = (f"{'dev':4} {'N x d_in x d_out':>18} {'r':>3} {'p':>4} {'a ms':>8} {'b ms':>8} "
            f"{'c ms':>8} {'c/a':>6} {'b/a':>6} {'(c-a)/(b-a)':>11} {'floor':>6}") + ("   d/a" if triton else "")
    print(head)
    for row in rows:
        ms = row["ms"]
        shape = f"{row['tokens']}x{row['d_in']}x{row['d_out']}"
        print(f"{row['device']:4} {shape:>18} {row['rank']:>3} {row['dropout']:>4} {ms['a']:8.2f} "
              f"{ms['b']:8.2f} {ms['c']:8.2f} {row['c_over_a']:6.3f} {row['b_over_a']:6.3f} "
              f"{row['overhead_ratio']:11.2f} {row['flop_floor']:6.3f}"
              + (f" {row['d_over_a']:6.3f}" if triton else ""))
    for q in qkv:
        mb = {k: v / 2**20 for k, v in q["saved_bytes"].items()}
        print(f"q/k/v memory kept ({q['device']}, N={q['tokens']}, d={q['d']}, r={q['rank']}, "
              f"p={q['dropout']}): b {mb['b']:.2f} MiB, c {mb['c']:.2f} MiB, c/b {q['c_over_b']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, "--reps", "minimum timed rounds per shape (default 21; --quick 3; cheap shapes get more)")
    add_device_arg(ap)
    args = ap.parse_args()
    out = output_path(f"lora_linear_{args.device}", args.out, args.quick)
    if args.replot:
        return replot(out, chart)
    require_device(ap, args.device)
    threads = setup_threads(args.threads)
    reps = args.reps or (3 if args.quick else 21)
    warmup = 1 if args.quick else 3
    budget_s = 0.2 if args.quick else (1.0 if args.device == "cuda" else 3.0)  # GPU medians are steadier
    load_before = os.getloadavg()
    device = args.device
    shapes = QUICK_SHAPES if args.quick else (CUDA_SHAPES if device == "cuda" else SHAPES)
    rows, qkv = [], []
    for n, d_in, d_out, r in shapes:
        for p in DROPOUTS:
            rows.append(bench_shape(n, d_in, d_out, r, p, device, reps, warmup, budget_s))
    qkv.append(qkv_memory(256 if args.quick else 2048, 128 if args.quick else 1024, 8, 0.1, device))
    print_rows(rows, qkv)
    machine = machine_info(threads) | {"load_avg_before": load_before, "load_avg_after": os.getloadavg()}
    if device == "cuda":
        machine |= gpu_info()
    write_results(out, {"machine": machine, "min_reps": reps, "warmup": warmup, "rows": rows, "qkv_memory": qkv},
                  chart)


if __name__ == "__main__":
    main()
