"""benchmarks/shared_shrink.py: its quick mode writes every variant and a ratio per shape (committed results
untouched), (c) really shares, and the charts name the device a result was measured on."""
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))
import charts  # noqa: E402

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the rows would run")


def results_digest() -> dict:
    return {str(p.relative_to(RESULTS)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(RESULTS.rglob("*")) if p.is_file() and "quick" not in p.relative_to(RESULTS).parts}


@pytest.fixture
def run_main(monkeypatch):
    """Run the script's main() in this process with `args`; torch's thread count restored after."""
    threads = torch.get_num_threads()

    def run(*args: str) -> None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(sys, "argv", ["shared_shrink.py", *args])
        __import__("shared_shrink").main()

    yield run
    torch.set_num_threads(threads)


def test_quick_writes_variants_and_ratios(tmp_path, run_main):
    pytest.importorskip("matplotlib")
    before = results_digest()
    out = tmp_path / "shared_shrink_cpu.json"
    run_main("--quick", "--repeats", "1", "--threads", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["setup"]["device"] == "cpu" and result["machine"]["threads"] == 1 and result["rows"]
    for row in result["rows"]:
        assert set(row["ms"]) == set(row["saved_bytes"]) == {"a", "b", "c"}
        assert all(row[k] > 0 for k in ("b_over_a", "c_over_a", "c_over_b"))
        assert row["sharers"] == {"b": [], "c": [0, 1, 2]}  # "off" learns nothing; "on" shares all three
        assert row["max_abs_diff"] < 1e-4  # same adapters: same values up to the order of float sums
    assert results_digest() == before
    assert "CPU" in charts.shared_shrink_chart(result)["title"]


def test_titles_name_the_device():
    cuda = {"machine": {"gpu": "NVIDIA H200"}, "setup": {"device": "cuda"}}
    assert charts.device_name(cuda) == "CUDA (NVIDIA H200)"
    assert charts.device_name({"device": "cuda"}) == "CUDA"  # inference.py's field
    assert charts.device_name({"rows": [{"device": "cuda"}]}) == "CUDA"  # lora_linear.py's rows
    assert charts.device_name({"machine": {"gpu": "NVIDIA H200"}, "rows": []}) == "CPU"  # a CPU run on a GPU machine
    row = {"device": "cuda", "dtype": "bfloat16", "tokens": 8, "d": 4, "d_kv": 2, "rank": 1, "b_over_a": 1.1,
           "c_over_a": 1.0, "c_over_b": 0.9, "flop_floor": 1.2}
    assert charts.shared_shrink_chart({"rows": [row]})["title"].endswith("bfloat16, CUDA")


def test_lora_linear_chart_draws_the_triton_series_when_present():
    row = {"device": "cuda", "tokens": 8, "d_in": 4, "d_out": 4, "rank": 1, "dropout": 0.0, "c_over_a": 1.1,
           "b_over_a": 1.3, "flop_floor": 1.01}
    assert "(d) Triton lora_linear" not in charts.lora_linear_chart({"rows": [row]})["series"]
    spec = charts.lora_linear_chart({"rows": [row | {"d_over_a": 1.05}]})
    assert spec["series"]["(d) Triton lora_linear"] == [1.05] and spec["title"].endswith(", CUDA")


@NO_GPU
def test_device_cuda_is_refused_before_measuring(tmp_path, run_main, capsys):
    out = tmp_path / "x.json"
    with pytest.raises(SystemExit) as exit_info:
        run_main("--device", "cuda", "--quick", "--out", str(out))
    assert exit_info.value.code == 2 and "--device cuda: no CUDA device is available here" in capsys.readouterr().err
    assert not out.exists()
