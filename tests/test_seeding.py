"""`tt.seed_everything`, and seeds that make runs bit-identical on the CPU: LoRA init, `fit`, the CLI."""
import io
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tinytune as tt
from tinytune.cli import main
from text_fixtures import write_cli_inputs

ROOT = Path(__file__).resolve().parent.parent


def _draws():
    return torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)]


def _scramble():
    """Move every global RNG somewhere else, as unrelated work between two runs would."""
    torch.rand(97), np.random.rand(13), random.random()


# --- seed_everything ---------------------------------------------------------------------------------

def test_returns_the_seed_and_is_exported():
    assert "seed_everything" in tt.__all__
    assert tt.seed_everything(7) == 7
    assert tt.seed_everything(np.int64(2**32 - 1)) == 2**32 - 1
    assert type(tt.seed_everything(np.uint32(3))) is int


def test_same_seed_same_draws_different_seed_different_draws():
    tt.seed_everything(123)
    t1, n1, r1 = _draws()
    _scramble()
    tt.seed_everything(123)
    t2, n2, r2 = _draws()
    assert torch.equal(t1, t2) and np.array_equal(n1, n2) and r1 == r2
    tt.seed_everything(124)
    t3, n3, r3 = _draws()
    assert not torch.equal(t1, t3) and not np.array_equal(n1, n3) and r1 != r3


@pytest.mark.parametrize("seed, error, message", [
    (-1, ValueError, r"seed must be an int in \[0, 2\*\*32 - 1\] = \[0, 4294967295\] .*got -1"),
    (2**32, ValueError, r"got 4294967296"),
    (True, TypeError, r"seed must be an int in \[0, 2\*\*32 - 1\], got True \(bool\)"),
    (1.0, TypeError, r"got 1.0 \(float\)"),
    ("7", TypeError, r"got '7' \(str\)"),
    (None, TypeError, r"got None \(NoneType\)"),
])
def test_bad_seeds_are_refused_by_value(seed, error, message):
    state = torch.get_rng_state()
    with pytest.raises(error, match=message):
        tt.seed_everything(seed)
    assert torch.equal(torch.get_rng_state(), state), "a refused seed must leave the RNGs alone"


def test_deterministic_is_opt_in_and_checked():
    before = torch.are_deterministic_algorithms_enabled()
    tt.seed_everything(0)
    assert torch.are_deterministic_algorithms_enabled() == before, "the default must not change torch's setting"
    with pytest.raises(TypeError, match=r"deterministic must be True or False, got 1 \(int\)"):
        tt.seed_everything(0, deterministic=1)
    env, cudnn = os.environ.get("CUBLAS_WORKSPACE_CONFIG"), (torch.backends.cudnn.benchmark,
                                                             torch.backends.cudnn.deterministic)
    try:
        tt.seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (env or ":4096:8",)
    finally:
        torch.use_deterministic_algorithms(before)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
        if env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def test_does_not_initialise_cuda():
    code = ("import torch, tinytune as tt; tt.seed_everything(3); "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised by seed_everything'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]


def test_train_config_seed_range():
    assert tt.train.TrainConfig(seed=2**32 - 1).seed == 2**32 - 1
    with pytest.raises(ValueError, match=r"TrainConfig.seed must be an int in \[0, 2\*\*32 - 1\].*got 4294967296"):
        tt.train.TrainConfig(seed=2**32)


# --- adapter initialisation and fit ------------------------------------------------------------------

def _lora_model(seed, dropout=0.0):
    model = tt.models.build("llama-tiny")  # seeded build: the same base weights every time
    tt.seed_everything(seed)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, dropout=dropout, targets="all-linear"))
    return model


def test_lora_init_follows_the_seed():
    a = tt.lora.state_dict(_lora_model(5))
    _scramble()
    b = tt.lora.state_dict(_lora_model(5))
    c = tt.lora.state_dict(_lora_model(6))
    a_keys = [k for k in a if "lora_A" in k]
    assert a_keys and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a_keys)


def _examples(n=12):
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(0, 256, (10,), generator=gen).tolist()), "labels": ids}
            for _ in range(n)]


def _fit(seed, init_seed=0):
    model = _lora_model(init_seed, dropout=0.1)  # dropout and shuffling both draw from the seeded RNGs
    _scramble()  # fit must seed by itself, whatever happened since
    cfg = tt.train.TrainConfig(lr=1e-2, steps=4, batch_size=4, seed=seed, log_every=1000)
    history = tt.train.fit(model, _examples(), cfg, stream=io.StringIO())
    return tt.lora.state_dict(model), history.losses


def test_two_fits_with_the_same_seed_are_bit_identical():
    (w1, l1), (w2, l2), (w3, l3) = _fit(3), _fit(3), _fit(4)
    assert l1 == l2 and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert l1 != l3 and not all(torch.equal(w1[k], w3[k]) for k in w1)


# --- the command line --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A one-layer llama-tiny checkpoint with the demo's character tokenizer, and a small instruction file."""
    root = tmp_path_factory.mktemp("seeding")
    write_cli_inputs(root)
    return root


def _argv(checkpoint, out, seed):
    return ["finetune", str(checkpoint / "ckpt"), str(checkpoint / "data.jsonl"), "--rank", "4", "--dropout", "0.1",
            "--steps", "2", "--batch-size", "2", "--lr", "1e-2", "--seed", str(seed), "--out", str(out)]


def _finetune(checkpoint, out, seed, capsys) -> bytes:
    _scramble()
    code = main(_argv(checkpoint, out, seed))
    assert code == 0, capsys.readouterr().err
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


def test_cli_same_seed_gives_a_byte_identical_adapter(checkpoint, tmp_path, capsys):
    first = _finetune(checkpoint, tmp_path / "a", 11, capsys)
    assert _finetune(checkpoint, tmp_path / "b", 11, capsys) == first
    assert _finetune(checkpoint, tmp_path / "c", 12, capsys) != first
    # Another process with another hash seed: nothing depends on the process or on hash order.
    env = {**os.environ, "PYTHONHASHSEED": "4321", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "tinytune", *_argv(checkpoint, tmp_path / "d", 11)], env=env,
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "d" / "adapter" / "adapter_model.safetensors").read_bytes() == first


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_cli_refuses_a_seed_out_of_range_before_loading(seed, tmp_path, capsys):
    code = main(["finetune", "no-such-checkpoint", "no-such.jsonl", "--seed", seed, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "--seed must be an int in [0, 2**32 - 1]" in err and f"got {seed}" in err
