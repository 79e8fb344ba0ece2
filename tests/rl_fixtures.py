"""What the RL learning tests share: the letter-shift task's dense reward and a briefly SFT'd demo base."""
import tempfile
from pathlib import Path

import tinytune as tt
from tinytune.cli import demo, demo_data


def letters(prompts, completions, answer, **_):
    """The share of letters in place, minus 0.5 for a wrong length: verifiable and dense."""
    return [sum(x == y for x, y in zip(c.strip(), a)) / len(a) - 0.5 * (len(c.strip()) != len(a))
            for c, a in zip(completions, answer)]


def sft_on_shift(cache, monkeypatch, merge: bool):
    """The demo's cached base after 15 steps of LoRA SFT on the letter-shift task (exact match ~5%), the
    adapter merged into the base when `merge`: (model, tokenizer, train records, held-out records)."""
    monkeypatch.setenv("TINYTUNE_CACHE", str(cache))
    model, tok = demo.base_model(dict(demo.FULL), use_cache=True, quick=False)
    train, held_out = demo_data.shift_task(400, 60)
    with tempfile.TemporaryDirectory() as tmp:
        sft = tt.data.load_instructions(demo_data.write_jsonl(Path(tmp, "i.jsonl"), train), tok,
                                        template=demo_data.TEMPLATE)
    tt.seed_everything(0)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=16, alpha=32, targets="all-linear"))
    tt.train.fit(model, sft, tt.train.TrainConfig(lr=5e-3, steps=15, batch_size=16, log_every=1000))
    if merge:
        tt.lora.merge_and_unload(model)
    return model, tok, train, held_out


def shift_prompts(tok, records) -> list[dict]:
    """Prompt examples (`prompt_ids`, `answer`) of letter-shift records, in the demo's template."""
    return [{"prompt_ids": tok.encode(demo_data.TEMPLATE.prompt(r["instruction"], r["input"])), "answer": r["output"]}
            for r in records]
