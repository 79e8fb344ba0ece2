"""Benchmark: one LoRA training step, tinytune vs `transformers` + `peft`, on the same weights and data.

Setup (issue 4, point 10): the `llama-30m` preset (random weights, written with
`tinytune.save_pretrained` and loaded by both libraries in fp32), LoRA rank 16 / alpha 32 on every
linear layer except lm_head, dropout 0.05, batch 8 x 256 random tokens (labels = inputs), AdamW
(torch's, lr 1e-4) over the adapter parameters. One step = forward + loss + backward + AdamW step
+ zero_grad. tinytune: `tt.lora.apply` + the loss `fit` computes (`tinytune_loss` below: the LM head is a
plain frozen `nn.Linear`, so `model(ids, labels=ids).loss` computes the chunked
`tt.ops.linear_cross_entropy` from the hidden states and never materialises the (8 x 256 x 8192) logits); HF:
`peft.get_peft_model(LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))`
+ `model(input_ids=ids, labels=ids).loss`. Gradient checkpointing: tinytune
`model.set_gradient_checkpointing(True)`; HF `gradient_checkpointing_enable(use_reentrant=False)` +
`enable_input_require_grads()`. bf16 rows: the same step under `torch.autocast("cpu", torch.bfloat16)`
(weights and adapters stay fp32).

Speed: all variants live in one process; after `--warmup` rounds, `--rounds` rounds run one step of
each variant in turn (the order rotates every round); tokens/s = 8 * 256 / median step time.
Peak memory: a fresh subprocess per variant (`--memory-runs` of them, interleaved; the median is kept)
loads the model, applies LoRA, resets the resident-set high-water mark (writes "5" to
/proc/self/clear_refs), runs 3 steps, and reports VmHWM minus the resident set before the first step:
the memory the training steps add on top of the loaded model (activations kept for backward, logits,
gradients, AdamW state, allocator slack).

`--device cuda` (issue 14): a ~1.2B-parameter Llama (`common.llama_1b_config`, random weights written once in
bf16 and loaded by both libraries in bf16 onto the GPU), batch 4 x 2048 (--quick: llama-30m, 2 x 256), the same
LoRA, AdamW and loss, bf16 autocast on CUDA (adapters fp32), with and without gradient checkpointing; tinytune's
kernels as `lora_linear` chooses them (Triton on CUDA when installed; TINYTUNE_KERNELS=torch forces the torch
path, recorded in the JSON). Step times by CUDA events; peak memory in the same process, each variant's
`torch.cuda.max_memory_allocated` above what was allocated before its 3 steps (fresh optimizer), so the loaded
weights of every variant are left out. Targets: >= 2x transformers + peft tokens/s at <= 0.5x its peak memory.

Writes `benchmarks/results/train_step_<device>.json` and its `.png` beside it (see benchmarks/common.py
for `--out`, `--quick`, `--threads`, `--device` and `--replot`).
Usage: python benchmarks/train_step.py [--quick] [--repeats N] [--memory-runs N] [--no-bf16] [--threads N]
       [--device cpu|cuda] [--out PATH] [--replot]
(`--memory-runs 0`: speed only.) Run it on an otherwise idle machine: the JSON records the load average before
and after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tinytune as tt  # noqa: E402
from charts import train_step_chart as chart  # noqa: E402
from common import (add_common_args, add_device_arg, cuda_peak, cuda_seconds, fill_defaults, gpu_info,  # noqa: E402
                    llama_1b_config, machine_info, median_run, on_device, output_path, print_table, random_ids,
                    replot, require_device, setup_threads, worker_env, write_cuda_checkpoint, write_results)
from tinytune.ops import PeakMemory, status_kib  # noqa: E402

RANK, ALPHA, DROPOUT, LR = 16, 32, 0.05, 1e-4
TARGETS = {"speed": 1.4, "memory": 0.6, "speed_gc": 1.25, "memory_gc": 0.6}
CUDA_TARGETS = {"speed": 2.0, "memory": 0.5, "speed_gc": 2.0, "memory_gc": 0.5}  # issue 14


def load_tinytune(ckpt: str, gc: bool, dtype=torch.float32, device: str = "cpu"):
    model, _ = tt.load_pretrained(ckpt, dtype=dtype, device=device)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=RANK, alpha=ALPHA, dropout=DROPOUT, targets="all-linear"))
    model.set_gradient_checkpointing(gc)
    return model.train()


def load_hf(ckpt: str, gc: bool, dtype=torch.float32, device: str = "cpu"):
    import peft
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear",
                          task_type="CAUSAL_LM")
    return peft.get_peft_model(model, cfg).train()


def tinytune_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss as `fit` computes it: the model's own (chunked from hidden states for a plain head)."""
    return model(ids, labels=ids).loss


