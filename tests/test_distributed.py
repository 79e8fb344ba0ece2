"""Multi-process training: `fit` under `torchrun` with two CPU processes (gloo DDP) gives the weights
and losses of a one-process run with the same global batch (`ddp_worker.py` is what each process runs)."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ddp_worker as w
import tinytune as tt
from tinytune.train import fit, state_codec
from tinytune.train.distributed import Distributed, setup

HERE = Path(__file__).parent
# Two processes sum their shards' gradients in a different order than one process sums the whole batch:
# fp32 rounding only. Measured differences are ~1e-7; the bounds leave room for other BLAS builds.
ATOL, RTOL = 2e-5, 1e-5


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def _assert_close(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=ATOL, rtol=RTOL, msg=k)


def test_two_processes_equal_one_process_with_the_same_global_batch(two_process_run):
    out, _ = two_process_run
    m = w.model()
    h = fit(m, w.data(), w.config(1), eval_data=w.data(10, seed=1), stream=io.StringIO())
    ranks = [json.loads((out / f"results-rank{r}.json").read_text()) for r in (0, 1)]
    for got in ranks:  # every rank reports the global loss, not its shard's
        assert got["plain"]["losses"] == pytest.approx(h.losses, rel=RTOL)
        assert got["plain"]["eval_losses"] == pytest.approx(h.eval_losses, rel=RTOL)
    _assert_close(load_file(str(out / "plain.safetensors")), w.trainable(m))
    assert h.losses[-1] < h.losses[0]  # it trained: the comparison is not between two untouched models


def test_resume_with_checkpointing_under_ddp_equals_one_straight_process(two_process_run):
    out, _ = two_process_run
    m = w.model()
    h = fit(m, w.data(), w.config(1, grad_checkpointing=True, eval_every=0), stream=io.StringIO())
    got = json.loads((out / "results-rank0.json").read_text())["resumed"]
    assert got["losses"] == pytest.approx(h.losses, rel=RTOL)
    _assert_close(load_file(str(out / "resumed.safetensors")), w.trainable(m))


def test_dpo_under_ddp_equals_one_process(two_process_run):
    """The DPO task's counts (pairs) and metrics (sum, n) add up over processes exactly as over one batch."""
    out, _ = two_process_run
    m = w.model()
    h = tt.rlhf.dpo(m, w.preference_data(), w.dpo_config(1), stream=io.StringIO())
    for r in (0, 1):
        got = json.loads((out / f"results-rank{r}.json").read_text())["dpo"]
        assert got["losses"] == pytest.approx(h.losses, rel=RTOL)
        for step, metrics in enumerate(h.metrics):
            assert got["metrics"][step] == pytest.approx(metrics, rel=1e-4, abs=1e-5)
    _assert_close(load_file(str(out / "dpo.safetensors")), w.trainable(m))
    assert h.losses[0] == pytest.approx(0.693147, abs=1e-5) and h.losses[-1] < h.losses[0]


def test_fsdp_sharded_training_equals_one_process(two_process_run):
    out, _ = two_process_run
    got = json.loads((out / "results-rank0.json").read_text())["fsdp"]
    if got is None:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    m = w.model()
    h = fit(m, w.data(), w.config(1), eval_data=w.data(9, seed=1), stream=io.StringIO())
    assert got["losses"] == pytest.approx(h.losses, rel=RTOL)
    assert got["eval_losses"] == pytest.approx(h.eval_losses, rel=RTOL)  # uneven eval shards, no hang
    _assert_close(load_file(str(out / "fsdp.safetensors")), tt.lora.state_dict(m))


def test_rank_zero_alone_logs_and_writes_checkpoints(two_process_run):
    out, stdout = two_process_run
    plain = out / "plain"
    records = [json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # once per step, not once per rank
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    assert stdout.count("step 4/4  loss") == 3  # rank 0's line in each run: plain, resumed, FSDP
    assert sorted(p.name for p in (plain / "checkpoints").iterdir()) == ["step-0000004"]
    step = plain / "checkpoints" / "step-0000004"
    state = state_codec.decode(json.loads((step / "state.json").read_text()),
                               load_file(str(step / "state.safetensors")), "test")["loop"]
    assert len(state["rng_per_rank"]) == 2  # each rank's random stream, for an exact resume
    assert not state["rng_per_rank"][0]["torch"].equal(state["rng_per_rank"][1]["torch"])
    assert (plain / "loss.png").is_file()


def test_single_process_setup_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = setup("cpu")
    assert (d.rank, d.world_size, d.is_main, d.active) == (0, 1, True, False)
    assert d.sum([1.5, 2.0]) == [1.5, 2.0] and d.my_slice([1, 2, 3]) == [1, 2, 3]


def test_world_size_without_torchrun_variables_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 .*torchrun --nproc_per_node 2"):
        setup("cpu")


def test_my_slice_is_contiguous_per_rank():
    assert Distributed(rank=1, world_size=2).my_slice([0, 1, 2, 3, 4, 5, 6, 7]) == [4, 5, 6, 7]


def test_finetune_command_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 -m tinytune finetune ...`: rank 0 alone prints and writes the adapter."""
    from tinytune.cli.demo_data import char_tokenizer

    tok = char_tokenizer()
    tt.save_pretrained(tt.models.build("llama-tiny", vocab_size=tok.vocab_size, num_layers=1), tmp_path / "ckpt",
                       tokenizer=tok)
    records = [{"instruction": "Reverse.", "input": x, "output": x[::-1]} for x in ["abc", "hello", "xyz", "tiny"]]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tinytune",
           "finetune", str(tmp_path / "ckpt"), str(tmp_path / "data.jsonl"), "--rank", "4", "--steps", "2",
           "--batch-size", "1", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("final loss:") == 1 and proc.stdout.count("adapter:") == 1
    model, _ = tt.load_pretrained(tmp_path / "ckpt")
    tt.load_adapter(model, tmp_path / "run" / "adapter")
    assert any(layer.lora_B.abs().sum() > 0 for _, layer in tt.lora.lora_layers(model))


def test_fsdp_model_with_out_dir_is_refused_with_the_reason(monkeypatch, tmp_path):
    from tinytune.train import distributed
    monkeypatch.setattr(distributed, "is_fsdp", lambda model: True)
    with pytest.raises(ValueError, match=r"TrainConfig.out_dir .* FSDP-sharded .*out_dir=None"):
        fit(w.model(), w.data(), w.config(1, tmp_path), stream=io.StringIO())
