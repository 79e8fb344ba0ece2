"""The `tinytune` command: help, params, finetune (flags and config file), bench, errors, demo."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import tinytune as tt
from tinytune.cli import main
from tinytune.cli.demo_data import char_tokenizer

SUBCOMMANDS = ["finetune", "params", "bench", "demo"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_each_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: tinytune {command}" in out
    if command != "demo":
        assert "--method" in out and "--rank" in out


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in SUBCOMMANDS)


def test_params_matches_count_parameters(capsys):
    code, out, _ = run(capsys, "params", "llama-tiny", "--method", "lora", "--rank", 4, "--targets", "q_proj,v_proj")
    assert code == 0
    model = tt.models.build("llama-tiny")
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, targets=["q_proj", "v_proj"]))
    pc = tt.count_parameters(model)
    assert str(pc) in out
    total_row = re.search(r"^total\s+([\d,]+)\s+([\d,]+)", out, flags=re.M)
    assert int(total_row[1].replace(",", "")) == pc.trainable == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert int(total_row[2].replace(",", "")) == pc.total


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A llama-tiny checkpoint with the demo's character tokenizer, and a small instruction file."""
    root = tmp_path_factory.mktemp("cli")
    tok = char_tokenizer()
    model = tt.models.build("llama-tiny", vocab_size=tok.vocab_size, num_layers=1)
    tt.save_pretrained(model, root / "ckpt", tokenizer=tok)
    tok.save(root / "tok")
    records = [{"instruction": "Reverse.", "input": w, "output": w[::-1]} for w in ["abc", "hello", "xyz", "tiny"]]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _check_adapter(ckpt_dir, adapter_dir, rank):
    model, _ = tt.load_pretrained(ckpt_dir)
    tt.load_adapter(model, adapter_dir)
    layers = dict(tt.lora.lora_layers(model))
    assert layers and all(layer.lora_A.shape[0] == rank for layer in layers.values())
    assert any(layer.lora_B.abs().sum() > 0 for layer in layers.values())  # it trained: B left zero init


def test_finetune_writes_an_adapter_that_loads(checkpoint, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, "finetune", checkpoint / "ckpt", checkpoint / "data.jsonl", "--method", "lora",
                         "--rank", 4, "--steps", 3, "--batch-size", 2, "--lr", 1e-2, "--out", out_dir)
    assert code == 0, err
    assert "final loss:" in out and "trainable" in out
    assert (out_dir / "loss.png").is_file()
    _check_adapter(checkpoint / "ckpt", out_dir / "adapter", rank=4)


def test_finetune_preset_needs_a_tokenizer(checkpoint, tmp_path, capsys):
    data = checkpoint / "data.jsonl"
    code, _, err = run(capsys, "finetune", "llama-tiny", data, "--out", tmp_path / "a")
    assert code == 2 and "--tokenizer" in err and "llama-tiny" in err
    code, out, err = run(capsys, "finetune", "llama-tiny", data, "--tokenizer", checkpoint / "tok", "--steps", 1,
                         "--batch-size", 2, "--out", tmp_path / "b")
    assert code == 0, err
    assert (tmp_path / "b" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_finetune_from_a_config_file_and_flags_override(checkpoint, tmp_path, capsys, suffix):
    out_dir = tmp_path / "run"
    options = {"checkpoint": str(checkpoint / "ckpt"), "data": str(checkpoint / "data.jsonl"), "out": str(out_dir),
               "rank": 2, "batch-size": 2, "steps": 50, "lr": 1e-2}
    config = tmp_path / f"run{suffix}"
    if suffix == ".json":
        config.write_text(json.dumps(options))
    else:
        config.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items()))
    code, out, err = run(capsys, "finetune", "--config", config, "--steps", 2)  # the flag beats the file's 50
    assert code == 0, err
    assert "after 2 steps" in out
    _check_adapter(checkpoint / "ckpt", out_dir / "adapter", rank=2)


@pytest.mark.parametrize("argv, message", [
    (["params", "no-such-preset"], "unknown preset 'no-such-preset'"),
    (["params", "./missing/dir"], "no such directory: missing/dir"),
    (["params", "llama-tiny", "--method", "loha"], "--method: unknown method 'loha'; choose from ['lora', 'dora', 'ia3'"),
    (["params", "llama-tiny", "--rank", "0"], "rank"),
    (["params", "llama-tiny", "--targets", "nope"], "nope"),
    (["finetune", "llama-tiny"], "missing DATA"),
    (["finetune", "--config", "missing.toml"], "--config: file not found: missing.toml"),
    (["bench", "llama-tiny", "--seq-len", "0"], "--seq-len must be an int >= 1"),
])
def test_errors_name_the_bad_argument(argv, message, capsys):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err, err


