"""Benchmark: one DPO step and one reward-model step, tinytune vs TRL, on the same weights and data.

Setup (issue 11, point 7): the `llama-30m` preset (random weights, written once with
`tinytune.save_pretrained` and loaded by both libraries in fp32 from that directory), LoRA rank 16 /
alpha 32 / dropout 0.05 on every linear layer except the head, 8 preference pairs of random token ids
(prompt 128 + completion 128 = 256 tokens per sequence, so 16 sequences of 256 tokens per step; ids
avoid 0, the pad id, and no row is padded), AdamW (torch's, lr 1e-4) over the trainable parameters.
One step = forward (policy and, for DPO, the adapter-disabled reference) + loss + backward + AdamW step
+ zero_grad; tokens/s = 16 * 256 / median step time.

tinytune: DPO `tt.lora.apply` on the loaded `CausalLM`, `tt.rlhf.preference_batch` of the pairs, then
`tt.rlhf.dpo_batch_loss(model, batch, beta=0.1)` (reference = the same model with its adapter disabled,
under no_grad; completion log-probs chunked from the hidden states, never the (B, T, V) logits). RM:
`tt.rlhf.RewardModel(backbone)` + LoRA, `r = rm(input_ids, attention_mask)`,
`tt.rlhf.reward_loss(r[chosen], r[rejected])`.

TRL (the path its users take): `trl.DPOTrainer` / `trl.RewardTrainer` built on
`transformers.AutoModelForCausalLM` / `AutoModelForSequenceClassification(num_labels=1)` loaded from the same
directory, with `peft_config=peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
target_modules="all-linear")` (task_type "CAUSAL_LM" / "SEQ_CLS"), so the trainer itself calls
`get_peft_model` (and, for DPO, patches TRL's fused LM head in first). Configs: fp32, no reporting, no
saving, batch 8, max_length 256, padding_free False, precompute_ref_log_probs False, beta 0.1, loss
"sigmoid", and `disable_dropout=False` (TRL's default True would zero the LoRA dropout, a different
computation from tinytune's). The trainers get a one-row placeholder text dataset (a word-level
tokenizer made here, since the random checkpoint has none); the timed batch is the same token ids as
tinytune's, collated by the trainer's own `data_collator` (TRL's `DataCollatorForPreference`). Timed:
`trainer.training_step(trainer.model, batch)` (Trainer's step: `compute_loss` + `accelerator.backward`,
with `current_gradient_accumulation_steps = 1` set as `Trainer.train` would) + torch AdamW step + zero_grad.
The RM score head: tinytune's `score.weight` (seeded N(0, 0.02)) is copied into HF's `score` before LoRA,
so both sides start from identical weights and the same first loss. TRL 1.16's DPO already computes the
log-probs with its own chunked fused LM head (`trl.trainer.utils.add_fused_lm_head`; on CPU over every
position, with entropy / mean-logit / top-1 extras for its metrics), so neither DPO side holds (B, T, V) logits.

Speed: all variants live in one process; after `--warmup` rounds, `--rounds` rounds run one step of each
variant in turn (the order rotates every round); the median is kept. Peak memory: a fresh subprocess per
variant (`--memory-runs` of them, interleaved; the median is kept) builds the step, resets the resident-set
high-water mark and reports VmHWM minus the resident set before the first of 3 steps
(`tinytune.ops.PeakMemory`), as `train_step.py` does.

Writes `benchmarks/results/preference_cpu.json` and `preference_cpu.png` beside it (see benchmarks/common.py for
`--out`, `--quick`, `--threads` and `--replot`).
Usage: python benchmarks/preference.py [--quick] [--repeats N] [--warmup N] [--memory-runs N] [--threads N]
       [--out PATH] [--replot]
(`--memory-runs 0` re-measures speed only, keeping the peak-memory figures of the JSON at the output path, or
reporting none when there is no such file.)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import tinytune as tt  # noqa: E402
from charts import preference_chart as chart  # noqa: E402
from common import (add_common_args, fill_defaults, machine_info, median_run, output_path, peak_of_three,  # noqa: E402
                    print_table, replot, setup_threads, worker_env, write_checkpoint, write_results)

RANK, ALPHA, DROPOUT, LR, BETA = 16, 32, 0.05, 1e-4, 0.1
PAD = 0  # the pad id of both sides; the random ids never use it
TARGETS = {"dpo": {"speed": 1.4, "memory": 0.5}, "rm": {"speed": 1.3, "memory": 0.6}}
VARIANTS = [("tinytune", "dpo"), ("trl", "dpo"), ("tinytune", "rm"), ("trl", "rm")]
LABEL = {"tinytune": "tinytune", "trl": "TRL", "dpo": "DPO step", "rm": "reward-model step"}


def preference_pairs(pairs: int, prompt_len: int, completion_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """`pairs` random {prompt_ids, chosen_ids, rejected_ids} (lists of ids in [1, vocab))."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": ids(prompt_len), "chosen_ids": ids(completion_len), "rejected_ids": ids(completion_len)}
            for _ in range(pairs)]


