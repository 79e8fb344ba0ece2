"""The `tinytune grpo` command: training, outputs, config files, reward functions from a module, errors."""
import json

import pytest

import tinytune as tt
from text_fixtures import run_cli, write_cli_inputs, write_jsonl

REWARDS = "def short(prompts, completions, **_):\n    return [-float(len(c)) for c in completions]\n"


def run(capsys, *argv):
    return run_cli(capsys, *argv)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A one-layer llama-tiny checkpoint with a character tokenizer, a prompt file and a reward module."""
    root = tmp_path_factory.mktemp("cli_grpo")
    write_cli_inputs(root)
    write_jsonl(root / "prompts.jsonl", [{"prompt": f"Reverse {w}:", "answer": w[::-1]}
                                         for w in ["abc", "hello", "xyz", "tiny"]])
    (root / "grpo_cli_rewards.py").write_text(REWARDS)
    return root


@pytest.fixture(autouse=True)
def rewards_importable(root, monkeypatch):
    monkeypatch.syspath_prepend(str(root))


def _common(root, out, *extra):
    return [root / "ckpt", root / "prompts.jsonl", "--reward", "grpo_cli_rewards:short", "--out", out,
            "--steps", 2, "--batch-size", 2, "--group-size", 2, "--max-new-tokens", 4, "--log-every", 1,
            "--rank", 2, *extra]


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_grpo_trains_and_writes_an_adapter_and_reward_metrics(root, tmp_path, capsys):
    out = tmp_path / "grpo"
    code, stdout, err = run(capsys, "grpo", *_common(root, out, "--lr", 1e-3))
    assert code == 0, err
    assert "final loss:" in stdout and "after 2 steps" in stdout and "mean reward first step" in stdout
    records = _records(out)
    assert len(records) == 2 and all("reward" in r and "rewards/short" in r for r in records)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    assert (out / "checkpoints").is_dir()
    model = tt.load_adapter(tt.load_pretrained(root / "ckpt")[0], out / "adapter")
    assert dict(tt.lora.lora_layers(model))


def test_a_config_file_and_flags_override_it(root, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "grpo.toml"
    config.write_text(f'checkpoint = "{root / "ckpt"}"\ndata = "{root / "prompts.jsonl"}"\nout = "{out}"\n'
                      '[train]\nsteps = 50\nbatch-size = 2\nlog-every = 1\n'
                      '[grpo]\nreward = ["grpo_cli_rewards:short"]\ngroup-size = 2\nmax-new-tokens = 3\n'
                      'loss-type = "grpo"\nbeta = 0.0\n[lora]\nrank = 2\n')
    code, stdout, err = run(capsys, "grpo", "--config", config, "--steps", 1, "--loss-type", "dr_grpo")
    assert code == 0, err
    assert "after 1 steps" in stdout and "(dr_grpo, 2 completions per prompt" in stdout
    assert len(_records(out)) == 1


def test_lr_default_is_grpo_configs(root):
    from tinytune.cli import build_parser
    from tinytune.cli.options import COMMAND_DEFAULTS, resolve
    from tinytune.cli.rl import GRPO_KEYS
    opts = resolve(build_parser().parse_args(["grpo", "ck", "p.jsonl"]), GRPO_KEYS, COMMAND_DEFAULTS["grpo"])
    assert opts["lr"] == tt.rlhf.GRPOConfig.lr and opts["loss_type"] == "dapo" and opts["beta"] == 0.0


@pytest.mark.parametrize("argv, message", [
    (["--reward", "no_such_module_xyz:f"], "--reward: reward function 'no_such_module_xyz:f'"),
    (["--reward", "grpo_cli_rewards:missing"], "'grpo_cli_rewards:missing'"),
    (["--reward", "grpo_cli_rewards:short", "--loss-type", "sigmoid"], "--loss-type: unknown loss type 'sigmoid'"),
    (["--reward", "grpo_cli_rewards:short", "--reward-weights", "1,2"], "--reward-weights: expected 1"),
    (["--reward", "grpo_cli_rewards:short", "--top-p", "0"], "--top-p must be"),
    (["--reward", "grpo_cli_rewards:short", "--group-size", "1"], "--group-size"),
    ([], "--reward: give at least one reward function"),
])
def test_bad_grpo_options_are_named_and_nothing_is_written(root, tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    code, _, err = run(capsys, "grpo", root / "ckpt", root / "prompts.jsonl", "--out", out, *argv)
    assert code == 2 and message in err and err.startswith("tinytune grpo: error:") and err.count("\n") == 1, err
    assert not out.exists()


def test_a_bad_prompt_row_is_one_line_naming_file_and_line(root, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"question": "b"}])
    out = tmp_path / "never"
    code, _, err = run(capsys, "grpo", root / "ckpt", bad, "--reward", "grpo_cli_rewards:short", "--out", out)
    assert code == 2 and err.startswith("tinytune grpo: error: DATA") and f"{bad}:2" in err
    assert not out.exists()
