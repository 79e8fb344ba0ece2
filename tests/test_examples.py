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
