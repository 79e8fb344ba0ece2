"""Benchmark: every PEFT method on the same base and task, in one table.

Base: the `tinytune demo` model (a character-level `llama-tiny`, 128 wide, 3 layers, 0.47M parameters,
pre-trained on generated instruction records, cached under $TINYTUNE_CACHE). Task: the demo's
held-out instruction, "Shift letters: abcd" -> "bcde" (400 training words, 100 held-out), loaded with
`tt.data.load_instructions` (loss on the response only). Every method trains `--steps` optimizer steps
of batch 16 with `tt.train.fit` (AdamW, cosine schedule, 10 warmup steps, fp32) at its own learning rate
(a typical one for the method, listed in the table; not tuned per method beyond that).

Reported per method: trainable parameters (count and % of the model), median step time (from the
training loop's own steps), peak memory (rise of the resident-set high-water mark over the loaded,
adapted model, in a fresh process per method), and exact match (greedy `tt.generate`) on the held-out
words before and after training.

Writes `benchmarks/results/methods_cpu.json` and `methods_cpu.png` beside it (see benchmarks/common.py for
`--out`, `--quick`, `--threads` and `--replot`).
Usage: python benchmarks/methods.py [--steps N] [--quick] [--threads N] [--out PATH] [--replot]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tinytune as tt  # noqa: E402
from charts import methods_chart as chart  # noqa: E402
from common import add_common_args, machine_info, output_path, replot, setup_threads, worker_env, write_results  # noqa: E402,E501
from tinytune.cli import demo, demo_data  # noqa: E402
from tinytune.ops import PeakMemory  # noqa: E402


def _lora(**kw):
    return lambda m: tt.lora.apply(m, tt.lora.LoraConfig(rank=8, alpha=16, targets="all-linear", **kw))


def _full(model):
    for p in model.parameters():
        p.requires_grad_(True)


# name: (how to apply the method to the base, learning rate)
METHODS = {
    "full fine-tuning": (_full, 1e-3),
    "freeze: last block": (lambda m: tt.freeze.last_blocks(m, 1), 1e-3),
    "freeze: norms only": (lambda m: tt.freeze.apply(m, tt.freeze.FreezeConfig(mode="norms")), 1e-2),
    "LoRA r8 all-linear": (_lora(), 5e-3),
    "DoRA r8 all-linear": (_lora(dora=True), 5e-3),
    "(IA)3": (lambda m: tt.ia3.apply(m, tt.ia3.IA3Config()), 3e-2),
    "adapters (Houlsby, b=16)": (lambda m: tt.adapter.apply(m, tt.adapter.AdapterConfig(bottleneck=16)), 5e-3),
    "adapters (Pfeiffer, b=16)": (
        lambda m: tt.adapter.apply(m, tt.adapter.AdapterConfig(bottleneck=16, placement="pfeiffer")), 5e-3),
    "prefix tuning (P=10)": (lambda m: tt.prefix.apply(m, tt.prefix.PrefixConfig(num_virtual_tokens=10)), 1e-2),
    "prefix tuning (P=10, MLP 64)": (
        lambda m: tt.prefix.apply(m, tt.prefix.PrefixConfig(num_virtual_tokens=10, reparam_hidden=64)), 1e-2),
    "prompt tuning (P=10)": (
        lambda m: tt.prompt.apply(m, tt.prompt.PromptConfig(num_virtual_tokens=10, init="vocab")), 3e-2),
}


def worker(method: str, steps: int) -> dict:
    """In a fresh process: apply `method` to the cached base, train, measure; a JSON-ready dict."""
    model, tok = demo.base_model(dict(demo.FULL), use_cache=True, quick=False, out=lambda *a: None)
    train, held_out = demo_data.shift_task(demo.FULL["n_train"], demo.FULL["n_eval"])
    path = demo_data.write_jsonl(Path(os.environ["METHODS_TMP"]) / "train.jsonl", train)
    examples = tt.data.load_instructions(path, tok, demo_data.TEMPLATE)
    before, _ = demo.exact_match(model, tok, held_out)
    apply, lr = METHODS[method]
    apply(model)
    pc = tt.count_parameters(model)
    stamps = []
    cfg = tt.train.TrainConfig(lr=lr, steps=steps, batch_size=16, schedule="cosine", warmup_steps=min(10, steps // 5),
                               log_every=10**6, seed=0)
    with PeakMemory("cpu") as pm:
        tt.train.fit(model, examples, cfg, callbacks=[lambda step, h: stamps.append(time.perf_counter())],
                     stream=open(os.devnull, "w"))
    after, _ = demo.exact_match(model, tok, held_out)
    step_s = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    return {"method": method, "lr": lr, "trainable": pc.trainable, "total": pc.total,
            "trainable_pct": 100 * pc.trainable_fraction, "step_ms": 1000 * step_s, "peak_bytes": pm.peak_bytes,
            "exact_match_before": before, "exact_match_after": after}


def run_all(args) -> list[dict]:
    rows = []
    for method in METHODS:
        cmd = [sys.executable, __file__, "--worker", method, "--steps", str(args.steps)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(args.threads, METHODS_TMP=args.tmp))
        if done.returncode != 0:
            raise RuntimeError(f"{method} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {method}: done", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    print("| method | lr | trainable | % | step ms | peak MiB | exact match before -> after |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['method']} | {r['lr']:g} | {r['trainable']:,} | {r['trainable_pct']:.2f} | {r['step_ms']:.1f} | "
              f"{r['peak_bytes'] / 2**20:.1f} | {r['exact_match_before']:.0%} -> {r['exact_match_after']:.0%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default 150; --quick 5)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = output_path("methods_cpu", args.out, args.quick)
    if args.replot:
        return replot(out, chart)
    args.threads = setup_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return
    args.steps = args.steps or (5 if args.quick else 150)
    demo.base_model(dict(demo.FULL), use_cache=True, quick=False)  # pre-train (and cache) once, up front
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        info = machine_info(args.threads) | {"steps": args.steps}
        rows = run_all(args)
    info["load_avg_after"] = os.getloadavg()
    print_table(rows)
    write_results(out, {"machine": info, "rows": rows}, chart)


if __name__ == "__main__":
    main()
