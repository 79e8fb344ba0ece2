"""Smoke test of benchmarks/preference.py: its step builders run one DPO and one RM step on llama-tiny."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_preference", BENCH / "preference.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def setup(bench, tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("ckpt"))
    vocab = bench.write_checkpoint("llama-tiny", ckpt)
    return ckpt, bench.preference_pairs(2, 6, 5, vocab)


def test_tinytune_dpo_step_starts_at_ln2(bench, setup):
    step = bench.make_step("tinytune", "dpo", *setup)
    first, second = step().item(), step().item()
    assert abs(first - math.log(2)) < 1e-5  # LoRA B = 0: policy == reference
    assert math.isfinite(second) and second != first  # the AdamW step moved the adapter


def test_tinytune_rm_step_is_finite(bench, setup):
    step = bench.make_step("tinytune", "rm", *setup)
    assert math.isfinite(step().item()) and math.isfinite(step().item())


def test_trl_matches_first_losses(bench, setup):
    pytest.importorskip("trl")
    ours = bench.make_step("tinytune", "rm", *setup)().item()
    assert abs(bench.make_step("trl", "dpo", *setup)().item() - math.log(2)) < 1e-5
    assert abs(bench.make_step("trl", "rm", *setup)().item() - ours) < 1e-4  # same head weights, same scores
