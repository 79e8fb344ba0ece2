"""The `tinytune ppo` command: reward functions or a reward model on the same base, outputs, config files,
resume, refusals (named, nothing written)."""
import hashlib
import json

import pytest
import torch

import tinytune as tt
from text_fixtures import run_cli, write_cli_inputs, write_jsonl

REWARDS = "def short(prompts, completions, **_):\n    return [-float(len(c)) for c in completions]\n"


def run(capsys, *argv):
    return run_cli(capsys, *argv)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A one-layer llama-tiny checkpoint with a character tokenizer, a prompt file, a reward module and a
    reward model (a non-zero LoRA adapter and head) saved from that same checkpoint."""
    root = tmp_path_factory.mktemp("cli_ppo")
    write_cli_inputs(root)
    write_jsonl(root / "prompts.jsonl", [{"prompt": f"Reverse {w}:", "answer": w[::-1]}
                                         for w in ["abc", "hello", "xyz", "tiny"]])
    (root / "ppo_cli_rewards.py").write_text(REWARDS)
    base, _ = tt.load_pretrained(root / "ckpt")
    tt.seed_everything(0)
    tt.lora.apply(base, tt.lora.LoraConfig(rank=2, targets="all-linear"), adapter_name="reward")
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("lora_B_reward"):
                p.normal_(0, 0.05)
    rm = tt.rlhf.RewardModel(base, adapter_name="reward")
    with torch.no_grad():
        rm.score.weight.normal_(0, 0.5)
    rm.set_statistics(0.1, 2.0)
    tt.rlhf.save_reward_model(rm, root / "rm")
    return root


@pytest.fixture(autouse=True)
def rewards_importable(root, monkeypatch):
    monkeypatch.syspath_prepend(str(root))


def _common(root, out, *extra, reward=("--reward", "ppo_cli_rewards:short")):
    return [root / "ckpt", root / "prompts.jsonl", *reward, "--out", out, "--steps", 2, "--batch-size", 2,
            "--max-new-tokens", 3, "--ppo-epochs", 1, "--log-every", 1, "--rank", 2, *extra]


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_ppo_with_reward_functions_writes_an_adapter_a_value_model_and_score_and_kl(root, tmp_path, capsys):
    out = tmp_path / "ppo"
    code, stdout, err = run(capsys, "ppo", *_common(root, out, "--lr", 1e-3, "--kl-estimator", "k3"))
    assert code == 0, err
    assert "final loss:" in stdout and "after 2 steps" in stdout and "mean score first step" in stdout
    assert "rewards ppo_cli_rewards:short" in stdout and "value model:" in stdout
    records = _records(out)
    assert len(records) == 2 and all("score" in r and "kl" in r and "value_loss" in r for r in records)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    assert (out / "checkpoints").is_dir()
    model = tt.load_adapter(tt.load_pretrained(root / "ckpt")[0], out / "adapter")
    assert dict(tt.lora.lora_layers(model))
    value = tt.rlhf.ValueModel(tt.load_pretrained(root / "ckpt")[0])
    tt.load_adapter(value, out / "value_model")
    assert dict(tt.lora.lora_layers(value))


def test_ppo_with_a_reward_model_on_the_same_base_leaves_it_unchanged(root, tmp_path, capsys):
    out = tmp_path / "ppo_rm"
    before = _digest(root / "rm")
    code, stdout, err = run(capsys, "ppo", *_common(root, out, "--no-normalize-reward", "--num-mini-batches", 2,
                                                    reward=("--reward-model", root / "rm")))
    assert code == 0, err
    assert f"reward model {root / 'rm'}" in stdout and "after 2 steps" in stdout
    assert _digest(root / "rm") == before
    assert all("score" in r and "kl" in r for r in _records(out))
    # the policy's adapter, not the reward model's: the saved head-less adapter loads onto the plain LM
    policy = tt.load_adapter(tt.load_pretrained(root / "ckpt")[0], out / "adapter")
    assert tt.lora.list_adapters(policy) == ["default"]
    # the value model started as the reward model (adapter and head) and trained from there
    rm = tt.rlhf.load_reward_model(tt.load_pretrained(root / "ckpt")[0], root / "rm")
    value = tt.rlhf.ValueModel(tt.load_pretrained(root / "ckpt")[0])
    tt.load_adapter(value, out / "value_model")
    assert value.score.weight.shape == rm.score.weight.shape


def test_a_config_file_and_flags_override_it(root, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "ppo.toml"
    config.write_text(f'checkpoint = "{root / "ckpt"}"\ndata = "{root / "prompts.jsonl"}"\nout = "{out}"\n'
                      '[train]\nsteps = 50\nbatch-size = 2\nlog-every = 1\n'
                      f'[ppo]\nreward-model = "{root / "rm"}"\nmax-new-tokens = 2\nppo-epochs = 1\n'
                      'kl-estimator = "k3"\nnormalize-reward = false\n[lora]\nrank = 2\n')
    code, stdout, err = run(capsys, "ppo", "--config", config, "--steps", 1, "--kl-estimator", "k1")
    assert code == 0, err
    assert "after 1 steps" in stdout and "kl k1 0.05" in stdout
    assert len(_records(out)) == 1
    config.write_text(config.read_text().replace("ppo-epochs = 1", "ppo-epochs = 0"))
    code, _, err = run(capsys, "ppo", "--config", config, "--out", tmp_path / "never")
    assert code == 2 and f"--config {config}: key 'ppo_epochs'" in err and not (tmp_path / "never").exists()


def test_defaults_are_ppo_configs(root):
    from tinytune.cli import build_parser
    from tinytune.cli.ppo import PPO_DEFAULTS, PPO_KEYS
    from tinytune.cli.options import resolve
    opts = resolve(build_parser().parse_args(["ppo", "ck", "p.jsonl"]), PPO_KEYS, PPO_DEFAULTS)
    cfg = tt.rlhf.PPOConfig()
    assert opts["lr"] == cfg.lr and opts["kl_coef"] == cfg.kl_coef and opts["normalize_reward"] is True
    assert opts["ppo_epochs"] == cfg.ppo_epochs and opts["kl_estimator"] == "k1"


FN = ["--reward", "ppo_cli_rewards:short"]


@pytest.mark.parametrize("argv, message", [
    (FN + ["--reward-model", "RM"], "--reward-model and --reward exclude each other"),
    ([], "--reward-model or --reward:"),
    (FN + ["--kl-estimator", "k2"], "--kl-estimator: unknown KL estimator 'k2'"),
    (FN + ["--batch-size", "2", "--num-mini-batches", "3"], "--num-mini-batches 3 exceeds --batch-size 2"),
    (["--reward-model", "no/such/rm"], "--reward-model: no such directory"),
    (["--reward-model", "CKPT"], "--reward-model CKPT: no reward_model.json"),
    (["--reward-model", "RM", "--reward-weights", "1"], "--reward-weights: only with --reward"),
    (FN + ["--gamma", "1.5"], "--gamma must be"),
    (FN + ["--cliprange", "0"], "--cliprange must be"),
    (FN + ["--ppo-epochs", "0"], "--ppo-epochs must be"),
    (FN + ["--reward-weights", "1,2"], "--reward-weights: expected 1"),
    (FN + ["--method", "ia3"], "--method ia3: ppo keeps"),
    (FN + ["--grad-checkpointing"], "--grad-checkpointing: not with ppo"),
    (["--reward", "no_such_module_xyz:f"], "--reward: reward function 'no_such_module_xyz:f'"),
])
def test_bad_ppo_options_are_named_and_nothing_is_written(root, tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    argv = [str(root / "rm") if a == "RM" else str(root / "ckpt") if a == "CKPT" else a for a in argv]
    message = message.replace("CKPT", str(root / "ckpt"))
    code, _, err = run(capsys, "ppo", root / "ckpt", root / "prompts.jsonl", "--out", out, *argv)
    assert code == 2 and message in err and err.startswith("tinytune ppo: error:") and err.count("\n") == 1, err
    assert not out.exists()


def test_a_reward_model_of_another_checkpoint_is_refused_naming_reward_model(root, tmp_path, capsys):
    other = tmp_path / "wide"
    tt.save_pretrained(tt.models.build("llama-tiny", vocab_size=tt.load_pretrained(root / "ckpt")[0].config.vocab_size,
                                       num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=2,
                                       intermediate_size=64),
                       other, tokenizer=tt.load_pretrained(root / "ckpt")[1])
    out = tmp_path / "never"
    code, _, err = run(capsys, "ppo", other, root / "prompts.jsonl", "--reward-model", root / "rm", "--out", out,
                       "--steps", 1, "--batch-size", 2, "--max-new-tokens", 2)
    assert code == 2 and err.startswith(f"tinytune ppo: error: --reward-model {root / 'rm'}:") and "hidden_size" in err
    assert not out.exists()


def test_resume_continues_from_the_latest_checkpoint(root, tmp_path, capsys):
    out = tmp_path / "ppo"
    code, _, err = run(capsys, "ppo", *_common(root, out, "--steps", 1))
    assert code == 0, err
    code, _, err = run(capsys, "ppo", *_common(root, out, "--steps", 1))  # a fresh start would overwrite the run
    assert code == 2 and "pass --resume" in err
    code, stdout, err = run(capsys, "ppo", *_common(root, out, "--resume", "--steps", 2))
    assert code == 0, err
    assert "after 2 steps" in stdout and "step 2/2" in stdout and "step 1/2" not in stdout
    assert len(_records(out)) == 2
