"""The `tinytune` command never shows a traceback for a user error: one line `tinytune CMD: error: ...` on
stderr and exit status 2; an interrupt saves a checkpoint, prints how to resume and exits with 130."""
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

import tinytune as tt
from tinytune.cli import commands, main, resume_command
from text_fixtures import interrupt_after_first_step, write_cli_inputs

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
ENV.pop("TINYTUNE_TRACEBACK", None)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A one-layer llama-tiny checkpoint with the demo's character tokenizer, its tokenizer alone, and data."""
    root = tmp_path_factory.mktemp("cli_errors")
    write_cli_inputs(root).save(root / "tok")
    (root / "a_file").write_text("not a directory\n")
    return root


def _finetune(root, out, *extra):
    return ["finetune", root / "ckpt", root / "data.jsonl", "--out", out, "--steps", 1, "--batch-size", 2, *extra]


def _one_error_line(err: str, command: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tinytune {command}: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _main(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _python_m(*argv, timeout=120):
    return subprocess.run([sys.executable, "-m", "tinytune", *map(str, argv)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


# ---- one line, exit 2 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, fragment", [
    (["finetune", "llama-tiny", "d.jsonl", "--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["bench", "llama-tiny", "--rank", "1.5"], "argument --rank: invalid int value: '1.5'"),
    (["finetune", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["params", "llama-tiny", "extra"], "unrecognized arguments: extra"),
])
def test_a_bad_flag_is_one_line_on_stderr(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    line = _one_error_line(err, argv[0], fragment)
    assert line.endswith(f"(see 'tinytune {argv[0]} --help')")


def test_python_m_tinytune_user_errors_have_no_traceback(root, tmp_path):
    """As a user runs it: a bad flag value, a damaged checkpoint (the rest runs in-process, faster)."""
    result = _python_m("finetune", root / "ckpt", root / "data.jsonl", "--lr", "fast")
    assert result.returncode == 2
    _one_error_line(result.stderr, "finetune", "argument --lr: invalid float value: 'fast'")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for file in (root / "ckpt").iterdir():
        (damaged / file.name).write_bytes(file.read_bytes())
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = _python_m("params", damaged)
    assert result.returncode == 2, result.stderr
    _one_error_line(result.stderr, "params", f"checkpoint {damaged}: cannot load it", "model.safetensors")


def _damage(root, tmp_path, file: str, content: bytes, drop_manifest: bool = True):
    copy = tmp_path / f"ckpt-{file}"
    copy.mkdir()
    for src in (root / "ckpt").iterdir():
        (copy / src.name).write_bytes(src.read_bytes())
    (copy / file).write_bytes(content)
    if drop_manifest:
        (copy / "tinytune_manifest.json").unlink(missing_ok=True)
    return copy


@pytest.mark.parametrize("file, content, fragment", [
    ("config.json", b'{"model_type": ', "config.json"),
    ("config.json", b'{"model_type": "llama", "hidden_size": "big"}', "hidden_size"),
    ("model.safetensors", b"\x00" * 64, "model.safetensors"),
    ("tokenizer.json", b'{"truncated', "tokenizer.json"),
])
def test_a_damaged_checkpoint_is_one_line(root, tmp_path, capsys, file, content, fragment):
    damaged = _damage(root, tmp_path, file, content)
    code, _, err = _main(capsys, *_finetune(root, tmp_path / "run"))
    assert code == 0  # the undamaged checkpoint trains
    code, _, err = _main(capsys, "finetune", damaged, root / "data.jsonl", "--out", tmp_path / "run2")
    assert code == 2
    _one_error_line(err, "finetune", fragment)
    assert not (tmp_path / "run2").exists()


def test_missing_or_unreadable_files_are_named(root, tmp_path, capsys):
    cases = [
        (["finetune", root / "ckpt", tmp_path / "no.jsonl", "--out", tmp_path / "o"], "file not found", "no.jsonl"),
        (["finetune", root / "ckpt", tmp_path, "--out", tmp_path / "o"], "DATA: not a file", str(tmp_path)),
        (["params", "llama-tiny", "--tokenizer", tmp_path / "nope"], "--tokenizer: no such directory", "nope"),
        (["params", "llama-tiny", "--tokenizer", root / "a_file"], "--tokenizer: not a directory", "a_file"),
        (["params", tmp_path / "missing-ckpt"], "no such directory", "missing-ckpt"),
        (["params", "llama-tiny", "--config", tmp_path / "none.toml"], "--config: file not found", "none.toml"),
    ]
    for argv, *fragments in cases:
        code, _, err = _main(capsys, *argv)
        assert code == 2, argv
        _one_error_line(err, argv[0], *fragments)


def test_a_damaged_tokenizer_dir_is_named(root, tmp_path, capsys):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text((root / "tok" / "tokenizer.json").read_text()[:100])
    code, _, err = _main(capsys, "params", "llama-tiny", "--tokenizer", tok)
    assert code == 2
    _one_error_line(err, "params", f"--tokenizer {tok}: could not read {tok / 'tokenizer.json'}")
    code, _, _ = _main(capsys, "params", "llama-tiny", "--tokenizer", root / "tok")
    assert code == 0


@pytest.mark.parametrize("config, fragments", [
    ({"steps": "ten"}, ["'steps'", "'ten'"]),
    ({"rank": "8"}, ["'rank'", "'8'"]),
    ({"lr": [1]}, ["'lr'", "[1]"]),
    ({"max_length": "long"}, ["'max_length'", "'long'"]),
    ({"on_error": 1}, ["'on_error'"]),
    ({"checkpoint": 5}, ["'checkpoint'", "5"]),
    ({"tokenizer": ["a"]}, ["'tokenizer'", "['a']"]),
    ({"resume": 3}, ["resume", "got 3"]),
    ({"stepz": 3}, ["'stepz'"]),
])
def test_a_config_file_with_a_bad_value_is_one_line(root, tmp_path, capsys, config, fragments):
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"checkpoint": str(root / "ckpt"), "data": str(root / "data.jsonl"),
                                "out": str(tmp_path / "o"), "steps": 1, "batch_size": 2, **config}))
    code, _, err = _main(capsys, "finetune", "--config", file)
    assert code == 2
    _one_error_line(err, "finetune", *fragments)


def test_out_that_is_a_file_is_refused_before_training(root, tmp_path, capsys):
    for out, fragment in ((root / "a_file", f"--out {root / 'a_file'}: exists and is not a directory"),
                          (root / "a_file" / "run", f"{root / 'a_file'} is a file, not a directory")):
        code, stdout, err = _main(capsys, *_finetune(root, out))
        assert code == 2 and "training" not in stdout and stdout == ""  # nothing loaded, nothing trained
        _one_error_line(err, "finetune", fragment)
    assert (root / "a_file").read_text() == "not a directory\n"
    code, _, err = _main(capsys, "demo", "--quick", "--out", root / "a_file")
    assert code == 2
    _one_error_line(err, "demo", "exists and is not a directory")


def test_demo_and_bench_bad_numbers(capsys):
    code, _, err = _main(capsys, "demo", "--steps", 0)
    assert code == 2
    _one_error_line(err, "demo", "--steps must be an int >= 1, got 0")
    code, _, err = _main(capsys, "bench", "llama-tiny", "--seq-len", 600, "--steps", 1, "--warmup", 0)
    assert code == 2  # the model's forward refuses more tokens than its positions
    _one_error_line(err, "bench", "sequence length 600 exceeds max_position_embeddings=512 of this llama model")
    code, _, err = _main(capsys, "bench", "llama-tiny", "--warmup", -1)
    assert code == 2
    _one_error_line(err, "bench", "--warmup must be an int >= 0, got -1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused_up_front(root, tmp_path, capsys):
    code, stdout, err = _main(capsys, *_finetune(root, tmp_path / "o", "--device", "cuda"))
    assert code == 2 and stdout == ""
    _one_error_line(err, "finetune", "--device cuda: no CUDA device is available here")
    code, _, err = _main(capsys, *_finetune(root, tmp_path / "o", "--device", "tpu"))
    assert code == 2
    _one_error_line(err, "finetune", "--device: expected 'cpu' or 'cuda', got 'tpu'")


def test_resume_from_a_directory_without_a_checkpoint(root, tmp_path, capsys):
    code, _, err = _main(capsys, *_finetune(root, tmp_path / "o", "--resume", tmp_path))
    assert code == 2
    _one_error_line(err, "finetune", f"--resume {tmp_path}: no checkpoint there")
    code, _, err = _main(capsys, *_finetune(root, tmp_path / "o", "--resume", tmp_path / "nope"))
    assert code == 2
    _one_error_line(err, "finetune", f"--resume: no such directory: {tmp_path / 'nope'}")


def test_resume_alone_starts_fresh_then_resumes_the_latest(root, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = _main(capsys, *_finetune(root, out, "--resume"))  # nothing to resume: a fresh start
    assert code == 0, err
    assert "after 1 steps" in stdout
    code, stdout, err = _main(capsys, *_finetune(root, out, "--resume", "--steps", 2))  # later flags win
    assert code == 0, err
    assert "after 2 steps" in stdout
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    code, stdout, err = _main(capsys, *_finetune(root, out))  # a fresh start would overwrite that run
    assert code == 2 and stdout == ""
    _one_error_line(err, "finetune", f"--out {out} already holds checkpoints of a run (step-0000002, ...): "
                    "pass --resume to continue it")


def test_the_demo_never_trains_into_an_earlier_demo_run(tmp_path):
    from tinytune.cli.demo import _fresh_run_dir
    assert _fresh_run_dir(tmp_path) == tmp_path / "run"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run-2" / "checkpoints").mkdir(parents=True)
    assert _fresh_run_dir(tmp_path) == tmp_path / "run-3"


# ---- genuine bugs and interrupts ----------------------------------------------------------------------------

def test_a_genuine_bug_still_shows_its_traceback(monkeypatch):
    def broken(opts, out=print):
        raise RuntimeError("a bug")
    monkeypatch.setattr(commands, "params", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["params", "llama-tiny"])
    monkeypatch.setattr(commands, "params", lambda opts, out=print: {}["missing"])
    with pytest.raises(KeyError):
        main(["params", "llama-tiny"])


def test_a_failed_save_is_one_line(root, tmp_path, capsys, monkeypatch):
    def full_disk(model, path, **kwargs):
        raise tt.SaveError(f"save_adapter: could not write {path}: No space left on device")
    monkeypatch.setattr(commands, "save_adapter", full_disk)
    code, _, err = _main(capsys, *_finetune(root, tmp_path / "o"))
    assert code == 2
    _one_error_line(err, "finetune", "No space left on device", str(tmp_path / "o" / "adapter"))


def test_tinytune_traceback_shows_a_user_error_in_full(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYTUNE_TRACEBACK", "1")
    with pytest.raises(ValueError, match="sequence length 600"):
        main(["bench", "llama-tiny", "--seq-len", "600", "--steps", "1", "--warmup", "0"])


def test_an_interrupt_while_loading(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(commands, "load_model", interrupted)
    code, _, err = _main(capsys, "params", "llama-tiny")
    assert code == 130 and err == "tinytune params: interrupted\n"


def test_resume_command_keeps_the_arguments():
    argv = ["finetune", "ck", "my data.jsonl", "--out", "runs/x", "--resume"]
    cmd = resume_command(argv, "runs/x/checkpoints/step-0000003")
    assert cmd.endswith("finetune ck 'my data.jsonl' --out runs/x --resume --resume runs/x/checkpoints/step-0000003")
    assert shlex.split(cmd)[:3] == [sys.executable, "-m", "tinytune"]
    assert resume_command(["finetune", "--", "ck"], "c").endswith("finetune --resume c -- ck")


def test_sigint_saves_a_checkpoint_and_prints_the_resume_command(root, tmp_path):
    """SIGINT after the first logged step: exit 130, one line naming the checkpoint and the command; that
    command finishes the run."""
    out = tmp_path / "run"
    # Each optimizer step is 8 micro-batches (~0.1-0.2 s), so the signal arrives well before the last step.
    # A preset with a tokenizer directory starts faster than a checkpoint directory.
    argv = ["finetune", "llama-tiny", root / "data.jsonl", "--tokenizer", root / "tok", "--out", out, "--steps", 8,
            "--batch-size", 4, "--grad-accum", 8, "--log-every", 1]
    proc = interrupt_after_first_step(argv, ENV)
    stderr = proc.stderr
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    prefix = "tinytune finetune: interrupted by SIGINT at step "
    assert lines[0].startswith(prefix), lines[0]
    checkpoint = lines[0].split("checkpoint saved to ")[1].split("; resume with: ")[0]
    assert os.path.isdir(checkpoint) and checkpoint.startswith(str(out / "checkpoints" / "step-"))
    step = int(lines[0][len(prefix):].split(";")[0])
    assert 1 <= step < 8
    command = lines[0].split("; resume with: ")[1]
    assert command.endswith(f"--resume {checkpoint}")
    resumed = subprocess.run(shlex.split(command), capture_output=True, text=True, env=ENV, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "after 8 steps (completed)" in resumed.stdout
    assert f"step {step + 1}/8" in resumed.stdout and "step 1/8" not in resumed.stdout