def make_step(lib: str, model, ids: torch.Tensor, bf16: bool):
    """A closure running one training step; returns nothing (the loss is not synced early)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step():
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            if lib == "tinytune":
                loss = tinytune_loss(model, ids)
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def variants(bf16: bool) -> list[tuple[str, bool, bool]]:
    dtypes = [False, True] if bf16 else [False]
    return [(lib, gc, b) for b in dtypes for gc in (False, True) for lib in ("tinytune", "hf")]


def name(lib: str, gc: bool, bf16: bool) -> str:
    return f"{'tinytune' if lib == 'tinytune' else 'transformers+peft'} {'bf16' if bf16 else 'fp32'}" \
           f"{' +gc' if gc else ''}"


def worker(args) -> None:
    """In a fresh process: peak memory of 3 steps of one variant, as JSON on stdout."""
    lib, gc, bf16 = args.worker.split(",")
    gc, bf16 = gc == "1", bf16 == "1"
    model = (load_tinytune if lib == "tinytune" else load_hf)(args.ckpt, gc)
    step = make_step(lib, model, random_ids(args.batch, args.seq, args.vocab), bf16)
    with PeakMemory("cpu") as pm:
        for _ in range(3):
            step()
    print(json.dumps({"peak_bytes": pm.peak_bytes, "method": pm.method, "process_hwm_bytes": status_kib("VmHWM") * 1024}))


def measure_memory(args, ckpt: str, v) -> dict:
    cmd = [sys.executable, __file__, "--worker", f"{v[0]},{int(v[1])},{int(v[2])}", "--ckpt", ckpt,
           "--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=worker_env(args.threads)).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_memories(args, ckpt: str, vs) -> dict:
    """`--memory-runs` fresh-process measurements per variant, interleaved; the median run of each.

    One process's high-water mark varies by up to ~20% between runs (allocator arenas and timing of the
    threads), so a single run per variant is not enough to compare libraries.
    """
    runs = {v: [] for v in vs}
    for _ in range(args.memory_runs):
        for v in vs:
            runs[v].append(measure_memory(args, ckpt, v))
    return {v: median_run(runs[v]) for v in vs} if args.memory_runs else {}


def measure_speed(args, ckpt: str, vs) -> dict[str, list[float]]:
    ids = random_ids(args.batch, args.seq, args.vocab)
    steps = {}
    for v in vs:
        model = (load_tinytune if v[0] == "tinytune" else load_hf)(ckpt, v[1])
        steps[v] = make_step(v[0], model, ids, v[2])
    times = {v: [] for v in vs}
    for r in range(args.warmup + args.rounds):
        order = vs[r % len(vs):] + vs[:r % len(vs)]
        for v in order:
            start = time.perf_counter()
            steps[v]()
            if r >= args.warmup:
                times[v].append(time.perf_counter() - start)
    return times


def report(args, vs, times, memory) -> dict:
    rows = []
    for v in vs:
        med = statistics.median(times[v])
        rows.append({"variant": name(*v), "lib": v[0], "grad_checkpointing": v[1], "bf16": v[2],
                     "tokens_per_s": args.batch * args.seq / med, "median_step_s": med,
                     "step_s": times[v]})
        if memory:
            rows[-1] |= {k: memory[v][k] for k in ("peak_bytes", "peak_bytes_runs", "process_hwm_bytes")}
    by = {(r["lib"], r["grad_checkpointing"], r["bf16"]): r for r in rows}
    for r in rows:
        if r["lib"] == "tinytune":
            peer = by[("hf", r["grad_checkpointing"], r["bf16"])]
            r["speed_ratio"] = r["tokens_per_s"] / peer["tokens_per_s"]
            if memory:
                r["memory_ratio"] = r["peak_bytes"] / peer["peak_bytes"]
    return {"setup": {"preset": args.preset, "batch": args.batch, "seq_len": args.seq, "rank": RANK, "alpha": ALPHA,
                      "dropout": DROPOUT, "targets": "all-linear", "rounds": args.rounds, "warmup": args.warmup,
                      "memory_runs": args.memory_runs},
            "targets": TARGETS, "rows": rows}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, "--rounds", "timed rounds (default 5; --quick 2; quick: llama-tiny, batch 2 x 64)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; --quick 1)")
    p.add_argument("--memory-runs", type=int, default=None,
                   help="fresh processes per variant for peak memory, median (default 3; --quick 1; 0: none)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bf16 autocast rows")
    add_device_arg(p)
    for flag in ("--worker", "--ckpt", "--batch", "--seq", "--vocab"):  # internal: the memory subprocess
        p.add_argument(flag, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.replot:
        require_device(p, args.device)
    return args


def cuda_variants(bf16: bool) -> list[tuple[str, bool, bool]]:
    return [(lib, gc, bf16) for gc in (False, True) for lib in ("tinytune", "hf")]


def cuda_load(ckpt: str, v, dtype):
    return (load_tinytune if v[0] == "tinytune" else load_hf)(ckpt, v[1], dtype, "cuda")


def measure_cuda(args, ckpt: str, vs, dtype) -> tuple[dict, dict, int]:
    """Speed and peak memory of every variant on the GPU, in this process (all models loaded once), and the
    parameter count of tinytune's model (adapters included)."""
    ids = random_ids(args.batch, args.seq, args.vocab).cuda()
    models = {v: cuda_load(ckpt, v, dtype) for v in vs}
    params = sum(p.numel() for p in models[vs[0]].parameters())
    memory = {}
    for v in vs:  # a fresh optimizer: its state is part of what 3 steps add, as on the CPU
        step = make_step(v[0], models[v], ids, v[2])
        peak = cuda_peak(lambda: [step() for _ in range(3)])
        memory[v] = {"peak_bytes": peak["peak_bytes"], "peak_bytes_runs": [peak["peak_bytes"]],
                     "process_hwm_bytes": torch.cuda.max_memory_allocated()}
    steps = {v: make_step(v[0], models[v], ids, v[2]) for v in vs}
    times = {v: [] for v in vs}
    for r in range(args.warmup + args.rounds):
        for v in vs[r % len(vs):] + vs[:r % len(vs)]:
            seconds = cuda_seconds(steps[v])
            if r >= args.warmup:
                times[v].append(seconds)
    return times, memory, params


