"""What every benchmark script shares: its flags, the thread count, machine info, where results go, the
JSON writer, the picture, and the helpers several scripts used to import from one another.

Rules (each a plain function, tested in tests/test_bench_common.py):
  threads   `--threads N` wins; else OMP_NUM_THREADS (its first entry) when set; else torch's own count
            (`resolve_threads`); the count used is recorded as `machine["threads"]`.
  output    `--out PATH` always wins; without it a full run writes benchmarks/results/<name>.json and a
            `--quick` run benchmarks/results/quick/<name>.json, a git-ignored scratch folder, so a smoke
            test never touches the committed results (`output_path`).
  picture   `<name>.png` beside the JSON: horizontal bars of each variant's ratio against the script's
            baseline, a line at 1.0 (`ratio_chart`); matplotlib is optional and imported only here.
  device    `--device cpu` (the default: the committed CPU rows) or `--device cuda` (the GPU rows of issue 14),
            refused before anything is measured where torch sees no CUDA device (`check_device`); a CUDA run
            times with CUDA events (`cuda_seconds`), records `torch.cuda.max_memory_allocated` above what was
            allocated before (`cuda_peak`) and the card, driver, CUDA and Triton versions (`gpu_info`).

Re-draw the committed pictures from their JSON (nothing is re-measured):
    python benchmarks/common.py replot [NAME.json ...]
What each picture shows is in benchmarks/charts.py (one function per benchmark, reading the JSON alone).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUICK = RESULTS / "quick"  # git-ignored (benchmarks/.gitignore)
DEVICES = ("cpu", "cuda")
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")


def add_common_args(p: argparse.ArgumentParser, repeats: str | None = None, repeats_help: str = "") -> None:
    """Add the shared flags to `p`: --quick, --out, --threads, --replot and, when `repeats` names the script's
    own flag ("--rounds", "--reps"), `--repeats` as its alias (same destination, default None: filled in by
    `fill_defaults`)."""
    p.add_argument("--quick", action="store_true",
                   help="smoke test: the smallest settings; writes to benchmarks/results/quick/ unless --out")
    p.add_argument("--out", default=None,
                   help="JSON path (the picture goes beside it); default benchmarks/results/<name>.json, "
                        "with --quick benchmarks/results/quick/<name>.json")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: OMP_NUM_THREADS if set, else torch's default)")
    p.add_argument("--replot", action="store_true",
                   help="measure nothing: re-draw the picture from the JSON at the output path")
    if repeats:
        p.add_argument("--repeats", repeats, dest=repeats.lstrip("-").replace("-", "_"), type=int, default=None,
                       help=repeats_help or "timed repeats")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """Add `--device {cpu,cuda}` (default cpu) to `p`."""
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="cpu (default) or cuda: the GPU rows (refused where no CUDA device is available)")


def check_device(device: str, available=None) -> str:
    """`device` if it can run here. Raises ValueError naming it when it is not one of DEVICES, or when it is
    "cuda" and torch sees no CUDA device (`available()`, default `torch.cuda.is_available`)."""
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {list(DEVICES)}, got {device!r}")
    if device == "cuda" and not (available or torch.cuda.is_available)():
        raise ValueError(f"--device cuda: no CUDA device is available here (torch {torch.__version__}, built with "
                         f"CUDA {torch.version.cuda}; torch.cuda.is_available() is False); run the CPU rows with "
                         "--device cpu, or benchmarks/gpu_check.sh on a GPU machine")
    return device


def require_device(p: argparse.ArgumentParser, device: str) -> str:
    """`check_device(device)`, or exit 2 with its message as the usage error of `p` (nothing measured)."""
    try:
        return check_device(device)
    except ValueError as err:
        p.error(str(err))


def cuda_seconds(fn) -> float:
    """Seconds `fn()` takes on the GPU: CUDA events around it, the device synchronised before and after."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def cuda_peak(fn) -> dict:
    """GPU memory `fn()` adds at its peak: `torch.cuda.max_memory_allocated` minus what was allocated before
    (weights already loaded are not counted; what `fn` allocates and keeps, e.g. optimizer state, is)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return {"peak_bytes": torch.cuda.max_memory_allocated() - before, "allocated_before_bytes": before,
            "method": "torch.cuda.max_memory_allocated - memory_allocated before"}


def interleaved_rounds(steps: dict, reps: int, warmup: int, budget_s: float, device: str,
                       params=()) -> tuple[dict, int]:
    """Seconds of each timed call of each step ({key: [s]}), run interleaved (a, b, c, a, b, c, ...), and the
    number of timed rounds.

    `steps`: {key: a zero-argument callable, one forward + backward}. At least `reps` rounds after `warmup`
    rounds; cheap steps get more, up to `budget_s` seconds of rounds (at most 400), because their medians are
    the most sensitive to noise from other processes. CUDA steps are timed with CUDA events (`cuda_seconds`).
    The `.grad` of each of `params` is reset after every call.
    """
    times = {k: [] for k in steps}
    i = 0
    while True:
        for k, run in steps.items():
            if device == "cuda":
                times[k].append(cuda_seconds(run))
            else:
                t0 = time.perf_counter()
                run()
                times[k].append(time.perf_counter() - t0)
            for prm in params:
                prm.grad = None
        i += 1
        if i == warmup:
            per_round = sum(v[-1] for v in times.values())
            reps = max(reps, min(400, int(budget_s / per_round)))
            times = {k: [] for k in steps}
        if i >= warmup + reps:
            return times, reps


def gpu_info() -> dict:
    """The card and its software: name, capability, memory, driver (nvidia-smi), CUDA, cuDNN and Triton versions."""
    import importlib.util
    import subprocess
    props = torch.cuda.get_device_properties(0)
    info = {"gpu": props.name, "gpu_capability": f"{props.major}.{props.minor}", "gpu_memory_bytes": props.total_memory,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "triton": importlib.import_module("triton").__version__ if importlib.util.find_spec("triton") else None}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    return info


def on_device(chart_fn, device: str):
    """`chart_fn`, its title naming CUDA instead of CPU for a `--device cuda` result."""
    if device == "cpu":
        return chart_fn
    return lambda result: (lambda c: {**c, "title": c["title"].replace(", CPU", ", CUDA")})(chart_fn(result))


def llama_1b_config():
    """A ~1.2B-parameter Llama (the Llama-3.2-1B shape: d 2048, 16 layers, GQA 32/8, vocabulary 128256, tied head),
    for the CUDA rows; random weights."""
    from tinytune.models import ModelConfig
    return ModelConfig(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                       num_heads=32, num_kv_heads=8, max_position_embeddings=4096, rope_theta=500000.0,
                       tie_word_embeddings=True)


def write_cuda_checkpoint(config, path: str, dtype=torch.bfloat16) -> int:
    """Write a randomly initialised model of `config` to `path`, built on the GPU (seeded; fast for 1B); returns
    its vocabulary size."""
    import tinytune as tt
    with torch.device("cuda"):
        model = tt.models.build(config, dtype=dtype, device="cuda")
    tt.save_pretrained(model, path)
    del model
    torch.cuda.empty_cache()
    return config.vocab_size


def fill_defaults(args: argparse.Namespace, full: dict, quick: dict) -> None:
    """Set every attribute of `args` that is None from `quick` (with --quick) or `full`; given flags win."""
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def resolve_threads(requested: int | None, environ=os.environ) -> int:
    """The thread count to use: `requested` if given, else OMP_NUM_THREADS's first entry, else torch's.

    Raises ValueError naming the value when `requested` or OMP_NUM_THREADS is not a positive integer."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be a positive integer, got {requested}")
        return requested
    env = environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        first = env.split(",")[0].strip()  # OpenMP allows a nested list "4,2": the outer level
        if not first.isdigit() or int(first) < 1:
            raise ValueError(f"OMP_NUM_THREADS must be a positive integer (or a list of them), got {env!r}")
        return int(first)
    return torch.get_num_threads()


