"""Smoke test of benchmarks/rl_step.py: its smallest mode runs every part end to end and writes a sane JSON."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_bench_common import check_written, results_digest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rl_step.py"
SMALL = ["--quick", "--rounds", "1", "--warmup", "0", "--prompts", "1", "--group-size", "2", "--prompt-len", "4",
         "--new-tokens", "4", "--ppo-prompts", "2"]


def run(tmp_path, *extra) -> dict:
    pytest.importorskip("trl")
    out = tmp_path / "rl_step.json"
    before = results_digest()
    subprocess.run([sys.executable, str(SCRIPT), *SMALL, *extra, "--threads", "1", "--out", str(out)], check=True,
                   capture_output=True, text=True, timeout=600)
    result = check_written(out)  # the JSON, and a valid PNG beside it
    assert results_digest() == before  # the committed results untouched
    assert result["machine"]["threads"] == 1
    return result


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


PEERS = {"rollout": "hf", "grpo": "trl", "ppo": "separate"}


def check_speed(result: dict, parts=("rollout", "grpo", "ppo")) -> None:
    assert set(result) >= {"machine", "setup", "targets", "rows"}
    rows = {(r["lib"], r["part"]): r for r in result["rows"]}
    assert set(rows) == {(lib, part) for part in parts for lib in ("tinytune", PEERS[part])}
    for r in rows.values():
        assert positive(r["tokens_per_s"]) and positive(r["median_s"]) and len(r["call_s"]) == 1
    for part in parts:
        assert positive(rows["tinytune", part]["speed_ratio"])
        assert rows["tinytune", part]["tokens"] == (2 * 4 if part == "rollout" else 2 * (4 + 4))
    if "rollout" in parts:
        for lib in ("tinytune", "hf"):
            assert rows[lib, "rollout"]["completion_lengths_seen"] == [4]  # no early stop on either side
    stepped = [(lib, part) for part in parts if part != "rollout" for lib in ("tinytune", PEERS[part])]
    for v in stepped:
        assert rows[v]["completion_length_mean"] == 4 and math.isfinite(rows[v]["first_loss"])
    for v in stepped:
        if v[0] != "trl":
            phases = rows[v]["phases_median_s"]
            assert set(phases) == {"generation_s", "scoring_s", "update_s"} and all(x >= 0 for x in phases.values())
    assert result["machine"]["logit_max_abs_diff"] < 1e-4  # the same weights and adapter on both sides
    if "ppo" in parts:  # one base holds one copy of the weights (+ 3 adapters), the separate models four
        one, four = rows["tinytune", "ppo"]["weight_bytes"], rows["separate", "ppo"]["weight_bytes"]
        assert 0 < one < four and rows["tinytune", "ppo"]["weight_ratio"] == one / four
        # and both compute the same step: from one seed, the same loss and score
        assert all(d < 1e-5 for d in result["machine"]["ppo_first_step_abs_diff"].values())


def test_quick_speed_only(tmp_path):
    check_speed(run(tmp_path, "--which", "rollout", "grpo", "--memory-runs", "0"), ("rollout", "grpo"))


def test_ppo_variants_in_process(tmp_path, monkeypatch):
    """The fast sibling of the script's ppo part: both variants built in this process on llama-tiny, one step
    each from one seed (no subprocess, no transformers import)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import rl_step
    ckpt = str(tmp_path)
    vocab = rl_step.write_checkpoint("llama-tiny", ckpt)
    rl_step.write_adapter(ckpt, str(tmp_path / "adapter"))
    rl_step.write_reward_model(ckpt, str(tmp_path / "reward_model"))
    setup = {"ppo_prompts": rl_step.random_prompts(2, 4, vocab), "prompt_len": 4, "new_tokens": 4}
    outs = {}
    for lib in ("tinytune", "separate"):
        step = rl_step.BUILDERS[lib, "ppo"](ckpt, setup)
        torch.manual_seed(0)
        outs[lib] = step()
    for o in outs.values():
        assert o["completion_length_mean"] == 4 and math.isfinite(o["loss"])
        assert set(o["phases"]) == {"generation_s", "scoring_s", "update_s"}
        assert all(x >= 0 for x in o["phases"].values())
    assert 0 < outs["tinytune"]["weight_bytes"] < outs["separate"]["weight_bytes"]
    for k in ("loss", "reward_mean"):  # the same computation on one base and on four copies
        assert abs(outs["tinytune"][k] - outs["separate"][k]) < 1e-5


@pytest.mark.slow  # the whole script for the ppo part: a minute on 2 busy cores
def test_quick_ppo_speed_only(tmp_path):
    check_speed(run(tmp_path, "--which", "ppo", "--memory-runs", "0"), ("ppo",))


@pytest.mark.slow  # 6 fresh processes importing tinytune / transformers / TRL: minutes on 2 busy cores
def test_quick_with_memory(tmp_path):
    result = run(tmp_path, "--memory-runs", "1")  # every part
    check_speed(result)
    for r in result["rows"]:
        assert positive(r["peak_bytes"]) and len(r["peak_bytes_runs"]) == 1
        if r["lib"] == "tinytune":
            assert positive(r["memory_ratio"]) and positive(r["process_hwm_ratio"])
    ppo = {r["lib"]: r for r in result["rows"] if r["part"] == "ppo"}
    for r in ppo.values():
        assert r["held_bytes"] == r["weight_bytes"] + r["peak_bytes"]
    assert positive(ppo["tinytune"]["held_memory_ratio"]) and "memory_target_met" in ppo["tinytune"]
