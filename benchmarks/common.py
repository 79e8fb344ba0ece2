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
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUICK = RESULTS / "quick"  # git-ignored (benchmarks/.gitignore)
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
    """One line naming the machine and date of a result (older JSON spelled the thread count differently)."""
    threads = machine.get("threads", machine.get("torch_threads"))
    cores = f"{machine.get('cores', '?')} cores" + (f" ({threads} threads)" if threads else "")
    return f"{machine.get('cpu', 'unknown CPU')}, {cores}, torch {machine.get('torch', '?')}, {machine.get('date', '?')}"


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
    ax.invert_yaxis()
    ax.set_xlabel(chart["xlabel"])
    ax.set_ylabel(chart.get("ylabel", "variant"))
    ax.set_xlim(0, max([1.0] + [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]) * 1.2)
    ax.set_title(chart["title"], fontsize=10)
    ax.legend(fontsize=8, loc="best")
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