def setup_threads(requested: int | None) -> int:
    """Apply `resolve_threads(requested)` to torch and return the count."""
    threads = resolve_threads(requested)
    torch.set_num_threads(threads)
    return threads


def worker_env(threads: int, **extra: str) -> dict:
    """The environment for a measuring subprocess: this one's, with OMP_NUM_THREADS = `threads`."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), **extra}


def output_path(name: str, out: str | os.PathLike | None, quick: bool, results: Path = RESULTS) -> Path:
    """Where the JSON goes: `out` if given; else `results`/quick/<name>.json for a quick run, else
    `results`/<name>.json."""
    if out:
        return Path(out)
    return (results / "quick" if quick else results) / f"{name}.json"


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it is not readable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_info(threads: int, libs: tuple[str, ...] = ()) -> dict:
    """The machine and software a run measured on: CPU model and flags, cores, the threads used, versions
    (torch, Python and each of `libs`, imported here), the date and the load average now."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = cpu_flags()
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "avx512_flags": sorted(f for f in flags if f.startswith("avx512")),
            "bf16_flags": sorted(f for f in flags if "bf16" in f), "amx_flags": sorted(f for f in flags if "amx" in f),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "load_avg_before": os.getloadavg()}
    for lib in libs:
        info[lib] = importlib.import_module(lib).__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def caption(machine: dict) -> str:
    """One line naming the machine (with the card for a CUDA result) and date of a result (older JSON spelled
    the thread count differently)."""
    threads = machine.get("threads", machine.get("torch_threads"))
    cores = f"{machine.get('cores', '?')} cores" + (f" ({threads} threads)" if threads else "")
    host = f"{machine.get('cpu', 'unknown CPU')}, {cores}"
    if machine.get("gpu"):  # a --device cuda result: the card and its software first (gpu_info)
        host = (f"{machine['gpu']} (driver {machine.get('driver') or '?'}, CUDA {machine.get('cuda') or '?'}, "
                f"Triton {machine.get('triton') or 'none'}), host {host}")
    return f"{host}, torch {machine.get('torch', '?')}, {machine.get('date', '?')}"


