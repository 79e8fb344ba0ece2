"""The classic RLHF path on one small base, then GRPO on a verifiable task: SFT -> reward model -> PPO -> GRPO.

The base is the `tinytune demo` model (a character-level `llama-tiny` pre-trained on generated instruction
records, cached under $TINYTUNE_CACHE: about 20 s on 2 CPU cores the first time; nothing is downloaded).

(a) SFT: 15 LoRA steps on the demo's new instruction, "Shift letters: abcd" -> "bcde" (the recipe of
    tests/test_grpo_learning.py). The adapter is then *merged* into the base: the SFT model becomes the frozen
    base that every PPO role shares, so PPO's reference (every adapter off) is the SFT model, as in
    InstructGPT. A copy of the unmerged SFT model is kept for GRPO (d), which continues that adapter.
(b) A reward model (`tt.rlhf.train_reward_model`, LoRA adapter "reward" on a copy of the same base, the head
    trained whole) learns a known rule from rankings built here: for "Repeat: <word>", the word in capitals
    beats the word half in capitals beats the word as it is (preference_tuning.py's rule, *capitals are
    better*). It is saved with `save_reward_model` and loaded back onto the PPO base with
    `load_reward_model(base, dir, adapter_name="reward")`.
(c) PPO (`tt.rlhf.ppo`) on "Repeat: <word>" prompts against that reward model, every role on the one base:
    a fresh "policy" adapter, a "value" adapter + head that ppo starts from the reward model's, the reward
    adapter (frozen) and the reference = adapters off. Printed: the reward model's mean (normalised) score
    of the policy's greedy answers to held-out prompts before and after, the KL to the reference, examples.
(d) GRPO (`tt.rlhf.grpo`) on the letter-shift task with a verifiable per-letter reward: held-out exact match
    before and after.

Every number is printed on a line of its own as `RESULT <name> <before> -> <after>` or `RESULT <name> <value>`
(tests/test_examples.py parses them).

    python examples/rlhf.py [--quick]     # --quick: a barely pre-trained base and a few steps (tests)
"""
import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

import tinytune as tt
from tinytune.cli import demo, demo_data

SEED = 0
FULL = dict(words=300, sft_steps=15, rm_steps=40, ppo_steps=40, ppo_batch=16, ppo_epochs=4, grpo_steps=80,
            group_size=8, grpo_batch=8, n_shift_train=400, n_shift_eval=60)
QUICK = dict(words=24, sft_steps=2, rm_steps=3, ppo_steps=2, ppo_batch=8, ppo_epochs=1, grpo_steps=2,
             group_size=4, grpo_batch=4, n_shift_train=16, n_shift_eval=8)


def result(name: str, *values: float) -> None:
    """One parseable line: `RESULT name before -> after` or `RESULT name value`."""
    print(f"RESULT {name} " + " -> ".join(f"{v:.4f}" for v in values))


def prompt_ids(tok, instruction: str, word: str) -> list[int]:
    return tok.encode(demo_data.TEMPLATE.prompt(instruction, word))


@torch.no_grad()
def greedy(model, tok, instruction: str, words: list[str]) -> list[str]:
    """Greedy answers to `instruction word` (the words are equally long: one batch, no padding)."""
    ids = torch.tensor([prompt_ids(tok, instruction, w) for w in words])
    out = tt.generate(model.eval(), ids, max_new_tokens=8, eos_token_id=tok.eos_token_id)
    return [tok.decode(row, skip_special_tokens=True).strip() for row in out[:, ids.shape[1]:].tolist()]


