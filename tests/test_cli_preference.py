"""The `tinytune reward` and `tinytune dpo` commands: training, outputs, config files, resume, errors."""
import json
import math
import os
import shlex
import signal

import pytest
import torch

import tinytune as tt
from text_fixtures import run_cli, write_cli_inputs, write_jsonl

WORDS = ["abc", "hello", "xyz", "tiny", "cat", "dog"]


def run(capsys, *argv):
    return run_cli(capsys, *argv)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A one-layer llama-tiny checkpoint with a character tokenizer (also in tok/), and preference files."""
    root = tmp_path_factory.mktemp("cli_pref")
    tok = write_cli_inputs(root)
    tok.save(root / "tok")
    rows = [{"prompt": f"Reverse {w}:", "chosen": w[::-1], "rejected": w} for w in WORDS]
    write_jsonl(root / "prefs.jsonl", rows)
    write_jsonl(root / "held_out.jsonl", rows[:3])
    return root


def _common(root, out, *extra):
    return [root / "ckpt", root / "prefs.jsonl", "--out", out, "--steps", 2, "--batch-size", 2, "--log-every", 1,
            "--rank", 2, *extra]


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_reward_trains_and_writes_a_reward_model_that_loads(root, tmp_path, capsys):
    out = tmp_path / "rm"
    code, stdout, err = run(capsys, "reward", *_common(root, out, "--lr", 1e-2, "--eval-data",
                                                       root / "held_out.jsonl", "--center-coef", 0.01))
    assert code == 0, err
    assert "final loss:" in stdout and "after 2 steps" in stdout
    assert "held-out accuracy" in stdout and "margin" in stdout
    assert (out / "loss.png").is_file() and (out / "checkpoints").is_dir() and _records(out)
    trained_scores = _scores(tt.rlhf.load_reward_model(tt.load_pretrained(root / "ckpt")[0], out / "reward_model"))
    again = _scores(tt.rlhf.load_reward_model(tt.load_pretrained(root / "ckpt")[0], out / "reward_model"))
    assert torch.equal(trained_scores, again)
    fresh = tt.rlhf.RewardModel(tt.load_pretrained(root / "ckpt")[0])
    assert not torch.allclose(trained_scores, _scores(fresh))  # the head and the adapter were saved


def _scores(rm):
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    rm.eval()
    with torch.no_grad():
        return rm(ids, mask)


def test_dpo_starts_at_ln2_and_logs_reward_metrics(root, tmp_path, capsys):
    out = tmp_path / "dpo"
    code, stdout, err = run(capsys, "dpo", *_common(root, out, "--eval-data", root / "held_out.jsonl"))
    assert code == 0, err
    records = _records(out)
    assert abs(records[0]["loss"] - math.log(2)) < 1e-5  # LoRA's B starts at zero: policy == reference
    assert any("rewards/margins" in r for r in records)
    assert "held-out preference accuracy before 0.50 -> after" in stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    model = tt.load_adapter(tt.load_pretrained(root / "ckpt")[0], out / "adapter")
    assert dict(tt.lora.lora_layers(model))


def test_dpo_sft_weight_adds_the_chosen_nll(root, tmp_path, capsys):
    out = tmp_path / "rpo"
    code, _, err = run(capsys, "dpo", *_common(root, out, "--sft-weight", 0.5))
    assert code == 0, err
    first = _records(out)[0]
    assert first["loss"] == pytest.approx(math.log(2) + 0.5 * first["sft_nll"], abs=1e-5)
    code, _, err = run(capsys, "dpo", *_common(root, tmp_path / "bad", "--sft-weight", -1))
    assert code == 2 and "--sft-weight" in err and not (tmp_path / "bad").exists()


def test_dpo_lr_default_is_dpo_configs_not_finetunes(root, tmp_path, capsys):
    from tinytune.cli import build_parser
    from tinytune.cli.options import COMMAND_DEFAULTS, resolve
    from tinytune.cli.preference import DPO_KEYS, REWARD_KEYS
    args = build_parser().parse_args(["dpo", "ck", "d.jsonl"])
    assert resolve(args, DPO_KEYS, COMMAND_DEFAULTS["dpo"])["lr"] == tt.rlhf.DPOConfig.lr == 5e-5
    args = build_parser().parse_args(["reward", "ck", "d.jsonl"])
    assert resolve(args, REWARD_KEYS)["lr"] == 2e-4


def test_a_config_file_and_flags_override_it(root, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "dpo.toml"
    config.write_text(f'checkpoint = "{root / "ckpt"}"\ndata = "{root / "prefs.jsonl"}"\nout = "{out}"\n'
                      '[train]\nsteps = 50\nbatch-size = 2\nlog-every = 1\n[dpo]\nbeta = 0.5\nloss-type = "ipo"\n'
                      '[lora]\nrank = 2\n')
    code, stdout, err = run(capsys, "dpo", "--config", config, "--steps", 1, "--loss-type", "hinge")
    assert code == 0, err
    assert "after 1 steps" in stdout and "(hinge, beta 0.5)" in stdout
    assert len(_records(out)) == 1


def test_resume_continues_from_the_latest_checkpoint(root, tmp_path, capsys):
    out = tmp_path / "rm"
    code, _, err = run(capsys, "reward", *_common(root, out))
    assert code == 0, err
    code, _, err = run(capsys, "reward", *_common(root, out))  # a fresh start would overwrite the run
    assert code == 2 and "pass --resume" in err
    code, stdout, err = run(capsys, "reward", *_common(root, out, "--resume", "--steps", 3))
    assert code == 0, err
    assert "after 3 steps" in stdout and "step 3/3" in stdout and "step 1/3" not in stdout


def test_a_bad_preference_row_is_one_line_naming_file_and_line(root, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                               {"prompt": "a", "chosen": "b"}])
    out = tmp_path / "never"
    code, _, err = run(capsys, "dpo", root / "ckpt", bad, "--out", out, "--steps", 1)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("tinytune dpo: error: DATA") and f"{bad}:2" in err
    assert not out.exists()
    code, _, err = run(capsys, "reward", root / "ckpt", root / "prefs.jsonl", "--eval-data", bad, "--out", out)
    assert code == 2 and err.startswith("tinytune reward: error: --eval-data") and f"{bad}:2" in err
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--loss-type", "kto"], "--loss-type: unknown loss type 'kto'; choose from ['sigmoid', 'ipo', 'hinge', 'simpo']"),
    (["--beta", "0"], "--beta must be"),
    (["--label-smoothing", "0.5"], "--label-smoothing must be"),
    (["--template", "vicuna"], "--template: unknown template 'vicuna'"),
    (["--eval-data", "missing.jsonl"], "--eval-data: file not found: missing.jsonl"),
])
def test_bad_dpo_options_are_named_and_nothing_is_written(root, tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    code, _, err = run(capsys, "dpo", root / "ckpt", root / "prefs.jsonl", "--out", out, *argv)
    assert code == 2 and message in err and err.startswith("tinytune dpo: error:"), err
    assert not out.exists()


def test_on_a_preset_with_a_tokenizer(root, tmp_path, capsys):
    code, _, err = run(capsys, "reward", "llama-tiny", root / "prefs.jsonl", "--out", tmp_path / "a")
    assert code == 2 and "--tokenizer" in err and "llama-tiny" in err
    code, stdout, err = run(capsys, "dpo", "llama-tiny", root / "prefs.jsonl", "--tokenizer", root / "tok",
                            "--steps", 1, "--batch-size", 3, "--out", tmp_path / "b")
    assert code == 0, err
    assert "last step: rewards/accuracies" in stdout
    assert (tmp_path / "b" / "adapter" / "adapter_model.safetensors").is_file()


def test_sigint_saves_a_checkpoint_and_the_printed_command_resumes(root, tmp_path, capsys, monkeypatch):
    """As finetune's (tests/test_cli_errors.py does it in a subprocess): a real SIGINT during training, sent
    here by a step callback, exits 130 with one line naming the checkpoint and the command that finishes."""
    from tinytune.cli import preference

    def dpo_interrupted_after_step_1(*args, **kwargs):
        kill = lambda step, history: step == 1 and os.kill(os.getpid(), signal.SIGINT)
        return tt.rlhf.dpo(*args, callbacks=[kill], **kwargs)

    out = tmp_path / "run"
    argv = ["dpo", root / "ckpt", root / "prefs.jsonl", "--out", out, "--steps", 3, "--batch-size", 2,
            "--log-every", 1]
    with monkeypatch.context() as patch:
        patch.setattr(preference, "train_dpo", dpo_interrupted_after_step_1)
        code, _, err = run(capsys, *argv)
    assert code == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinytune dpo: interrupted by SIGINT at step 1;"), err
    checkpoint = lines[0].split("checkpoint saved to ")[1].split("; resume with: ")[0]
    command = shlex.split(lines[0].split("; resume with: ")[1])
    assert command[-2:] == ["--resume", checkpoint] and "dpo" in command
    code, stdout, err = run(capsys, *command[command.index("dpo"):])
    assert code == 0, err
    assert "after 3 steps (completed)" in stdout and "step 2/3" in stdout and "step 1/3" not in stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
