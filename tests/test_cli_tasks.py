"""`tinytune finetune --task classification | ner`, `eval`, `generate` and `merge`: every bad flag or input is
one line naming the flag (or file) and what was expected, exit status 2, before anything is written."""
import json

import pytest

from text_fixtures import run_cli, write_cli_inputs, write_jsonl
from tinytune.cli import main

WORDS = ["abc", "bad", "cab", "dab", "xyz", "yak", "zap", "wax"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The CLI tests' one-layer llama-tiny checkpoint, classification and NER files, and a prompt adapter."""
    root = tmp_path_factory.mktemp("cli_tasks")
    write_cli_inputs(root)
    write_jsonl(root / "clf.jsonl", [{"text": w, "label": "early" if w < "m" else "late"} for w in WORDS])
    write_jsonl(root / "ner.jsonl", [{"tokens": [w, "is", "here"], "tags": ["B-X", "O", "O"]} for w in WORDS])
    code = main([str(a) for a in _finetune(root, root / "prompt_run", "--method", "prompt",
                                           "--num-virtual-tokens", 2)])
    assert code == 0
    return root


def _finetune(root, out, *extra, data="data.jsonl"):
    return ["finetune", root / "ckpt", root / data, "--out", out, "--steps", 1, "--batch-size", 2, *extra]


def _error(err: str, command: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"tinytune {command}: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("extra, data, fragments", [
    (["--task", "ner"], "clf.jsonl", ["DATA", "clf.jsonl: no labels found in field 'tags'",
                                            '--task ner reads records {"tokens"']),
    (["--task", "classification"], "ner.jsonl", ["DATA", "no labels found in field 'label'",
                                                        "--task classification reads records"]),
    (["--task", "classification", "--labels", "early,,late"], "clf.jsonl", ["--labels", "an empty label name"]),
    (["--task", "classification", "--labels", "early,early"], "clf.jsonl", ["--labels", "['early'] given twice"]),
    (["--task", "classification", "--labels", "early"], "clf.jsonl", ["--labels", "at least two labels"]),
    (["--task", "classification", "--labels", "early,middle"], "clf.jsonl", ["clf.jsonl:", "unknown label 'late'"]),
    (["--labels", "a,b"], "data.jsonl", ["--labels: only for --task classification or ner"]),
    (["--task", "poems"], "data.jsonl", ["--task: unknown task 'poems'", "'classification', 'ner'"]),
    (["--eval-every", "2"], "data.jsonl", ["--eval-every 2: there is nothing to evaluate; give --eval-data"]),
    (["--eval-every", "-1", "--eval-data", "x.jsonl"], "data.jsonl", ["--eval-every must be an integer >= 0"]),
    (["--save-every", "-2"], "data.jsonl", ["--save-every must be an integer >= 0"]),
    (["--eval-data", "missing.jsonl"], "data.jsonl", ["--eval-data: file not found: missing.jsonl"]),
    (["--task", "classification", "--method", "prompt"], "clf.jsonl", ["--method prompt with --task classification"]),
    (["--report-to", "tensorboard,comet"], "data.jsonl", ["--report-to: unknown tracker 'comet'"]),
    (["--progress", "fancy"], "data.jsonl", ["--progress: unknown mode 'fancy'", "'lines'"]),
    (["--steps", "0"], "data.jsonl", ["--steps must be an int >= 1"]),
    (["--task", "classification", "--template", "llama3"], "clf.jsonl", ["--template llama3: --task classification"]),
])
def test_finetune_task_errors(root, tmp_path, capsys, extra, data, fragments):
    code, out, err = run_cli(capsys, *_finetune(root, tmp_path / "run", *extra, data=data))
    assert code == 2 and out == ""
    _error(err, "finetune", *fragments)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_non_empty_out_that_is_no_run_is_refused(root, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / "photos").mkdir()
    code, _, err = run_cli(capsys, *_finetune(root, tmp_path))
    assert code == 2
    _error(err, "finetune", f"--out {tmp_path} is not empty and is not a tinytune run: it holds notes.txt, photos")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "photos"]


def test_a_run_without_checkpoints_is_never_mixed_with_a_new_one(root, tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    for resume in ([], ["--resume"]):
        code, _, err = run_cli(capsys, *_finetune(root, tmp_path, *resume))
        assert code == 2
        _error(err, "finetune", f"--out {tmp_path} holds an earlier run (metrics.jsonl) but no checkpoint")
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_merge_refuses_a_prompt_tuning_adapter(root, tmp_path, capsys):
    code, _, err = run_cli(capsys, "merge", root / "ckpt", root / "prompt_run" / "adapter", tmp_path / "merged")
    assert code == 2
    _error(err, "merge", "a PROMPT_TUNING adapter", "does not fold into the weights", "tinytune generate")
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_an_existing_non_empty_out(root, tmp_path, capsys):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}\n")
    code, _, err = run_cli(capsys, "merge", root / "ckpt", root / "prompt_run" / "adapter", tmp_path / "merged")
    assert code == 2
    _error(err, "merge", f"OUT {tmp_path / 'merged'} is not empty")
    assert (tmp_path / "merged" / "config.json").read_text() == "{}\n"