def ratio_chart(chart: dict, machine: dict, path: Path) -> Path:
    """Draw `chart` as a PNG at `path`: per category, one horizontal bar per series, a line at 1.0.

    `chart`: {"title", "xlabel", "baseline" (what 1.0 is), "categories": [str], "series": {name: [ratio or
    None]}, optional "note"}. Raises ImportError when matplotlib is missing."""
    from matplotlib.figure import Figure  # optional dependency, imported only to draw

    cats, series = chart["categories"], chart["series"]
    height = 0.8 / len(series)
    fig = Figure(figsize=(8, 1.6 + 0.32 * len(cats) * len(series) + 0.2 * len(cats)))
    ax = fig.subplots()
    for s, (label, values) in enumerate(series.items()):
        ys = [i - 0.4 + height * (s + 0.5) for i in range(len(cats))]
        shown = [(y, v) for y, v in zip(ys, values) if v is not None and math.isfinite(v)]
        if not shown:
            continue
        bars = ax.barh([y for y, _ in shown], [v for _, v in shown], height=height * 0.9, label=label,
                       color=COLOURS[s % len(COLOURS)])
        ax.bar_label(bars, labels=[f"{v:.2f}x" for _, v in shown], padding=3, fontsize=8)
    ax.axvline(1.0, color="black", linewidth=1, linestyle="--", label=f"1.0 = {chart['baseline']}")
    ax.set_yticks(range(len(cats)), cats)
    # room above the first category for the legend, which would otherwise cover the top bars' labels
    ax.set_ylim(len(cats) - 0.5, -0.6 - 0.22 * (len(series) + 1))
    ax.set_xlabel(chart["xlabel"])
    ax.set_ylabel(chart.get("ylabel", "variant"))
    ax.set_xlim(0, max([1.0] + [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]) * 1.2)
    ax.set_title(chart["title"], fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.text(0.01, 0.01, caption(machine) + (f"; {chart['note']}" if chart.get("note") else ""), fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    return path


def draw(chart: dict, machine: dict, json_path: Path) -> Path | None:
    """The picture beside `json_path` (same name, .png); without matplotlib, say so and return None."""
    png = Path(json_path).with_suffix(".png")
    try:
        ratio_chart(chart, machine, png)
    except ImportError:
        print(f"results are in {json_path}; matplotlib is missing, so no picture was drawn "
              "(pip install matplotlib, then rerun with --replot)")
        return None
    print(f"drew {png}")
    return png


def write_results(out: Path, result: dict, chart_fn) -> Path | None:
    """Write `result` as JSON at `out` (folders created), then its picture `chart_fn(result)` beside it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return draw(chart_fn(result), result.get("machine", {}), out)


def replot(json_path: Path, chart_fn) -> Path | None:
    """Re-draw the picture of the JSON at `json_path` with `chart_fn` (nothing is measured)."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"--replot: no results at {json_path} (run the benchmark first, or pass --out)")
    result = json.loads(json_path.read_text())
    return draw(chart_fn(result), result.get("machine", {}), json_path)


def chart_for(json_path: Path):
    """The chart function (benchmarks/charts.py) of the result at `json_path`, by its name
    <benchmark>_<cpu|cuda>.json."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from charts import CHARTS
    stem = Path(json_path).stem.rsplit("_", 1)[0]
    if stem not in CHARTS:
        raise ValueError(f"{json_path}: no benchmark writes {stem!r}_<cpu|cuda>.json; expected one of {sorted(CHARTS)}")
    return CHARTS[stem]


def random_ids(batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(batch_size, seq_len) random token ids in [0, vocab), seeded."""
    return torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))


