"""The task examples run end to end (with few steps) and print their metric lines."""
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = {  # script: (steps, lines that must appear)
    "sentiment_classification.py": (3, ["before training: accuracy", "after training:  accuracy", "macro-F1"]),
    "ner.py": (3, ["before training: precision", "after training:  precision", "F1"]),
}


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs(script):
    steps, expected = EXAMPLES[script]
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--steps", str(steps)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    for line in expected:
        assert line in done.stdout, f"{script} did not print {line!r}:\n{done.stdout[-2000:]}"


def test_instruction_tuning_learns_the_new_instruction(full_demo):
    """The instruction-tuning example on the demo's pre-trained base (cached by the `full_demo` run)."""
    _, cache, _ = full_demo
    env = {**os.environ, "TINYTUNE_CACHE": str(cache)}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "instruction_tuning.py")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "expected" in done.stdout and "pre-training" not in done.stdout  # the cached base was used
    before = float(re.search(r"before training: exact match ([\d.]+)", done.stdout).group(1))
    after = float(re.search(r"after training:  exact match ([\d.]+)", done.stdout).group(1))
    assert before <= 0.1 and after >= 0.9, (before, after, done.stdout[-2000:])  # measured: 0.0 -> 1.0


def test_preference_tuning_learns_the_rule_and_moves_generations(full_demo):
    """Issue 11's learning tests on the demo's base (~1 min on 2 cores): a reward model learns "capitals are
    better" from rankings the base generated, and DPO makes the base answer "Repeat: <word>" in capitals."""
    _, cache, _ = full_demo
    env = {**os.environ, "TINYTUNE_CACHE": str(cache)}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "preference_tuning.py")],
                          capture_output=True, text=True, timeout=400, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    rm_before, rm_after = map(float, re.search(r"held-out pairwise accuracy ([\d.]+) -> ([\d.]+)", out).groups())
    pref = re.search(r"held-out preference accuracy ([\d.]+) -> ([\d.]+), margin ([-\d.]+) -> ([-\d.]+)", out)
    acc_before, acc_after, margin_before, margin_after = map(float, pref.groups())
    caps_before, caps_after = map(float, re.search(r"answers in capitals: ([\d.]+) -> ([\d.]+)", out).groups())
    # measured (2026-12-01, seed 0): RM 0.417 -> 1.000; DPO 0.500 -> 1.000, margin 0 -> 6.06; capitals 0.0 -> 1.0
    assert rm_after >= 0.9 and rm_after - rm_before >= 0.3, out[-2000:]
    assert acc_after >= 0.9 and acc_after - acc_before >= 0.3 and margin_after - margin_before >= 1.0, out[-2000:]
    assert caps_before <= 0.1 and caps_after >= 0.8, out[-2000:]


def _rlhf_results(out: str) -> dict:
    """examples/rlhf.py's `RESULT name before -> after` / `RESULT name value` lines, as tuples of floats."""
    found = {}
    for name, values in re.findall(r"^RESULT (\S+) (.+)$", out, flags=re.M):
        found[name] = tuple(float(v) for v in values.split(" -> "))
    return found


RLHF_RESULTS = ["sft_loss", "rm_pairwise_accuracy", "ppo_rm_score", "ppo_train_score", "ppo_kl",
                "ppo_capitals_share", "grpo_exact_match", "grpo_train_reward", "seconds"]


def _run_rlhf(args, cache, timeout):
    env = {**os.environ, "TINYTUNE_CACHE": str(cache)}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "rlhf.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    found = _rlhf_results(done.stdout)
    assert sorted(found) == sorted(RLHF_RESULTS), (sorted(found), done.stdout[-2000:])
    assert all(math.isfinite(v) for values in found.values() for v in values), found
    return found, done.stdout


def test_rlhf_example_quick_runs_every_phase(tmp_path):
    """SFT -> reward model -> PPO -> GRPO on a barely pre-trained base, a few steps each (learns nothing:
    the numbers are only checked to be there and finite). Measured ~70 s on 2 shared cores."""
    found, out = _run_rlhf(["--quick"], tmp_path / "cache", timeout=300)
    assert "['policy', 'reward', 'value']" in out  # every PPO role on the one base
    assert found["ppo_kl"][0] == 0.0  # PPO's first step samples from the reference itself


@pytest.mark.slow
def test_rlhf_example_raises_the_reward_model_score_and_the_exact_match(full_demo):
    """The full run on the demo's pre-trained base (cached by `full_demo`)."""
    found, out = _run_rlhf([], full_demo[1], timeout=3000)
    assert found["rm_pairwise_accuracy"][1] >= 0.8, out[-3000:]
    rm_before, rm_after = found["ppo_rm_score"]
    assert rm_after > rm_before, out[-3000:]
    em_before, em_after = found["grpo_exact_match"]
    assert em_before <= 0.15 and em_after - em_before >= 0.15, out[-3000:]
