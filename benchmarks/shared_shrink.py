"""Benchmark: one shared LoRA shrink pass for q/k/v against three separate ones, and the frozen projections alone.

The parent is attention-like: `q_proj` (d -> d), `k_proj` and `v_proj` (d -> d_kv), frozen `nn.Linear`s reading one
input x (N, d) that requires grad (as inside a network); its forward returns (q, k, v). Variants, all one forward +
backward of the parent with the same frozen weights:
  (a) base      the frozen projections alone (no LoRA, same shapes);
  (b) separate  LoRA r on all three (`tt.lora.apply`, dropout 0, B initialised non-zero so every gradient is real
                work), `tt.lora.share_shrink(model, "off")`: each layer computes its own `x A^T`;
  (c) shared    the same LoRA with `share_shrink(model, "on")`: one `x [A_q; A_k; A_v]^T` (`ops.lora_shrink`), each
                projection adding its slice (`ops.lora_expand_linear`).
Sharers are learned on the first forward, so every variant runs at least 2 warmup rounds before timing; the row
records which members shared (`sharers`, expected [0, 1, 2] for (c)) and how far (c) is from (b) in outputs and
input gradient (`max_abs_diff`: the same values up to the order of float sums).
On the CPU (fp32) "auto" does not share (measured not to pay, docs/kernels.md): these rows say by how much.
`--device cuda`: bf16 (weights, adapters and activations), the CPU shapes plus N = 8192, d = 4096 with d_kv = 1024 and
4096; the LoRA variants run the backend "auto" picks there (the Triton kernels where triton is installed, recorded
as `backend`), CUDA-event timing, and each variant's peak of `torch.cuda.max_memory_allocated` above what was
allocated before its step.
Runs are interleaved (a, b, c, a, b, c, ...) after the warmup; the median is reported, with the quartiles of the
rounds as a measure of the noise (at least --reps rounds, more for cheap shapes, see `common.interleaved_rounds`). Memory
"kept for backward" (`tinytune.ops.graph_saved_storages`, read from the graph: saved-tensor hooks would
change what the shared shrink keeps) is the bytes of every distinct storage autograd keeps after one forward of the parent, each storage counted once and parameter storages excluded (they live anyway); x counts where
it is saved (the frozen projections alone, needing no weight gradient, keep only their weights: 0 bytes).
FLOP floor of (b) and (c) relative to (a): `1 + 1.5 r sum(d_in + d_out) / sum(d_in d_out)` over the three
projections (the same FLOPs: sharing saves passes over x, not arithmetic).

Writes `benchmarks/results/shared_shrink_<device>.json` and a `.png` picture beside it (see benchmarks/common.py for
`--out`, `--quick`, `--threads`, `--device` and `--replot`).
Usage: python benchmarks/shared_shrink.py [--quick] [--repeats N] [--threads N] [--device cpu|cuda] [--out PATH]
       [--replot]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from charts import shared_shrink_chart as chart  # noqa: E402
from common import (add_common_args, add_device_arg, cuda_peak, gpu_info, interleaved_rounds, machine_info,  # noqa: E402
                    output_path, replot, require_device, setup_threads, write_results)
import tinytune as tt  # noqa: E402
from tinytune.ops import choose_backend, graph_saved_storages  # noqa: E402

SHAPES = [  # (tokens N, d, d_kv, rank)
    (2048, 1024, 1024, 16),
    (2048, 1024, 256, 16),
    (2048, 2048, 512, 16),
    (1024, 4096, 1024, 16),
    (2048, 1024, 256, 64),
]
QUICK_SHAPES = [(128, 64, 32, 4), (64, 64, 16, 8)]
CUDA_SHAPES = SHAPES + [(8192, 4096, 1024, 16), (8192, 4096, 4096, 16)]
CUDA_DTYPE = torch.bfloat16
VARIANTS = {"a": "base", "b": "separate", "c": "shared"}


class Attention(nn.Module):
    """q/k/v projections of one input; the parent whose forward opens the shrink group."""

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = q_proj, k_proj, v_proj

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def make_variants(d: int, d_kv: int, r: int, device: str, dtype) -> tuple[dict, list]:
    """The three parents (a, b, c) over one set of frozen projections, and every parameter (each once)."""
    linears = [nn.Linear(d, out, device=device, dtype=dtype).requires_grad_(False) for out in (d, d_kv, d_kv)]
    models = {"a": Attention(*linears)}
    cfg = tt.lora.LoraConfig(rank=r, alpha=2 * r, dropout=0.0, targets=["q_proj", "k_proj", "v_proj"])
    for key, mode in (("b", "off"), ("c", "on")):
        model = Attention(*linears)  # its own LoRALinear wrappers around the shared frozen linears
        tt.lora.apply(model, cfg)
        model.to(device=device, dtype=dtype)
        with torch.no_grad():
            for name, prm in model.named_parameters():
                if "lora_" not in name:
                    continue  # the frozen linears, shared by every variant
                if key == "c":
                    prm.copy_(models["b"].get_parameter(name))  # the same adapter as (b)
                elif "lora_B" in name:
                    prm.normal_(std=0.02)  # non-zero, so every gradient is real work
        tt.lora.share_shrink(model, mode)
        models[key] = model
    params = list({id(prm): prm for m in models.values() for prm in m.parameters()}.values())
    return models, params


def step(model, x, grads) -> None:
    """One forward + backward of the parent; gradients are dropped so nothing accumulates across steps."""
    torch.autograd.backward(model(x), grads)
    x.grad = None


def quartiles(values: list[float]) -> list[float]:
    """[first, third] quartile of `values` (both the value itself for one run)."""
    if len(values) < 2:
        return [values[0], values[0]]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return [q1, q3]


def flop_floor(d: int, d_kv: int, r: int) -> float:
    dims = [(d, d), (d, d_kv), (d, d_kv)]
    return 1 + 1.5 * r * sum(i + o for i, o in dims) / sum(i * o for i, o in dims)


def sharers(model) -> list[int]:
    """The members of `model`'s shrink group seen reading one input (what a shared forward serves)."""
    group = model.q_proj._shrink_group
    return sorted(group.sharers) if group is not None else []


