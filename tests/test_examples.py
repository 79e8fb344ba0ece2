"""The task examples run end to end (with few steps) and print their metric lines."""
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