def capitals_ranking(word: str) -> list[str]:
    """Best first: the word in capitals, half in capitals, as it is (the rule: more capitals is better)."""
    return [word.upper(), word[: len(word) // 2].upper() + word[len(word) // 2:], word]


@torch.no_grad()
def rm_score(base, rm, tok, words: list[str], answers: list[str]) -> float:
    """The reward model's mean normalised score of `answers` to "Repeat: <word>" (scored as training scored
    completions: prompt + answer + EOS), with its adapter on the shared base."""
    rows = [prompt_ids(tok, "Repeat:", w) + tok.encode(a, add_special_tokens=False) + [tok.eos_token_id]
            for w, a in zip(words, answers)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with tt.rlhf.use_adapter(base, "reward"):
        return float(tt.rlhf.normalized_scores(rm, ids, mask).mean())


def letters(prompts, completions, answer, **_):
    """GRPO's verifiable reward (tests/test_grpo_learning.py): the share of letters in place, minus 0.5 for a
    wrong length; dense, so a policy at ~5% exact match still gets a signal."""
    return [sum(x == y for x, y in zip(c.strip(), a)) / len(a) - 0.5 * (len(c.strip()) != len(a))
            for c, a in zip(completions, answer)]


def sft(model, tok, train: list[dict], steps: int, tmp: str):
    """(a) LoRA SFT on the letter-shift task (rank 16, lr 5e-3: the GRPO learning test's recipe)."""
    rows = tt.data.load_instructions(demo_data.write_jsonl(Path(tmp, "sft.jsonl"), train), tok,
                                     template=demo_data.TEMPLATE)
    tt.seed_everything(SEED)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=16, alpha=32, targets="all-linear"))
    history = tt.train.fit(model, rows, tt.train.TrainConfig(lr=5e-3, steps=steps, batch_size=16, log_every=1000,
                                                             seed=SEED))
    result("sft_loss", history.losses[0], history.losses[-1])


def reward_model(base, tok, words: list[str], steps: int, tmp: str) -> Path:
    """(b) Train a reward model on a copy of `base` (adapter "reward"), save it; returns its directory."""
    cut = len(words) * 4 // 5
    records = [{"prompt": f"Repeat: {w}", "ranked": capitals_ranking(w)} for w in words]
    load = lambda rs, name: tt.data.load_preferences(demo_data.write_jsonl(Path(tmp, f"{name}.jsonl"), rs), tok,
                                                     template=demo_data.TEMPLATE)
    train, held_out = load(records[:cut], "rm_train"), load(records[cut:], "rm_held_out")
    tt.seed_everything(SEED)
    rm = tt.rlhf.RewardModel(copy.deepcopy(base), adapter_name="reward")  # the same weights as the PPO base
    tt.lora.apply(rm, tt.lora.LoraConfig(rank=8, alpha=16, targets="all-linear"), adapter_name="reward")
    cfg = tt.rlhf.RewardConfig(lr=3e-3, steps=steps, batch_size=16, log_every=1000, seed=SEED)
    before = tt.rlhf.evaluate_reward_model(rm, held_out, cfg)
    tt.rlhf.train_reward_model(rm, train, cfg, eval_pairs=held_out)
    after = tt.rlhf.evaluate_reward_model(rm, held_out, cfg)
    print(f"reward model: {len(train)} training rankings (e.g. {records[0]}), {len(held_out)} held-out")
    result("rm_pairwise_accuracy", before["accuracy"], after["accuracy"])
    return tt.rlhf.save_reward_model(rm, Path(tmp, "reward_model"))


def ppo(base, tok, rm_dir: Path, words: list[str], n: dict) -> None:
    """(c) PPO on "Repeat: <word>" against the saved reward model, every role on `base`."""
    cut = len(words) * 4 // 5
    train_words, test_words = words[:cut], words[cut:]
    tt.seed_everything(SEED)
    tt.lora.apply(base, tt.lora.LoraConfig(rank=8, alpha=16, targets="all-linear"), adapter_name="policy")
    rm = tt.rlhf.load_reward_model(base, rm_dir, adapter_name="reward")  # beside "policy", which stays active
    before_answers = greedy(base, tok, "Repeat:", test_words)
    before = rm_score(base, rm, tok, test_words, before_answers)
    prompts = [{"prompt_ids": prompt_ids(tok, "Repeat:", w)} for w in train_words]
    steps = n["ppo_steps"]
    cfg = tt.rlhf.PPOConfig(steps=steps, batch_size=n["ppo_batch"], ppo_epochs=n["ppo_epochs"], max_new_tokens=6,
                            lr=2e-3, kl_coef=0.05,
                            stop_token_ids=[tok.eos_token_id], missing_eos_penalty=1.0,
                            log_every=max(steps // 4, 1), seed=SEED)
    start = time.perf_counter()
    history = tt.rlhf.ppo(base, prompts, rm, cfg, tokenizer=tok)
    seconds = time.perf_counter() - start
    print(f"ppo: adapters on the base {tt.lora.list_adapters(base)}; {steps} steps in {seconds:.1f} s")
    after_answers = greedy(base, tok, "Repeat:", test_words)
    after = rm_score(base, rm, tok, test_words, after_answers)
    first, last = history.metrics[0], history.metrics[-1]
    result("ppo_rm_score", before, after)
    result("ppo_train_score", first["score"], last["score"])
    result("ppo_kl", first["kl"], last["kl"])
    caps = lambda answers: sum(a.isupper() for a in answers) / len(answers)
    result("ppo_capitals_share", caps(before_answers), caps(after_answers))
    for w, a, b in list(zip(test_words, before_answers, after_answers))[:5]:
        print(f"  'Repeat: {w}': {a!r} -> {b!r}")


def grpo(model, tok, train: list[dict], held_out: list[dict], n: dict) -> None:
    """(d) GRPO on the letter-shift task, continuing the SFT adapter (the GRPO learning test's recipe)."""
    before, _ = demo.exact_match(model, tok, held_out)
    prompts = [{"prompt_ids": prompt_ids(tok, r["instruction"], r["input"]), "answer": r["output"]} for r in train]
    steps = n["grpo_steps"]
    cfg = tt.rlhf.GRPOConfig(group_size=n["group_size"], max_new_tokens=6, batch_size=n["grpo_batch"], steps=steps,
                             lr=2e-3, log_every=max(steps // 4, 1), stop_token_ids=[tok.eos_token_id], seed=SEED)
    start = time.perf_counter()
    history = tt.rlhf.grpo(model, prompts, letters, cfg, tokenizer=tok)
    print(f"grpo: {steps} steps in {time.perf_counter() - start:.1f} s")
    after, got = demo.exact_match(model, tok, held_out)
    result("grpo_exact_match", before, after)
    result("grpo_train_reward", history.metrics[0]["reward"], history.metrics[-1]["reward"])
    for r, a in list(zip(held_out, got))[:5]:
        print(f"  'Shift letters: {r['input']}' -> {a!r} (expected {r['output']!r})")


def main(quick: bool = False) -> None:
    start, n = time.perf_counter(), QUICK if quick else FULL
    base, tok = demo.base_model(dict(demo.QUICK if quick else demo.FULL), use_cache=True, quick=quick)
    shift_train, shift_held_out = demo_data.shift_task(n["n_shift_train"], n["n_shift_eval"])
    words = demo_data.random_words(n["words"], seed=11)
    with tempfile.TemporaryDirectory() as tmp:
        sft(base, tok, shift_train, n["sft_steps"], tmp)
        grpo_model = copy.deepcopy(base)  # the SFT model with its adapter, for (d)
        tt.lora.merge_and_unload(base)  # (a) merged: the SFT model is the frozen base of every PPO role
        rm_dir = reward_model(base, tok, words, n["rm_steps"], tmp)
        ppo(base, tok, rm_dir, words, n)
    grpo(grpo_model, tok, shift_train, shift_held_out, n)
    result("seconds", time.perf_counter() - start)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a barely pre-trained base, a few steps (tests)")
    main(parser.parse_args().quick)
