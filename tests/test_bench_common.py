"""benchmarks/common.py and charts.py: the thread and output-path rules, the picture, the replot of committed
results, and the cheapest scripts' quick modes (JSON + PNG where asked, committed results untouched)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCH / "results"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

sys.path.insert(0, str(BENCH))
import common  # noqa: E402
from charts import CHARTS  # noqa: E402


def results_digest() -> dict:
    """{relative path: sha256} of every committed result file (the git-ignored quick/ folder left out)."""
    return {str(p.relative_to(RESULTS)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(RESULTS.rglob("*")) if p.is_file() and "quick" not in p.relative_to(RESULTS).parts}


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def run_script(name: str, *args: str, omp: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run benchmarks/<name>.py with `args` (OMP_NUM_THREADS = `omp`, or unset); fails with its stderr."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    done = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def check_written(out: Path) -> dict:
    """The JSON at `out` parses and a valid PNG lies beside it; returns the JSON."""
    assert is_png(out.with_suffix(".png")), f"no PNG beside {out}"
    return json.loads(out.read_text())


# --- the rules, as plain functions ---------------------------------------------------------------------------

def test_threads_flag_wins_over_environment():
    assert common.resolve_threads(3, {"OMP_NUM_THREADS": "1"}) == 3


def test_threads_follow_omp_num_threads():
    assert common.resolve_threads(None, {"OMP_NUM_THREADS": "5"}) == 5
    assert common.resolve_threads(None, {"OMP_NUM_THREADS": " 4,2 "}) == 4  # nested list: the outer level


def test_threads_default_is_torchs():
    assert common.resolve_threads(None, {}) == torch.get_num_threads()
    assert common.resolve_threads(None, {"OMP_NUM_THREADS": ""}) == torch.get_num_threads()


@pytest.mark.parametrize("requested, env, match", [(0, {}, "--threads must be a positive integer, got 0"),
                                                   (None, {"OMP_NUM_THREADS": "many"}, "OMP_NUM_THREADS.*'many'"),
                                                   (None, {"OMP_NUM_THREADS": "0"}, "OMP_NUM_THREADS.*'0'")])
def test_threads_reject_bad_values(requested, env, match):
    with pytest.raises(ValueError, match=match):
        common.resolve_threads(requested, env)


def test_output_path_rule(tmp_path):
    assert common.output_path("x_cpu", tmp_path / "a.json", quick=True) == tmp_path / "a.json"  # --out wins
    assert common.output_path("x_cpu", str(tmp_path / "b.json"), quick=False) == tmp_path / "b.json"
    assert common.output_path("x_cpu", None, quick=False, results=tmp_path) == tmp_path / "x_cpu.json"
    assert common.output_path("x_cpu", None, quick=True, results=tmp_path) == tmp_path / "quick" / "x_cpu.json"
    assert common.output_path("x_cpu", None, quick=True) == RESULTS / "quick" / "x_cpu.json"


def test_quick_folder_is_git_ignored():
    done = subprocess.run(["git", "check-ignore", "-q", str(RESULTS / "quick" / "x_cpu.json")], cwd=BENCH)
    assert done.returncode == 0  # 1: not ignored


def test_fill_defaults_keeps_given_flags():
    import argparse
    args = argparse.Namespace(quick=True, rounds=None, warmup=0)
    common.fill_defaults(args, {"rounds": 5, "warmup": 2}, {"rounds": 2, "warmup": 1})
    assert (args.rounds, args.warmup) == (2, 0)


# --- pictures ------------------------------------------------------------------------------------------------

CHART = {"title": "t", "xlabel": "x", "baseline": "b", "categories": ["one", "two"],
         "series": {"s": [1.5, None], "u": [0.5, float("nan")]}}


def test_ratio_chart_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = common.ratio_chart(CHART, {"cpu": "test CPU", "date": "2026-01-01"}, tmp_path / "sub" / "c.png")
    assert is_png(png)


def test_without_matplotlib_the_json_stays_and_the_message_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "r.json"
    assert common.write_results(out, {"machine": {}, "rows": []}, lambda r: CHART) is None
    assert json.loads(out.read_text()) == {"machine": {}, "rows": []}
    assert not out.with_suffix(".png").exists()
    said = capsys.readouterr().out
    assert str(out) in said and "matplotlib is missing" in said


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_replot_of_committed_results(path, tmp_path):
    """Every committed result has a chart, drawn from its JSON alone (copied: the committed PNG is not touched)."""
    pytest.importorskip("matplotlib")
    assert is_png(path.with_suffix(".png")), f"{path.name} has no committed picture"
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    before = results_digest()
    common.main(["replot", str(copy)])
    assert is_png(copy.with_suffix(".png")) and results_digest() == before
    chart = common.chart_for(copy)(json.loads(copy.read_text()))
    assert chart["categories"] and all(len(v) == len(chart["categories"]) for v in chart["series"].values())


def test_chart_for_unknown_name():
    with pytest.raises(ValueError, match="'nothing'.*expected one of"):
        common.chart_for(Path("nothing_cpu.json"))


def test_every_chart_is_registered():
    assert set(CHARTS) == {"compile", "inference", "lora_linear", "methods", "preference", "rl_step", "shared_shrink",
                           "train_step"}


# --- the scripts' quick modes --------------------------------------------------------------------------------

LORA_QUICK = ["--quick", "--repeats", "1"]


@pytest.fixture
def in_process(monkeypatch):
    """Run a script's main() in this process (torch is imported already: a subprocess would spend most of its
    time importing it again), with the given argv and OMP_NUM_THREADS; torch's thread count restored after."""
    threads = torch.get_num_threads()

    def run(name: str, *args: str, omp: str | None = None) -> None:
        if omp is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", omp)
        monkeypatch.setattr(sys, "argv", [f"{name}.py", *args])
        __import__(name).main()

    yield run
    torch.set_num_threads(threads)


