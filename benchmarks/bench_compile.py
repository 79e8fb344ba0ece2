"""Benchmark: a LoRA training step compiled with torch.compile (inductor) against the same step eager, on CPU.

Setup: the `llama-30m` preset cut to 2 layers (d 512, MLP 1408, vocab 8192, random weights, fp32), LoRA
rank 16 / alpha 32 on every linear but `lm_head`, batch 4 x 128 random tokens (labels = inputs), AdamW
(torch's, lr 1e-4) over the adapter parameters; LoRA dropout 0.05 and 0.0. One step = forward + loss +
backward + AdamW step + zero_grad. The loss is the one `fit` computes (`train_loss` below: the chunked
`tinytune.ops.linear_cross_entropy` from the final hidden states, divided by the scored-token count
counted outside the step, as the loop does; counting inside would read a value back and break the
graph). Compiled: `torch.compile(loss, fullgraph=True)` with the default (inductor) backend, so
forward, loss and backward run compiled; the optimizer step runs eagerly in both variants. Under
compilation `lora_linear` runs its traceable twin (see `tinytune/ops/lora_matmul.py`): its dropout
masks come from torch's generator, not the eager numpy stream, so the two variants do the same work
on different masks.

Speed: every variant lives in one process; the first call of a compiled step (the compilation, cold:
inductor's on-disk caches are off) is timed on its own; then after `--warmup` rounds, `--rounds` rounds
run one step of each variant in turn (order rotating each round). Reported: median step time and
`speedup = eager median / compiled median` at the same dropout, measured in the same run.
The graph count is `torch._dynamo.explain` of the loss.

Writes `benchmarks/results/compile_cpu.json` and `compile_cpu.png` beside it (see benchmarks/common.py for
`--out`, `--quick`, `--threads` and `--replot`).
Usage: python benchmarks/bench_compile.py [--quick] [--repeats N] [--warmup N] [--threads N] [--out PATH] [--replot]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tinytune as tt  # noqa: E402
from charts import compile_chart as chart  # noqa: E402
from common import (add_common_args, fill_defaults, machine_info, output_path, random_ids, replot,  # noqa: E402
                    setup_threads, write_results)


RANK, ALPHA, LR = 16, 32, 1e-4
DROPOUTS = (0.05, 0.0)


def build(preset: str, layers: int, dropout: float):
    model = tt.models.build(preset, num_layers=layers)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=RANK, alpha=ALPHA, dropout=dropout, targets="all-linear",
                                            exclude=["lm_head"]))
    with torch.no_grad():  # B != 0, as after some training (B = 0 would make dropout invisible)
        for layer in model.modules():
            if isinstance(layer, tt.lora.LoRALinear):
                layer.lora_B.normal_(0.0, 0.02)
    return model.train()


def train_loss(model, ids: torch.Tensor, count: int) -> torch.Tensor:
    """The causal-LM loss `fit` computes for a plain head: the model's own, chunked from the final hidden states."""
    return model(ids, labels=ids, num_items_in_batch=count).loss


def make_step(model, ids: torch.Tensor, compiled: bool):
    """A closure running one training step (forward + loss + backward + AdamW + zero_grad)."""
    count = ids.shape[0] * (ids.shape[1] - 1)  # labels = inputs: every shifted position is scored
    loss_fn = lambda ids: train_loss(model, ids, count)  # noqa: E731
    if compiled:
        loss_fn = torch.compile(loss_fn, fullgraph=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step():
        loss_fn(ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def graph_count(model, ids: torch.Tensor) -> tuple[int, int]:
    """(graphs, graph breaks) dynamo makes of the loss function."""
    count = ids.shape[0] * (ids.shape[1] - 1)
    explained = torch._dynamo.explain(lambda ids: train_loss(model, ids, count))(ids)
    torch._dynamo.reset()
    return explained.graph_count, explained.graph_break_count


def setup_variants(args, ids: torch.Tensor) -> tuple[dict, dict]:
    """{(dropout, compiled): step} on one model per dropout, and per variant what was measured once."""
    steps, info = {}, {}
    for p in DROPOUTS:
        model = build(args.preset, args.layers, p)
        graphs = graph_count(model, ids)
        for compiled in (False, True):
            steps[(p, compiled)] = step = make_step(model, ids, compiled)
            start = time.perf_counter()
            step()  # the compilation, for the compiled variant
            info[(p, compiled)] = {"first_step_s": time.perf_counter() - start,
                                   **({"graphs": graphs[0], "graph_breaks": graphs[1]} if compiled else {})}
    return steps, info


def measure(steps: dict, rounds: int, warmup: int) -> dict:
    keys, times = list(steps), {k: [] for k in steps}
    for r in range(warmup + rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            start = time.perf_counter()
            steps[k]()
            if r >= warmup:
                times[k].append(time.perf_counter() - start)
    return times


def report(args, times: dict, info: dict) -> list[dict]:
    rows = []
    for (p, compiled), ts in times.items():
        med = statistics.median(ts)
        rows.append({"variant": f"{'compiled (inductor)' if compiled else 'eager'}, dropout {p}", "dropout": p,
                     "compiled": compiled, "median_step_s": med, "tokens_per_s": args.batch * args.seq / med,
                     "step_s": ts, **info[(p, compiled)]})
    eager = {r["dropout"]: r["median_step_s"] for r in rows if not r["compiled"]}
    for r in rows:
        r["speedup_vs_eager"] = eager[r["dropout"]] / r["median_step_s"]
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'variant':<34} {'step ms':>8} {'tokens/s':>9} {'speedup':>8} {'first step s':>13} {'graphs':>7}")
    for r in rows:
        print(f"{r['variant']:<34} {r['median_step_s'] * 1e3:>8.1f} {r['tokens_per_s']:>9,.0f} "
              f"{r['speedup_vs_eager']:>7.2f}x {r['first_step_s']:>13.1f} {r.get('graphs', ''):>7}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, "--rounds", "timed rounds (default 15; --quick 3; quick: llama-tiny, batch 2 x 32)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 3; --quick 1)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    out = output_path("compile_cpu", args.out, args.quick)
    if args.replot:
        return replot(out, chart)
    shape = ("llama-tiny", 2, 2, 32) if args.quick else ("llama-30m", 2, 4, 128)
    args.preset, args.layers, args.batch, args.seq = shape
    fill_defaults(args, dict(rounds=15, warmup=3), dict(rounds=3, warmup=1))
    threads = setup_threads(args.threads)
    torch._inductor.config.force_disable_caches = True  # the first step is a cold compile, not a cache hit
    machine = machine_info(threads)
    ids = random_ids(args.batch, args.seq, tt.models.preset_config(args.preset).vocab_size)
    steps, info = setup_variants(args, ids)
    rows = report(args, measure(steps, args.rounds, args.warmup), info)
    machine["load_avg_after"] = os.getloadavg()
    print_table(rows)
    setup = {"preset": args.preset, "num_layers": args.layers, "batch": args.batch, "seq_len": args.seq, "rank": RANK,
             "alpha": ALPHA, "targets": "all-linear except lm_head", "rounds": args.rounds, "warmup": args.warmup,
             "backend": "inductor", "fullgraph": True, "optimizer": "AdamW, eager"}
    write_results(out, {"machine": machine, "setup": setup, "rows": rows}, chart)


if __name__ == "__main__":
    main()