def write_checkpoint(preset: str, path: str) -> int:
    """Write a randomly initialised `preset` to `path` (seeded); returns its vocabulary size."""
    import tinytune as tt
    torch.manual_seed(0)
    model = tt.models.build(preset)
    tt.save_pretrained(model, path)
    return model.config.vocab_size


def peak_of_three(step) -> dict:
    """Peak resident memory above the current set while `step()` runs 3 times, and the process high-water mark."""
    from tinytune.ops import PeakMemory, status_kib
    with PeakMemory("cpu") as pm:
        for _ in range(3):
            step()
    return {"peak_bytes": pm.peak_bytes, "method": pm.method, "process_hwm_bytes": status_kib("VmHWM") * 1024}


def median_run(runs: list[dict]) -> dict:
    """The median of several memory runs by peak_bytes, with every run's peak_bytes listed."""
    ordered = sorted(runs, key=lambda m: m["peak_bytes"])
    return {**ordered[len(ordered) // 2], "peak_bytes_runs": [m["peak_bytes"] for m in runs]}


def print_table(result: dict, first_loss: bool = False) -> None:
    """The rows of `result` (train_step / preference) as a plain-text table, with each row's first loss
    when asked."""
    extra = f" {'first loss':>11}" if first_loss else ""
    print(f"{'variant':<30} {'tokens/s':>9} {'step s':>7} {'peak MiB':>9} {'speed x':>8} {'memory x':>9}{extra}")
    for r in result["rows"]:
        sx = f"{r['speed_ratio']:>8.2f}" if "speed_ratio" in r else f"{'':>8}"
        mx = f"{r['memory_ratio']:>9.2f}" if "memory_ratio" in r else f"{'':>9}"
        peak = f"{r['peak_bytes'] / 2**20:>9,.0f}" if "peak_bytes" in r else f"{'-':>9}"
        loss = f" {r['first_loss']:>11.6f}" if first_loss else ""
        print(f"{r['variant']:<30} {r['tokens_per_s']:>9,.0f} {r['median_step_s']:>7.3f} {peak} {sx} {mx}{loss}")


def main(argv: list[str] | None = None) -> None:
    """`replot [NAME.json ...]`: re-draw the pictures of the given (default: every committed) result."""
    p = argparse.ArgumentParser(description="Re-draw benchmark pictures from their JSON (measures nothing).")
    p.add_argument("command", choices=["replot"])
    p.add_argument("paths", nargs="*", help="result JSON files (default: benchmarks/results/*.json)")
    args = p.parse_args(argv)
    for path in [Path(x) for x in args.paths] or sorted(RESULTS.glob("*.json")):
        replot(path, chart_for(path))


if __name__ == "__main__":
    main()
