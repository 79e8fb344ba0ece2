"""The command-line day end to end on a one-layer llama-tiny: finetune a classifier with --eval-data,
interrupt it, refuse a fresh start into its --out, resume it to the end, `eval` it; then a causal-LM LoRA
adapter through `generate` and `merge`. Each output is compared with the library call it stands for."""
import io
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch

import tinytune as tt
from text_fixtures import interrupt_after_first_step, run_cli, write_cli_inputs, write_jsonl
from tinytune.cli import main

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
ENV.pop("TINYTUNE_TRACEBACK", None)
TRAIN = ["abc", "bad", "cab", "dab", "ace", "bee", "fig", "gem", "xyz", "yak", "zap", "wax", "vow", "tux", "rug", "sun"]
DEV = ["add", "egg", "hat", "owl", "toy", "win"]
STEPS = 4


def _label(word: str) -> str:
    return "early" if word < "m" else "late"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_day")
    write_cli_inputs(root)
    write_jsonl(root / "train.jsonl", [{"text": w, "label": _label(w)} for w in TRAIN])
    write_jsonl(root / "dev.jsonl", [{"text": w, "label": _label(w)} for w in DEV])
    return root


def _classifier_argv(root, out):
    return ["finetune", root / "ckpt", root / "train.jsonl", "--task", "classification", "--eval-data",
            root / "dev.jsonl", "--eval-every", 2, "--save-every", 1, "--steps", STEPS, "--batch-size", 4,
            "--grad-accum", 2, "--lr", 1e-2, "--log-every", 1, "--out", out]


def _interrupt_after_first_step(argv) -> subprocess.CompletedProcess:
    """Run `python -m tinytune ARGV` and send SIGINT once it logged step 1 (a checkpoint is written every step)."""
    return interrupt_after_first_step(argv, ENV)


@pytest.fixture(scope="module")
def classifier_run(root):
    """The classifier run: interrupted (a subprocess), then a re-run without --resume and one with it (in
    this process); returns --out, the interrupted process and (exit code, stdout, stderr) of the other two."""
    out = root / "clf_run"
    interrupted = _interrupt_after_first_step(_classifier_argv(root, out))
    capture = pytest.MonkeyPatch()
    runs = []
    for extra in ([], ["--resume"]):
        stdout, stderr = io.StringIO(), io.StringIO()
        capture.setattr(sys, "stdout", stdout)
        capture.setattr(sys, "stderr", stderr)
        try:
            code = main([str(a) for a in _classifier_argv(root, out) + extra])
        finally:
            capture.undo()
        runs.append((code, stdout.getvalue(), stderr.getvalue()))
    return out, interrupted, runs[0], runs[1]


def test_an_interrupted_classifier_is_refused_without_resume_and_resumed_with_it(root, classifier_run):
    out, interrupted, again, resumed = classifier_run
    assert interrupted.returncode == 130, interrupted.stderr
    assert interrupted.stdout.startswith("world size 1; global batch 4 x 2 x 1 = 8 examples per step\n")
    assert "tinytune finetune: interrupted by SIGINT at step " in interrupted.stderr
    code, stdout, err = again  # a fresh start into the interrupted run's --out
    assert code == 2 and stdout == ""
    assert f"--out {out} already holds checkpoints of a run" in err and "pass --resume to continue it" in err
    code, stdout, err = resumed
    assert code == 0, err
    assert f"after {STEPS} steps (completed)" in stdout and "step 1/" not in stdout
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # each step once: nothing of the interrupted session repeated
    task = json.loads((out / "adapter" / "tinytune_task.json").read_text())
    assert task["labels"] == ["early", "late"] and task["id2label"] == {"0": "early", "1": "late"}
    card = (out / "adapter" / "README.md")
    assert card.is_file() and "train.jsonl" in card.read_text()


def _classifier(root, adapter):
    decoder, tok = tt.load_pretrained(root / "ckpt")
    model = tt.load_adapter(tt.models.SequenceClassifier(decoder, 2), adapter)
    return model, tok


def test_eval_prints_what_tt_train_evaluate_returns(root, classifier_run, capsys):
    out = classifier_run[0]
    code, stdout, err = run_cli(capsys, "eval", root / "ckpt", "--adapter", out / "adapter", "--data",
                                root / "dev.jsonl", "--batch-size", 4, "--json")
    assert code == 0, err
    printed = json.loads(stdout)  # stdout is one JSON object (the world line went to stderr)
    assert err.startswith("world size 1; global batch 4 x 1 = 4 examples")
    model, tok = _classifier(root, out / "adapter")
    data = tt.data.load_classification(root / "dev.jsonl", tok, labels=["early", "late"])
    cfg = tt.train.TrainConfig(task="classification", batch_size=4, pad_token_id=tok.pad_token_id)
    expected = tt.train.evaluate(model, data, cfg)
    if not isinstance(expected, dict):  # the loss alone: evaluate does not return the task's metrics yet
        assert printed["loss"] == pytest.approx(expected, rel=1e-6)
        pytest.xfail("tt.train.evaluate returns a float here, not the metrics dict of issue 13")
    assert {"loss", "accuracy", "macro_f1"} <= set(printed)
    assert printed == pytest.approx(expected, rel=1e-6, abs=1e-9)  # same numbers, in JSON
    code, stdout, _ = run_cli(capsys, "eval", root / "ckpt", "--adapter", out / "adapter", "--data", root / "dev.jsonl")
    lines = dict(line.split(" ", 1) for line in stdout.strip().splitlines()[1:])
    assert float(lines["accuracy"]) == pytest.approx(expected["accuracy"], abs=1e-5)