def test_error_for_a_missing_data_file_and_bad_config_key(checkpoint, tmp_path, capsys):
    code, _, err = run(capsys, "finetune", checkpoint / "ckpt", tmp_path / "nope.jsonl", "--out", tmp_path)
    assert code == 2 and "DATA: file not found" in err and "nope.jsonl" in err
    config = tmp_path / "bad.toml"
    config.write_text('checkpoint = "llama-tiny"\nrnak = 4\n')
    code, _, err = run(capsys, "params", "--config", config)
    assert code == 2 and "unknown key(s) ['rnak']" in err
    code, _, err = run(capsys, "finetune", checkpoint / "ckpt", checkpoint / "data.jsonl", "--task", "poems",
                       "--out", tmp_path)
    assert code == 2 and "--task: unknown task 'poems'" in err


def test_bench_reports_tokens_per_second_and_memory(capsys):
    code, out, err = run(capsys, "bench", "llama-tiny", "--batch-size", 2, "--seq-len", 16, "--steps", 2,
                         "--warmup", 1)
    assert code == 0, err
    assert "tokens/s:" in out and "peak memory:" in out


def test_demo_fine_tunes_a_pretrained_base_and_the_metric_improves(full_demo):
    out, cache, out_dir = full_demo
    assert "pre-training the base model" in out and "trainable" in out and "tokens/s" in out
    match = re.search(r"exact match before -> after: (\d+)% -> (\d+)%", out)
    assert match, out[-2000:]
    before, after = int(match.group(1)), int(match.group(2))
    assert before <= 10 and after >= 90, (before, after)  # measured: 0% -> 100% on 100 held-out words
    assert "generations:" in out and "(ok)" in out
    assert (out_dir / "adapter" / "adapter_config.json").is_file()
    assert (out_dir / "run" / "loss.png").is_file()
    assert (cache / "demo-base-v3" / "config.json").is_file()


def test_python_m_tinytune_demo_quick_and_the_cache(tmp_path):
    env = {**os.environ, "TINYTUNE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "tinytune", "demo", "--quick", "--out", str(tmp_path / "demo")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "exact match before fine-tuning:" in out and "exact match before -> after:" in out
    assert (tmp_path / "cache" / "demo-base-v3-quick" / "config.json").is_file()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)  # the cached base
    assert again.returncode == 0, again.stderr
    assert "cached in" in again.stdout and "pre-training the base model" not in again.stdout


@pytest.mark.parametrize("method, peft_type", [("dora", "LORA"), ("ia3", "IA3"), ("adapter", "BOTTLENECK_ADAPTER"),
                                               ("prefix", "PREFIX_TUNING"), ("prompt", "PROMPT_TUNING")])
def test_finetune_with_every_method_writes_a_loadable_adapter(checkpoint, tmp_path, capsys, method, peft_type):
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, "finetune", checkpoint / "ckpt", checkpoint / "data.jsonl", "--method", method,
                         "--steps", 2, "--batch-size", 2, "--lr", 1e-2, "--bottleneck", 8, "--num-virtual-tokens", 4,
                         "--out", out_dir)
    assert code == 0, err
    assert json.loads((out_dir / "adapter" / "adapter_config.json").read_text())["peft_type"] == peft_type
    trained = tt.load_adapter(tt.load_pretrained(checkpoint / "ckpt")[0], out_dir / "adapter")
    base, _ = tt.load_pretrained(checkpoint / "ckpt")
    ids = torch.tensor([[1, 5, 6, 7]])
    assert not torch.allclose(trained(ids), base(ids))  # it trained, and the file carries it


def test_bitfit_needs_biases_and_says_so(checkpoint, tmp_path, capsys):
    code, _, err = run(capsys, "finetune", checkpoint / "ckpt", checkpoint / "data.jsonl", "--method", "bitfit",
                       "--steps", 1, "--out", tmp_path / "run")
    assert code == 2 and "--method bitfit:" in err and "bias" in err