def score_weight(hidden: int) -> torch.Tensor:
    """(1, hidden) the RM head both sides start from: N(0, 0.02), as HF initialises it, seeded."""
    return torch.randn(1, hidden, generator=torch.Generator().manual_seed(1)) * 0.02


def tinytune_batch(data: list[dict]) -> dict:
    """The pairs as `load_preferences` examples, collated by `tt.rlhf.preference_batch`."""
    examples = [{"prompt_ids": d["prompt_ids"], "completion_ids": [d["chosen_ids"], d["rejected_ids"]],
                 "chosen": [0], "rejected": [1], "margin": [None], "group": i} for i, d in enumerate(data)]
    return tt.rlhf.preference_batch(examples, pad_id=PAD)


def _optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)


def tinytune_step(task: str, ckpt: str, data: list[dict]):
    """A closure running one tinytune DPO / RM step; returns the detached loss."""
    model, _ = tt.load_pretrained(ckpt, dtype=torch.float32)
    lora = tt.lora.LoraConfig(rank=RANK, alpha=ALPHA, dropout=DROPOUT, targets="all-linear")
    if task == "rm":
        model = tt.rlhf.RewardModel(model)
        with torch.no_grad():
            model.score.weight.copy_(score_weight(model.config.hidden_size))
    tt.lora.apply(model, lora)
    model.train()
    batch, opt = tinytune_batch(data), _optimizer(model)

    def step() -> torch.Tensor:
        if task == "dpo":
            loss, _ = tt.rlhf.dpo_batch_loss(model, batch, beta=BETA)
        else:
            r = model(batch["input_ids"], batch["attention_mask"])  # (16,)
            loss = tt.rlhf.reward_loss(r[batch["chosen"]], r[batch["rejected"]])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def word_tokenizer():
    """A 4-word tokenizer for the placeholder dataset the trainers insist on (the checkpoint has none)."""
    import tokenizers
    import transformers
    vocab = {"<pad>": PAD, "<eos>": 1, "<unk>": 2, "a": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def _trl_args(config_cls, out: str, seq_len: int):
    common = dict(output_dir=out, report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
                  bf16=False, fp16=False, per_device_train_batch_size=8, max_length=seq_len, disable_dropout=False,
                  dataloader_num_workers=0, seed=0)
    if config_cls.__name__ == "DPOConfig":
        common.update(beta=BETA, loss_type=["sigmoid"], padding_free=False, precompute_ref_log_probs=False)
    return config_cls(**common)


def trl_trainer(task: str, ckpt: str, seq_len: int):
    """`trl.DPOTrainer` / `trl.RewardTrainer` with LoRA on a transformers model loaded from `ckpt`."""
    import datasets
    import peft
    import transformers
    import trl
    out = str(Path(ckpt) / f"trl_{task}")  # nothing is saved there (save_strategy "no")
    placeholder = datasets.Dataset.from_dict({"prompt": ["a"], "chosen": [" a"], "rejected": [" a a"]})
    if task == "dpo":
        model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        cls, cfg, task_type = trl.DPOTrainer, trl.DPOConfig, "CAUSAL_LM"
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(ckpt, num_labels=1,
                                                                                dtype=torch.float32)
        with torch.no_grad():
            model.score.weight.copy_(score_weight(model.config.hidden_size))
        cls, cfg, task_type = trl.RewardTrainer, trl.RewardConfig, "SEQ_CLS"
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules="all-linear",
                           task_type=task_type)
    return cls(model=model, args=_trl_args(cfg, out, seq_len), train_dataset=placeholder,
               processing_class=word_tokenizer(), peft_config=lora)


