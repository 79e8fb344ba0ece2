"""Benchmark: prefill and decode throughput of tinytune against `transformers`, and load memory.

One random checkpoint (the `llama-30m` preset, written with `tinytune.models.save_pretrained`)
is loaded by both libraries in fp32. For batch 1 and 8, a 128-token random prompt, 64 new tokens,
greedy, no EOS stopping (tinytune: `eos_token_id=[]`; HF: `min_new_tokens=max_new_tokens`):
  prefill  one forward over the prompt into a fresh cache, last-position logits only
           (tinytune: `model(ids, cache=new_cache, logits_to_keep=1)`;
            HF: `model(ids, use_cache=True, logits_to_keep=1)`); tokens/s = B * prompt / time.
  decode   the library's own `generate` end to end, minus the prefill time measured in the
           same process: what remains is the 63 single-token forwards plus each library's
           per-token sampling and bookkeeping; tokens/s = B * new / (generate - prefill).
Runs are interleaved (tinytune, HF, HF, tinytune, ...: the first alternates) after a warmup round;
medians reported.
Ratios are tinytune / HF throughput (> 1: tinytune faster). Targets: decode >= 1.3x at batch 1,
>= 1.0x at batch 8; prefill >= 1.0x.

Load memory: in a fresh subprocess per library, a tiny checkpoint is loaded first (so one-time
lazy imports and allocator set-up are not counted), then peak resident memory (VmHWM from
/proc/self/status, which counts mapped file pages too) is read before loading the benchmark
checkpoint and again after loading it and touching every weight (fp32 weights may stay
memory-mapped and be paged in on first use); the increase is compared with the checkpoint's size
on disk. "Loading adds no more than one copy of the weights" means a ratio near 1.

`--device cuda` (issue 14): the same prefill and decode measurements on the GPU for a ~1.2B-parameter Llama
(`common.llama_1b_config`, random weights, bf16 for both libraries; --quick: llama-30m), tinytune's plain layout
only (the decode layout is a CPU optimisation), 5 timed rounds, every time taken with CUDA events. Greedy agreement
is recorded, not required (bf16 rounding may flip a near tie between the libraries); load memory is not measured
there (it is a CPU resident-set measurement).

Writes `benchmarks/results/inference_<device>.json` and its `.png` beside it (see benchmarks/common.py for
`--out`, `--quick`, `--threads`, `--device` and `--replot`).
Usage: python benchmarks/inference.py [--quick] [--repeats N] [--threads N] [--device cpu|cuda] [--out PATH]
       [--replot]
(The machine should be otherwise idle: with all cores busy elsewhere, OpenMP stalls swamp the
measurement; the JSON records the load average before and after, and each runner's spread.)
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
from charts import inference_chart as chart  # noqa: E402
from common import (add_common_args, add_device_arg, cuda_seconds, gpu_info, llama_1b_config,  # noqa: E402
                    machine_info, on_device, output_path, replot, require_device, setup_threads, worker_env,
                    write_cuda_checkpoint, write_results)
from tinytune.models import build, load_model, preset_config as build_config, save_pretrained  # noqa: E402
from tinytune.models.generate import generate  # noqa: E402

PROMPT, NEW = 128, 64
BATCHES = (1, 8)
TARGETS = {("decode", 1): 1.3, ("decode", 8): 1.0, ("prefill", 1): 1.0, ("prefill", 8): 1.0}


def _timed(fn, device: str = "cpu") -> float:
    if device == "cuda":
        return cuda_seconds(fn)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


OURS = ("tinytune", "tinytune decode-layout")  # the second: model.set_decode_layout() (column-major wide linears)
LIBS = OURS + ("hf",)


def _runners(models: dict, ids, new: int) -> dict:
    """name -> zero-argument callable, for each (library, measurement)."""
    batch = ids.shape[0]
    runners = {}
    for lib in (k for k in models if k != "hf"):
        model = models[lib]
        runners[f"{lib} prefill"] = lambda m=model: m(ids, cache=m.new_cache(batch, ids.shape[1] + new), logits_to_keep=1)
        runners[f"{lib} generate"] = lambda m=model: generate(m, ids, max_new_tokens=new, eos_token_id=[])
    hf = models["hf"]
    runners["hf prefill"] = lambda: hf(ids, use_cache=True, logits_to_keep=1)
    runners["hf generate"] = lambda: hf.generate(ids, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    return runners


def bench_batch(models: dict, batch: int, prompt: int, new: int, reps: int) -> dict:
    """Median seconds of every runner, interleaved across libraries, plus derived throughputs."""
    vocab = models["hf"].config.vocab_size
    device = models["hf"].device.type
    libs, ours = tuple(models), tuple(k for k in models if k != "hf")  # the CPU run: LIBS and OURS
    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(batch)).to(device)
    runners = _runners(models, ids, new)
    times = {name: [] for name in runners}
    with torch.inference_mode():
        for name, fn in runners.items():  # warmup
            fn()
        for rep in range(reps):
            # Rotate which library goes first: the one that runs later inherits the allocator and
            # cache state of the earlier ones, a bias that should not favour any of them.
            order = libs[rep % len(libs):] + libs[:rep % len(libs)]
            for kind in ("prefill", "generate"):
                for lib in order:
                    name = f"{lib} {kind}"
                    times[name].append(_timed(runners[name], device))
    med = {name: statistics.median(t) for name, t in times.items()}
    # Spread of each runner (interquartile range / median): a check on how noisy the machine was.
    spread = {name: (statistics.quantiles(t, n=4)[2] - statistics.quantiles(t, n=4)[0]) / med[name]
              for name, t in times.items() if len(t) >= 2}
    row = {"batch": batch, "prompt": prompt, "new_tokens": new, "reps": reps, "median_s": med,
           "iqr_over_median": spread, "all_s": times}
    for lib in libs:
        row[f"{lib} prefill tok/s"] = batch * prompt / med[f"{lib} prefill"]
        row[f"{lib} decode tok/s"] = batch * new / (med[f"{lib} generate"] - med[f"{lib} prefill"])
    for lib in ours:
        for kind in ("prefill", "decode"):
            ratio = row[f"{lib} {kind} tok/s"] / row[f"hf {kind} tok/s"]
            row[f"{lib} {kind} ratio"] = ratio
            row[f"{lib} {kind} met"] = ratio >= TARGETS[(kind, batch)]
    for kind in ("prefill", "decode"):
        row[f"{kind} target"] = TARGETS[(kind, batch)]
    return row


def check_greedy_agreement(ours, hf, prompt: int, new: int) -> bool:
    """Both libraries produce the same greedy tokens on the benchmark checkpoint (a sanity check)."""
    ids = torch.randint(0, ours.config.vocab_size, (2, prompt), generator=torch.Generator().manual_seed(0))
    ids = ids.to(hf.device)
    with torch.inference_mode():
        a = generate(ours, ids, max_new_tokens=new, eos_token_id=[])
        b = hf.generate(ids, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    return bool(torch.equal(a, b))


_MEMORY_PROBE = r"""
import json, sys, torch
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
lib, path, warmup_path = sys.argv[1:4]
if lib == "tinytune":
    from tinytune.models import load_model as load