@pytest.fixture(scope="module")
def lora_adapter(root):
    out = root / "lm_run"
    code = main([str(a) for a in ["finetune", root / "ckpt", root / "data.jsonl", "--rank", 4, "--steps", 3,
                                  "--batch-size", 2, "--lr", 5e-2, "--out", out]])
    assert code == 0
    return out / "adapter"


def test_generate_greedy_equals_tt_generate(root, lora_adapter, capsys):
    prompt = "Reverse. abc\n"
    code, stdout, err = run_cli(capsys, "generate", root / "ckpt", "--adapter", lora_adapter, "--prompt", prompt,
                                "--max-new-tokens", 8)
    assert code == 0, err
    model, tok = tt.load_pretrained(root / "ckpt")
    tt.load_adapter(model, lora_adapter)
    ids = torch.tensor([tok.encode(prompt)])
    new = tt.generate(model, ids, max_new_tokens=8, eos_token_id=tok.eos_token_ids)[0, ids.shape[1]:].tolist()
    end = next((i for i, t in enumerate(new) if t in tok.eos_token_ids), len(new))
    assert stdout == tok.decode(new[:end], skip_special_tokens=True) + "\n"


def test_merge_writes_a_checkpoint_with_the_adapters_logits(root, lora_adapter, tmp_path, capsys):
    code, _, err = run_cli(capsys, "merge", root / "ckpt", lora_adapter, tmp_path / "merged")
    assert code == 0, err
    adapted, _ = tt.load_pretrained(root / "ckpt")
    tt.load_adapter(adapted, lora_adapter)
    base, _ = tt.load_pretrained(root / "ckpt")
    merged, tok = tt.load_pretrained(tmp_path / "merged")
    assert tok is not None  # the tokenizer's files were written with it
    ids = torch.tensor([[1, 40, 41, 42, 7, 9]])
    with torch.no_grad():
        want, plain = _logits(adapted(ids)), _logits(base(ids))
        assert not torch.allclose(want, plain, atol=1e-4)  # the adapter changes the output: the test can fail
        torch.testing.assert_close(_logits(merged(ids)), want, atol=1e-5, rtol=0)  # fp32
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        torch.testing.assert_close(hf(ids).logits, want, atol=1e-5, rtol=0)


def _logits(output):
    """Logits of a forward pass, whether the model returns a tensor or an output object."""
    return output if isinstance(output, torch.Tensor) else output.logits


def test_the_resume_command_printed_on_interrupt_names_this_run(classifier_run):
    interrupted = classifier_run[1]
    command = interrupted.stderr.strip().split("; resume with: ")[1]
    assert shlex.split(command)[-2] == "--resume" and "clf_run/checkpoints/step-" in command


def test_generate_batches_prompts_and_chats_through_the_chat_template(root, lora_adapter, tmp_path, capsys):
    """Two prompts of unequal length (one left-padded batch) print what each prints alone; a --chat file goes
    through tt.data.chat_prompt_ids (chatml: the character tokenizer has no chat template of its own)."""
    first, second = "abc", "Reverse. hello\n"
    alone = []
    for prompt in (first, second):
        code, stdout, err = run_cli(capsys, "generate", root / "ckpt", "--adapter", lora_adapter, "--prompt", prompt,
                                    "--max-new-tokens", 6)
        assert code == 0, err
        alone.append(stdout[:-1])
    code, stdout, err = run_cli(capsys, "generate", root / "ckpt", "--adapter", lora_adapter, "--prompt", first,
                                "--prompt", second, "--max-new-tokens", 6)
    assert code == 0, err
    assert stdout == f"--- 1 ---\n{alone[0]}\n--- 2 ---\n{alone[1]}\n"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    (tmp_path / "chat.json").write_text(json.dumps(messages))
    code, stdout, err = run_cli(capsys, "generate", root / "ckpt", "--adapter", lora_adapter, "--chat",
                                tmp_path / "chat.json", "--max-new-tokens", 6, "--json")
    assert code == 0, err
    model, tok = tt.load_pretrained(root / "ckpt")
    tt.load_adapter(model, lora_adapter)
    ids = torch.tensor([tt.data.chat_prompt_ids(tok, messages)])
    assert tok.decode(ids[0].tolist()).startswith("<s><|im_start|>system\nBe brief.<|im_end|>")
    new = tt.generate(model, ids, max_new_tokens=6, eos_token_id=tok.eos_token_ids)[0, ids.shape[1]:].tolist()
    end = next((i for i, t in enumerate(new) if t in tok.eos_token_ids), len(new))
    assert json.loads(stdout) == {"prompt": messages, "completion": tok.decode(new[:end], skip_special_tokens=True)}