def trl_step(task: str, ckpt: str, data: list[dict]):
    """A closure running one TRL trainer step (`training_step` + AdamW + zero_grad); returns the loss."""
    seq_len = len(data[0]["prompt_ids"]) + len(data[0]["chosen_ids"])
    with contextlib.redirect_stdout(io.StringIO()):  # the trainers' dataset progress bars and notices
        trainer = trl_trainer(task, ckpt, seq_len)
    rows = data if task == "dpo" else [{"chosen_ids": d["prompt_ids"] + d["chosen_ids"],
                                        "rejected_ids": d["prompt_ids"] + d["rejected_ids"]} for d in data]
    trainer.current_gradient_accumulation_steps = 1  # what `Trainer.train` sets before its first step
    batch = trainer.data_collator(rows)  # (16, 256): the 8 chosen rows, then the 8 rejected ones
    model = trainer.model
    opt = _optimizer(model)

    def step() -> torch.Tensor:
        loss = trainer.training_step(model, dict(batch))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def make_step(lib: str, task: str, ckpt: str, data: list[dict]):
    return (tinytune_step if lib == "tinytune" else trl_step)(task, ckpt, data)


def worker(args) -> None:
    """In a fresh process: peak memory of 3 steps of one variant, as JSON on stdout."""
    lib, task = args.worker.split(",")
    print(json.dumps(peak_of_three(make_step(lib, task, args.ckpt, json.loads(Path(args.data).read_text())))))


def measure_memories(args, ckpt: str, data_file: str) -> dict:
    """`--memory-runs` fresh-process measurements per variant, interleaved; the median run of each."""
    runs = {v: [] for v in VARIANTS}
    for _ in range(args.memory_runs):
        for v in VARIANTS:
            cmd = [sys.executable, __file__, "--worker", ",".join(v), "--ckpt", ckpt, "--data", data_file]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=worker_env(args.threads)).stdout
            runs[v].append(json.loads(out.strip().splitlines()[-1]))
    return {v: median_run(runs[v]) for v in VARIANTS}


def previous_memory(path: Path, info: dict) -> dict:
    """`--memory-runs 0`: the peak-memory figures of the JSON already at `path` (speed is re-measured);
    `info["memory_from"]` records that run's date, load averages and memory-run count. {} without a file."""
    if not Path(path).is_file():
        return {}
    old = json.loads(Path(path).read_text())
    info["memory_from"] = {k: old["machine"].get(k) for k in ("date", "load_avg_before", "load_avg_after")} | \
        {"memory_runs": old["setup"]["memory_runs"]}
    rows = old["rows"]
    return {(r["lib"], r["task"]): {k: r[k] for k in ("peak_bytes", "peak_bytes_runs", "process_hwm_bytes")}
            for r in rows}


def measure_speed(args, ckpt: str, data: list[dict]) -> tuple[dict, dict]:
    """(step times per variant, first-step loss per variant), rounds interleaved with rotating order."""
    steps = {v: make_step(*v, ckpt, data) for v in VARIANTS}
    first = {v: steps[v]().item() for v in VARIANTS}  # the first step of each: the loss to compare
    times = {v: [] for v in VARIANTS}
    for r in range(args.warmup + args.rounds):
        for v in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
            start = time.perf_counter()
            steps[v]()
            if r >= args.warmup:
                times[v].append(time.perf_counter() - start)
    return times, first