else:
    from transformers import AutoModelForCausalLM
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
load(warmup_path)  # a tiny checkpoint first: one-time lazy imports and allocator set-up are not counted
before = hwm()
model = load(path)
with torch.no_grad():  # weights may be memory-mapped and paged in lazily: touch every one
    sum(float(p.sum()) for p in model.parameters())
print(json.dumps({"before": before, "after": hwm()}))
"""


def measure_load_memory(path: Path, warmup_path: Path, threads: int) -> dict:
    """Peak-RSS increase of loading the checkpoint and touching every weight, per library, each in a
    fresh subprocess."""
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    out = {"checkpoint_bytes": size}
    env = worker_env(threads, PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error", HF_HUB_DISABLE_PROGRESS_BARS="1")
    for lib in ("tinytune", "hf"):
        proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, lib, str(path), str(warmup_path)],
                              capture_output=True, text=True, env=env, check=True)
        probe = json.loads(proc.stdout.strip().splitlines()[-1])
        added = probe["after"] - probe["before"]
        out[lib] = {"peak_rss_added_bytes": added, "ratio_to_checkpoint": added / size}
    return out


def print_table(rows: list[dict], memory: dict | None) -> None:
    print(f"{'batch':>5} {'phase':>8} {'variant':>24} {'tok/s':>9} {'HF tok/s':>9} {'ratio':>6} {'target':>6}  met")
    for row in rows:
        for kind in ("prefill", "decode"):
            for lib in (lib for lib in OURS if f"{lib} {kind} ratio" in row):
                print(f"{row['batch']:>5} {kind:>8} {lib:>24} {row[f'{lib} {kind} tok/s']:>9.1f} "
                      f"{row[f'hf {kind} tok/s']:>9.1f} {row[f'{lib} {kind} ratio']:>5.2f}x "
                      f"{row[f'{kind} target']:>5.1f}x  {'yes' if row[f'{lib} {kind} met'] else 'NO'}")
    if memory is None:
        return
    size = memory["checkpoint_bytes"]
    print(f"load: checkpoint {size / 2**20:.1f} MiB; peak RSS added: " + ", ".join(
        f"{lib} {memory[lib]['peak_rss_added_bytes'] / 2**20:.1f} MiB ({memory[lib]['ratio_to_checkpoint']:.2f}x)"
        for lib in ("tinytune", "hf")))


def cuda_main(args, out: Path, threads: int) -> None:
    """The `--device cuda` rows (module docstring): tinytune against transformers, bf16 on the GPU."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    info = machine_info(threads, ("transformers",)) | gpu_info()
    config = build_config("llama-30m") if args.quick else llama_1b_config()
    preset = "llama-30m" if args.quick else "llama-1b (random, Llama-3.2-1B shape)"
    prompt, new, reps = (16, 8, 2) if args.quick else (PROMPT, NEW, 5)
    reps = args.reps or reps
    with tempfile.TemporaryDirectory() as tmp:
        write_cuda_checkpoint(config, tmp)
        ours = load_model(tmp, dtype=torch.bfloat16, device="cuda")
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16).to("cuda").eval()
        agree = check_greedy_agreement(ours, hf, prompt, new)
        rows = [bench_batch({"tinytune": ours, "hf": hf}, b, prompt, new, reps) for b in BATCHES]
    print(f"{preset}, bf16 on {info['gpu']}, prompt {prompt}, {new} new tokens greedy, median of {reps}; "
          f"greedy tokens agree: {agree}")
    print_table(rows, None)
    result = {"benchmark": "inference", "preset": preset, "dtype": "bfloat16", "device": "cuda", "method": __doc__,
              "greedy_tokens_agree": agree, "machine": dict(info, load_avg_after=os.getloadavg()), "rows": rows,
              "load_memory": None}
    write_results(out, result, on_device(chart, "cuda"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, "--reps", "timed rounds (default 9; --quick 2; quick: llama-tiny, 16 + 8 tokens)")
    add_device_arg(parser)
    args = parser.parse_args()
    out = output_path(f"inference_{args.device}", args.out, args.quick)
    if args.replot:
        return replot(out, on_device(chart, args.device))
    require_device(parser, args.device)
    threads = setup_threads(args.threads)
    if args.device == "cuda":
        return cuda_main(args, out, threads)
    info = machine_info(threads, ("transformers",))
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    preset, prompt, new, reps = ("llama-tiny", 16, 8, 2) if args.quick else ("llama-30m", PROMPT, NEW, 9)
    reps = args.reps or reps
    with tempfile.TemporaryDirectory() as tmp:
        path, warmup_path = Path(tmp) / preset, Path(tmp) / "warmup"
        save_pretrained(build(preset), path)
        save_pretrained(build("llama-tiny"), warmup_path)
        ours = load_model(path)
        laid_out = load_model(path)
        laid_out.set_decode_layout()
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        agree = check_greedy_agreement(ours, hf, prompt, new) and check_greedy_agreement(laid_out, hf, prompt, new)
        models = {"tinytune": ours, "tinytune decode-layout": laid_out, "hf": hf}
        rows = [bench_batch(models, b, prompt, new, reps) for b in BATCHES]
        memory = measure_load_memory(path, warmup_path, threads)
    print(f"{preset}, fp32, prompt {prompt}, {new} new tokens greedy, median of {reps}; greedy tokens agree: {agree}")
    print_table(rows, memory)
    result = {"benchmark": "inference", "preset": preset, "dtype": "float32", "method": __doc__,
              "greedy_tokens_agree": agree,
              "machine": dict(info, load_avg_after=os.getloadavg()), "rows": rows, "load_memory": memory}
    write_results(out, result, chart)


if __name__ == "__main__":
    main()