def max_abs_diff(models: dict, x, grads) -> float:
    """Largest |(c) - (b)| over the outputs and the input gradient of one step."""
    found = []
    for k in "bc":
        outs = models[k](x)
        torch.autograd.backward(outs, grads)
        found.append([o.detach().float() for o in outs] + [x.grad.float()])
        x.grad = None
    return max((b - c).abs().max().item() for b, c in zip(*found))


def kept_bytes(model, x, params) -> int:
    """Bytes autograd keeps after one forward, read from the graph (`graph_saved_storages`): saved-tensor hooks
    (`saved_bytes`) would put the shared shrink in its forward-only mode, kept for checkpoint recomputes."""
    outputs = model(x)
    return sum(graph_saved_storages(outputs, exclude=params).values())


def bench_shape(n, d, d_kv, r, device, reps, warmup, budget_s) -> dict:
    torch.manual_seed(0)
    dtype = CUDA_DTYPE if device == "cuda" else torch.float32
    models, params = make_variants(d, d_kv, r, device, dtype)
    x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    grads = [torch.randn(n, out, device=device, dtype=dtype) for out in (d, d_kv, d_kv)]
    steps = {k: (lambda m=m: step(m, x, grads)) for k, m in models.items()}
    times, reps = interleaved_rounds(steps, reps, warmup, budget_s, device, params)
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = max_abs_diff(models, x, grads)
    for prm in params:
        prm.grad = None
    mem = {k: kept_bytes(m, x, params) for k, m in models.items()}
    a, b, c = med["a"], med["b"], med["c"]
    row = {"device": device, "dtype": str(dtype).removeprefix("torch."), "backend": choose_backend(None, x),
           "reps": reps, "tokens": n, "d": d, "d_kv": d_kv, "rank": r,
           "ms": {k: v * 1e3 for k, v in med.items()},
           "ms_quartiles": {k: [q * 1e3 for q in quartiles(v)] for k, v in times.items()},  # the spread (noise)
           "b_over_a": b / a, "c_over_a": c / a, "c_over_b": c / b, "flop_floor": flop_floor(d, d_kv, r),
           "saved_bytes": mem, "saved_c_over_b": mem["c"] / mem["b"],
           "sharers": {k: sharers(models[k]) for k in "bc"}, "max_abs_diff": diff}
    if device == "cuda":
        row["peak_bytes"] = {k: cuda_peak(lambda m=m: step(m, x, grads))["peak_bytes"] for k, m in models.items()}
    return row


def print_rows(rows) -> None:
    print(f"{'dev':4} {'N x d x d_kv':>16} {'r':>3} {'a ms':>8} {'b ms':>8} {'c ms':>8} {'b/a':>6} {'c/a':>6} "
          f"{'c/b':>6} {'floor':>6} {'kept a/b/c MiB':>20} {'sharers c':>10} {'max|c-b|':>9}")
    for row in rows:
        ms, mib = row["ms"], "/".join(f"{row['saved_bytes'][k] / 2**20:.1f}" for k in "abc")
        shape = f"{row['tokens']}x{row['d']}x{row['d_kv']}"
        print(f"{row['device']:4} {shape:>16} {row['rank']:>3} {ms['a']:8.2f} {ms['b']:8.2f} {ms['c']:8.2f} "
              f"{row['b_over_a']:6.3f} {row['c_over_a']:6.3f} {row['c_over_b']:6.3f} {row['flop_floor']:6.3f} "
              f"{mib:>20} {str(row['sharers']['c']):>10} {row['max_abs_diff']:9.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, "--reps", "minimum timed rounds per shape (default 25; --quick 2; cheap shapes get more)")
    add_device_arg(ap)
    args = ap.parse_args()
    out = output_path(f"shared_shrink_{args.device}", args.out, args.quick)
    if args.replot:
        return replot(out, chart)
    require_device(ap, args.device)
    threads = setup_threads(args.threads)
    reps = args.reps or (2 if args.quick else 25)
    warmup = 2  # the first forward learns the sharers; the second is the first that shares
    budget_s = 0.1 if args.quick else (1.0 if args.device == "cuda" else 10.0)  # GPU medians are steadier
    load_before = os.getloadavg()
    device = args.device
    shapes = QUICK_SHAPES if args.quick else (CUDA_SHAPES if device == "cuda" else SHAPES)
    rows = [bench_shape(n, d, d_kv, r, device, reps, warmup, budget_s) for n, d, d_kv, r in shapes]
    print_rows(rows)
    machine = machine_info(threads) | {"load_avg_before": load_before, "load_avg_after": os.getloadavg()}
    if device == "cuda":
        machine |= gpu_info()
    setup = {"device": device, "variants": VARIANTS, "kernels": os.environ.get("TINYTUNE_KERNELS", "auto"),
             "dropout": 0.0, "lora_B_init": "normal(std=0.02)"}
    write_results(out, {"machine": machine, "setup": setup, "min_reps": reps, "warmup": warmup, "rows": rows,
                        "method": __doc__}, chart)


if __name__ == "__main__":
    main()