def report(args, times: dict, memory: dict, first: dict) -> dict:
    tokens = args.pairs * 2 * (args.prompt + args.completion)
    rows = []
    for lib, task in VARIANTS:
        med = statistics.median(times[(lib, task)])
        rows.append({"variant": f"{LABEL[lib]} {LABEL[task]}", "lib": lib, "task": task, "median_step_s": med,
                     "tokens_per_s": tokens / med, "step_s": times[(lib, task)], "first_loss": first[(lib, task)]})
        if memory:
            rows[-1] |= {k: memory[(lib, task)][k] for k in ("peak_bytes", "peak_bytes_runs", "process_hwm_bytes")}
    by = {(r["lib"], r["task"]): r for r in rows}
    for r in rows:
        if r["lib"] == "tinytune":
            peer, target = by[("trl", r["task"])], TARGETS[r["task"]]
            r["speed_ratio"] = r["tokens_per_s"] / peer["tokens_per_s"]
            r["speed_target_met"] = r["speed_ratio"] >= target["speed"]
            if memory:
                r["memory_ratio"] = r["peak_bytes"] / peer["peak_bytes"]
                r["memory_target_met"] = r["memory_ratio"] <= target["memory"]
    setup = {"preset": args.preset, "pairs": args.pairs, "prompt_len": args.prompt, "completion_len": args.completion,
             "tokens_per_step": tokens, "rank": RANK, "alpha": ALPHA, "dropout": DROPOUT, "lr": LR, "beta": BETA,
             "targets": "all-linear except the head", "rounds": args.rounds, "warmup": args.warmup,
             "memory_runs": args.memory_runs or "0: the peak memory of an earlier run (see machine.memory_from)",
             "trl_path": "DPOTrainer / RewardTrainer .training_step + torch AdamW"}
    return {"setup": setup, "targets": TARGETS, "rows": rows, "ln2": math.log(2)}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, "--rounds", "timed rounds (default 7; --quick 2; quick: llama-tiny, 2 pairs of 16 + 16 tokens)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2; --quick 1)")
    p.add_argument("--memory-runs", type=int, default=None,
                   help="fresh processes per variant for peak memory, median (default 3; --quick 1); "
                        "0: keep the memory figures of the JSON at the output path")
    for flag in ("--worker", "--ckpt", "--data"):  # internal: the memory subprocess
        p.add_argument(flag, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    out = output_path("preference_cpu", args.out, args.quick)
    if args.replot:
        return replot(out, chart)
    args.threads = setup_threads(args.threads)
    if args.worker:
        return worker(args)
    args.preset, args.pairs, args.prompt, args.completion = ("llama-tiny", 2, 16, 16) if args.quick else \
        ("llama-30m", 8, 128, 128)
    fill_defaults(args, dict(rounds=7, warmup=2, memory_runs=3), dict(rounds=2, warmup=1, memory_runs=1))
    info = machine_info(args.threads, ("transformers", "peft", "trl", "datasets"))
    with tempfile.TemporaryDirectory() as ckpt:
        vocab = write_checkpoint(args.preset, ckpt)
        data = preference_pairs(args.pairs, args.prompt, args.completion, vocab)
        data_file = str(Path(ckpt) / "pairs.json")
        Path(data_file).write_text(json.dumps(data))
        memory = measure_memories(args, ckpt, data_file) if args.memory_runs else previous_memory(out, info)
        times, first = measure_speed(args, ckpt, data)
    info["load_avg_after"] = os.getloadavg()
    result = {"machine": info, **report(args, times, memory, first)}
    print_table(result, first_loss=True)
    write_results(out, result, chart)


if __name__ == "__main__":
    main()
