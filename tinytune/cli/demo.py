"""`tinytune demo`: the whole fine-tuning story offline, on a tiny model, in a minute or two on a CPU.

1. a base model: `llama-tiny` with a character tokenizer, pre-trained (all parameters) with `fit` on
   generated instruction records (repeat a word, capitals, the next letter of one letter...), cached under
   $TINYTUNE_CACHE (default ~/.cache/tinytune);
2. a task it has not seen: replace each letter of a word by the next one (`load_instructions` with the
   demo's compact `InstructionTemplate`, loss on the response only);
3. exact match (greedy `tt.generate`) on held-out words before and after a LoRA fine-tune.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from .. import data as ttdata
from ..models import build, generate, load_pretrained, save_pretrained
from ..peft import count_parameters, lora, save_adapter
from ..seeding import seed_everything
from ..train import TrainConfig, fit
from . import demo_data
from .options import CLIError
from .setup import check_out_dir, where_line

FULL = dict(pretrain_steps=500, docs=20000, steps=150, n_train=400, n_eval=100)
QUICK = dict(pretrain_steps=4, docs=64, steps=3, n_train=16, n_eval=4)
SEED = 0  # the pre-training run, the LoRA init and the fine-tuning run
MODEL = dict(hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=2)


def cache_dir(quick: bool) -> Path:
    """Where the pre-trained base lives: $TINYTUNE_CACHE or ~/.cache/tinytune, then demo-base[-quick]."""
    root = Path(os.environ.get("TINYTUNE_CACHE") or Path.home() / ".cache" / "tinytune")
    return root / ("demo-base-v3-quick" if quick else "demo-base-v3")


def pretrain(where: Path, sizes: dict, out=print):
    """Build the base model, pre-train every parameter on generated text, save it (+ tokenizer) to `where`."""
    tok = demo_data.char_tokenizer()
    model = build("llama-tiny", vocab_size=tok.vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, **MODEL)
    with tempfile.TemporaryDirectory() as tmp:  # scored on the responses: that is where the skills are
        text = demo_data.write_jsonl(Path(tmp) / "pretrain.jsonl", demo_data.pretraining_records(sizes["docs"]))
        rows = ttdata.load_instructions(text, tok, demo_data.TEMPLATE)
    out(f"pre-training the base model ({count_parameters(model).total:,} parameters, all trained) for "
        f"{sizes['pretrain_steps']} steps on {len(rows)} generated examples of {len(demo_data.PRETRAIN_TASKS) + 1} "
        f"string tasks (about 20 s on 2 CPU cores, once)")
    cfg = TrainConfig(lr=3e-3, steps=sizes["pretrain_steps"], batch_size=32, warmup_steps=20 if sizes["pretrain_steps"] > 40 else 0,
                      schedule="cosine", log_every=50, seed=SEED)  # build() seeds the weights itself
    history = fit(model, rows, cfg)
    out(f"pre-training loss {history.losses[0]:.3f} -> {history.losses[-1]:.3f}, {history.tokens_per_s:,.0f} tokens/s")
    save_pretrained(model, where, tokenizer=tok)
    return load_pretrained(where)


def base_model(sizes: dict, use_cache: bool, quick: bool, out=print):
    """The cached base (model, tokenizer), pre-training it first when there is none or `use_cache` is False."""
    where = cache_dir(quick)
    if use_cache and (where / "config.json").is_file() and (where / "tokenizer.json").is_file():
        out(f"base model: cached in {where} (--no-cache pre-trains again)")
        return load_pretrained(where)
    return pretrain(where, sizes, out)


@torch.no_grad()
def predictions(model, tok, records: list[dict]) -> list[str]:
    """Greedy answers to each record's prompt (batched by prompt length, so no padding is needed)."""
    prompts = [tok.encode(demo_data.TEMPLATE.prompt(r["instruction"], r["input"])) for r in records]
    groups = defaultdict(list)
    for i, ids in enumerate(prompts):
        groups[len(ids)].append(i)
    answers = [""] * len(records)
    for length, rows in groups.items():
        ids = generate(model.eval(), torch.tensor([prompts[i] for i in rows]), max_new_tokens=8,
                       eos_token_id=tok.eos_token_id)
        for i, row in zip(rows, ids[:, length:].tolist()):
            answers[i] = tok.decode([t for t in row if t != tok.pad_token_id], skip_special_tokens=True).strip()
    return answers