def cuda_main(args, out) -> None:
    """The `--device cuda` rows (module docstring)."""
    config = llama_1b_config()
    if args.quick:
        config = tt.models.preset_config("llama-30m")
    args.preset = "llama-30m" if args.quick else "llama-1b (random, Llama-3.2-1B shape)"
    args.batch, args.seq = (2, 256) if args.quick else (4, 2048)
    fill_defaults(args, dict(rounds=5, warmup=2, memory_runs=1), dict(rounds=2, warmup=1, memory_runs=1))
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    info = machine_info(args.threads, ("transformers", "peft")) | gpu_info()
    vs = cuda_variants(args.bf16)
    with tempfile.TemporaryDirectory() as ckpt:
        args.vocab = write_cuda_checkpoint(config, ckpt, dtype)
        times, memory, params = measure_cuda(args, ckpt, vs, dtype)
    info["load_avg_after"] = os.getloadavg()
    result = {"machine": info, **report(args, vs, times, memory)}
    result["setup"] |= {"device": "cuda", "weights_dtype": str(dtype).removeprefix("torch."),
                        "params": params, "kernels": os.environ.get("TINYTUNE_KERNELS", "auto"),
                        "memory_method": "in-process torch.cuda.max_memory_allocated above memory_allocated before"}
    result["targets"] = CUDA_TARGETS
    print_table(result)
    write_results(out, result, on_device(chart, "cuda"))


def main() -> None:
    args = parse_args()
    out = output_path(f"train_step_{args.device}", args.out, args.quick)
    if args.replot:
        return replot(out, on_device(chart, args.device))
    args.threads = setup_threads(args.threads)
    if args.device == "cuda":
        return cuda_main(args, out)
    if args.worker:
        args.batch, args.seq, args.vocab = int(args.batch), int(args.seq), int(args.vocab)
        return worker(args)
    args.preset, args.batch, args.seq = ("llama-tiny", 2, 64) if args.quick else ("llama-30m", 8, 256)
    fill_defaults(args, dict(rounds=5, warmup=2, memory_runs=3), dict(rounds=2, warmup=1, memory_runs=1))
    info = machine_info(args.threads, ("transformers", "peft"))
    with tempfile.TemporaryDirectory() as ckpt:
        model = tt.models.build(args.preset)
        args.vocab = model.config.vocab_size
        tt.save_pretrained(model, ckpt)
        del model
        vs = variants(args.bf16)
        memory = measure_memories(args, ckpt, vs)
        times = measure_speed(args, ckpt, vs)
    info["load_avg_after"] = os.getloadavg()
    result = {"machine": info, **report(args, vs, times, memory)}
    print_table(result)
    write_results(out, result, chart)


if __name__ == "__main__":
    main()