def test_lora_linear_quick_out_and_omp_threads(tmp_path, in_process):
    pytest.importorskip("matplotlib")
    before = results_digest()
    out = tmp_path / "x.json"
    in_process("lora_linear", *LORA_QUICK, "--out", str(out), omp="1")
    result = check_written(out)
    assert result["machine"]["threads"] == 1 and result["rows"] and result["qkv_memory"]
    assert results_digest() == before


def test_lora_linear_quick_without_out_writes_scratch_only(in_process, capsys):
    pytest.importorskip("matplotlib")
    before = results_digest()
    scratch = RESULTS / "quick" / "lora_linear_cpu.json"
    scratch.unlink(missing_ok=True)
    in_process("lora_linear", *LORA_QUICK, "--threads", "2", omp="1")  # the flag wins over the variable
    assert str(scratch) in capsys.readouterr().out
    assert check_written(scratch)["machine"]["threads"] == 2
    assert results_digest() == before


def test_lora_linear_replot_flag_measures_nothing(tmp_path, in_process, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "lora_linear_cpu.json"
    shutil.copy(RESULTS / "lora_linear_cpu.json", out)
    in_process("lora_linear", "--replot", "--out", str(out))
    assert is_png(out.with_suffix(".png")) and "wrote" not in capsys.readouterr().out
    assert out.read_bytes() == (RESULTS / "lora_linear_cpu.json").read_bytes()


@pytest.mark.slow  # two fresh processes import transformers to measure load memory: ~2 minutes on busy cores
def test_inference_quick(tmp_path):
    pytest.importorskip("transformers")
    before = results_digest()
    out = tmp_path / "x.json"
    run_script("inference", "--quick", "--repeats", "1", "--threads", "1", "--out", str(out))
    result = check_written(out)
    assert result["machine"]["threads"] == 1 and result["greedy_tokens_agree"] is True
    assert [r["batch"] for r in result["rows"]] == [1, 8] and results_digest() == before


SLOW_QUICK = {  # each a minute or more on 2 busy cores (compiles, or many fresh processes importing TRL)
    "bench_compile": ["--quick", "--repeats", "1", "--warmup", "0"],
    "train_step": ["--quick", "--repeats", "1", "--warmup", "0", "--memory-runs", "0", "--no-bf16"],
    "preference": ["--quick", "--repeats", "1", "--warmup", "0", "--memory-runs", "1"],
    "methods": ["--quick", "--steps", "3"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_QUICK))
def test_slow_quick_modes(name, tmp_path):
    before = results_digest()
    out = tmp_path / "x.json"
    run_script(name, *SLOW_QUICK[name], "--out", str(out), omp="1", timeout=900)
    result = check_written(out)
    assert result["machine"]["threads"] == 1 and result["rows"]
    assert results_digest() == before


def test_docs_show_every_committed_picture():
    import re
    page = (BENCH.parent / "docs" / "benchmarks.md").read_text()
    linked = set(re.findall(r"!\[[^\]]*\]\(\.\./benchmarks/results/([\w.]+\.png)\)", page))
    assert linked == {p.with_suffix(".png").name for p in RESULTS.glob("*.json")}
    assert all(is_png(RESULTS / name) for name in linked) and ".svg" not in page


def test_caption_names_the_card_of_a_cuda_result():
    cpu = {"cpu": "AMD EPYC", "cores": 2, "threads": 2, "torch": "2.13.0", "date": "2026-12-01"}
    assert common.caption(cpu) == "AMD EPYC, 2 cores (2 threads), torch 2.13.0, 2026-12-01"
    cuda = common.caption({**cpu, "gpu": "NVIDIA H200", "driver": "570.1", "cuda": "12.8", "triton": "3.4.0"})
    assert cuda.startswith("NVIDIA H200 (driver 570.1, CUDA 12.8, Triton 3.4.0), host AMD EPYC")