def exact_match(model, tok, records: list[dict]) -> tuple[float, list[str]]:
    """(fraction of records answered exactly, the answers)."""
    answers = predictions(model, tok, records)
    return sum(a == r["output"] for a, r in zip(answers, records)) / len(records), answers


def _fresh_run_dir(out_dir: Path) -> Path:
    """out_dir/run, or run-2, run-3, ... when an earlier demo into the same --out left its checkpoints there."""
    run, n = out_dir / "run", 1
    while (run / "checkpoints").exists():
        n += 1
        run = out_dir / f"run-{n}"
    return run


def run_demo(steps: int | None = None, out: str | None = None, use_cache: bool = True, quick: bool = False,
             print_fn=print) -> dict:
    """Run the demo; returns {"before", "after", "adapter", "loss_curve", "tokens_per_s"}.

    Raises:
        CLIError: `steps` not an int >= 1, or an `out` that cannot be a directory (checked before any work).
    """
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise CLIError(f"--steps must be an int >= 1, got {steps!r}")
    start, sizes = time.perf_counter(), dict(QUICK if quick else FULL)
    sizes["steps"] = steps or sizes["steps"]
    out_dir = check_out_dir(out) if out else Path(tempfile.mkdtemp(prefix="tinytune-demo-"))
    model, tok = base_model(sizes, use_cache, quick, print_fn)
    train, held_out = demo_data.shift_task(sizes["n_train"], sizes["n_eval"])
    train_file = demo_data.write_jsonl(out_dir / "data" / "shift_train.jsonl", train)
    demo_data.write_jsonl(out_dir / "data" / "shift_eval.jsonl", held_out)
    examples = ttdata.load_instructions(train_file, tok, demo_data.TEMPLATE)
    print_fn(f"\ntask: {demo_data.TASK!r} ({len(examples)} training words, {len(held_out)} held-out words, "
             f"template {demo_data.TEMPLATE.prompt_input!r})")
    before, _ = exact_match(model, tok, held_out)
    print_fn(f"exact match before fine-tuning: {before:.0%}")
    seed_everything(SEED)  # LoRA's A is drawn here, before fit seeds: every demo run starts from the same adapter
    lora.apply(model, lora.LoraConfig(rank=16, alpha=32, dropout=0.0, targets="all-linear"))
    print_fn("\nLoRA rank 16 on all linear layers:\n" + str(count_parameters(model)))
    cfg = TrainConfig(lr=5e-3, steps=sizes["steps"], batch_size=16, out_dir=_fresh_run_dir(out_dir), seed=SEED,
                      log_every=25, schedule="cosine", warmup_steps=10 if sizes["steps"] > 20 else 0, save_every=0)
    history = fit(model, examples, cfg)
    after, answers = exact_match(model, tok, held_out)
    adapter = save_adapter(model, out_dir / "adapter")
    print_fn(f"\nexact match before -> after: {before:.0%} -> {after:.0%} on {len(held_out)} held-out words")
    print_fn(f"training: {history.step} steps, loss {history.losses[0]:.3f} -> {history.losses[-1]:.3f}, "
             f"{history.tokens_per_s:,.0f} tokens/s")
    print_fn(f"adapter: {adapter}\n{where_line(cfg.out_dir)}")
    print_fn("generations:")
    for record, answer in list(zip(held_out, answers))[:5]:
        mark = "ok" if answer == record["output"] else f"expected {record['output']!r}"
        print_fn(f"  {record['input']!r} -> {answer!r}  ({mark})")
    print_fn(f"done in {time.perf_counter() - start:.0f} s")
    return {"before": before, "after": after, "adapter": adapter, "loss_curve": cfg.out_dir / "loss.png",
            "tokens_per_s": history.tokens_per_s}
