"""The task examples run end to end (with few steps) and print their metric lines."""
import os
import pathlib
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


def test_instruction_tuning_runs(tmp_path):
    """The instruction-tuning example on a quick (barely pre-trained, cached in tmp) base."""
    env = {**os.environ, "TINYTUNE_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "instruction_tuning.py"), "--steps", "2", "--quick"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    for line in ["before training: exact match", "after training:  exact match", "expected"]:
        assert line in done.stdout, f"instruction_tuning.py did not print {line!r}:\n{done.stdout[-2000:]}"
