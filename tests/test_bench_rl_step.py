"""Smoke test of benchmarks/rl_step.py: its smallest mode runs both parts end to end and writes a sane JSON."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rl_step.py"
SMALL = ["--quick", "--rounds", "1", "--warmup", "0", "--prompts", "1", "--group-size", "2", "--prompt-len", "4",
         "--new-tokens", "4"]


def run(tmp_path, *extra) -> dict:
    pytest.importorskip("trl")
    out = tmp_path / "rl_step.json"
    subprocess.run([sys.executable, str(SCRIPT), *SMALL, *extra, "--out", str(out)], check=True,
                   capture_output=True, text=True, timeout=600)
    assert out.with_suffix(".svg").read_text().startswith("<svg")
    return json.loads(out.read_text())


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_speed(result: dict) -> None:
    assert set(result) >= {"machine", "setup", "targets", "rows"}
    rows = {(r["lib"], r["part"]): r for r in result["rows"]}
    assert set(rows) == {("tinytune", "rollout"), ("hf", "rollout"), ("tinytune", "grpo"), ("trl", "grpo")}
    for r in rows.values():
        assert positive(r["tokens_per_s"]) and positive(r["median_s"]) and len(r["call_s"]) == 1
    assert rows["tinytune", "rollout"]["tokens"] == 2 * 4 and rows["tinytune", "grpo"]["tokens"] == 2 * (4 + 4)
    for lib in ("tinytune", "hf"):
        assert rows[lib, "rollout"]["completion_lengths_seen"] == [4]  # no early stop on either side
    for lib in ("tinytune", "trl"):
        assert rows[lib, "grpo"]["completion_length_mean"] == 4 and math.isfinite(rows[lib, "grpo"]["first_loss"])
    phases = rows["tinytune", "grpo"]["phases_median_s"]
    assert set(phases) == {"generation_s", "scoring_s", "update_s"} and all(v >= 0 for v in phases.values())
    for part in ("rollout", "grpo"):
        assert positive(rows["tinytune", part]["speed_ratio"])
    assert result["machine"]["logit_max_abs_diff"] < 1e-4  # the same weights and adapter on both sides


def test_quick_speed_only(tmp_path):
    check_speed(run(tmp_path, "--memory-runs", "0"))


@pytest.mark.slow  # 4 fresh processes importing transformers / TRL: over a minute on 2 busy cores
def test_quick_with_memory(tmp_path):
    result = run(tmp_path, "--memory-runs", "1")
    check_speed(result)
    for r in result["rows"]:
        assert positive(r["peak_bytes"]) and len(r["peak_bytes_runs"]) == 1
        if r["lib"] == "tinytune":
            assert positive(r["memory_ratio"])