@pytest.mark.parametrize("argv, fragments", [
    (["--prompt", "a", "--chat", "c.json"], ["exactly one of --prompt TEXT, --prompts", "--prompt and --chat"]),
    ([], ["exactly one of", "got none"]),
    (["--prompt", "a", "--max-new-tokens", "0"], ["--max-new-tokens must be an integer >= 1"]),
    (["--prompt", "a", "--top-p", "1.5"], ["--top-p must be"]),
    (["--prompt", "a", "--template", "vicuna"], ["--template: unknown template 'vicuna'"]),
    (["--chat", "missing.json"], ["--chat: file not found: missing.json"]),
])
def test_generate_errors(root, capsys, argv, fragments):
    code, _, err = run_cli(capsys, "generate", root / "ckpt", *argv)
    assert code == 2
    _error(err, "generate", *fragments)


def test_eval_errors(root, tmp_path, capsys):
    adapter = root / "prompt_run" / "adapter"
    code, _, err = run_cli(capsys, "eval", root / "ckpt", "--adapter", tmp_path / "nope", "--data", root / "data.jsonl")
    assert code == 2
    _error(err, "eval", f"--adapter: no such directory: {tmp_path / 'nope'}")
    code, _, err = run_cli(capsys, "eval", root / "ckpt", "--adapter", adapter, "--data", root / "clf.jsonl",
                           "--task", "classification", "--labels", "early,late")
    assert code == 2
    _error(err, "eval", "--task classification: the adapter", "was trained for --task instructions")
    code, _, err = run_cli(capsys, "eval", root / "ckpt", "--adapter", adapter, "--data", root / "data.jsonl",
                           "--batch-size", 0)
    assert code == 2
    _error(err, "eval", "--batch-size must be an integer >= 1")
    task = json.loads((adapter / "tinytune_task.json").read_text())
    assert task["task"] == "instructions" and "labels" not in task


def test_ner_trains_a_token_classifier_and_eval_reads_its_tags(root, tmp_path, capsys):
    import tinytune as tt
    code, stdout, err = run_cli(capsys, *_finetune(root, tmp_path / "ner", "--task", "ner", "--labels", "O,B-X",
                                                   "--eval-data", root / "ner.jsonl", data="ner.jsonl"))
    assert code == 0, err
    assert "held-out: loss" in stdout
    task = json.loads((tmp_path / "ner" / "adapter" / "tinytune_task.json").read_text())
    assert task["task"] == "ner" and task["labels"] == ["O", "B-X"]  # --labels order, not sorted
    code, stdout, err = run_cli(capsys, "eval", root / "ckpt", "--adapter", tmp_path / "ner" / "adapter", "--data",
                                root / "ner.jsonl", "--json")
    assert code == 0, err
    printed = json.loads(stdout)
    decoder, tok = tt.load_pretrained(root / "ckpt")
    model = tt.load_adapter(tt.models.TokenClassifier(decoder, 2, label_names=["O", "B-X"]), tmp_path / "ner" / "adapter")
    data = tt.data.load_ner(root / "ner.jsonl", tok, ["O", "B-X"])
    cfg = tt.train.TrainConfig(task="token_classification", batch_size=8, pad_token_id=tok.pad_token_id)
    expected = tt.train.evaluate(model, data, cfg)
    assert "entity_f1" in printed and printed == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_merge_refuses_a_classifier_adapter_before_loading(root, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "task_type": "SEQ_CLS"}\n')
    code, _, err = run_cli(capsys, "merge", root / "ckpt", adapter, tmp_path / "merged")
    assert code == 2
    _error(err, "merge", "a --task classification adapter (a classifier head)", "tinytune eval")
    assert not (tmp_path / "merged").exists()


def test_finetune_reports_to_tensorboard_with_progress_lines(root, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    code, out, _ = run_cli(capsys, *_finetune(root, tmp_path / "run", "--report-to", "tensorboard",
                                               "--progress", "lines", "--log-every", 1))
    assert code == 0 and "step 1/1" in out
    assert list((tmp_path / "run" / "runs").glob("**/events.out.tfevents.*"))  # TrainConfig's TensorBoard logger


def test_report_to_a_missing_package_is_a_user_error_before_loading(root, tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code, out, err = run_cli(capsys, *_finetune(root, tmp_path / "run", "--report-to", "wandb"))
    assert code == 2 and out == ""
    _error(err, "finetune", "--report-to wandb: the wandb package is not installed (pip install wandb)")
    assert not (tmp_path / "run").exists()


def test_a_resume_with_other_labels_or_another_lr_is_refused(root, tmp_path, capsys):
    run = tmp_path / "run"
    first = _finetune(root, run, "--task", "classification", "--save-every", 1, data="clf.jsonl")
    assert run_cli(capsys, *first)[0] == 0
    more = ["--steps", 2, "--resume"]
    code, _, err = run_cli(capsys, *first, *more, "--labels", "late,early")
    assert code == 2 and "labels" in err and "['early', 'late']" in err and "['late', 'early']" in err, err
    code, _, err = run_cli(capsys, *first, *more, "--lr", 1e-3)
    assert code == 2 and "lr=0.0002" in err and "lr=0.001" in err, err
    assert run_cli(capsys, *first, *more)[0] == 0  # the same settings resume
