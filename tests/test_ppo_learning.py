"""Issue 12's PPO learning tests on the demo's letter-shift instruction ("Shift letters: abcd" -> "bcde").

The demo's cached base gets 15 steps of LoRA SFT, merged into it: the SFT model is the frozen base of every
role and the reference (InstructGPT's recipe; with the SFT left in an adapter the reference would be the
pre-SFT base and the KL penalty would pull the policy back to it). PPO then trains a fresh "policy" adapter:
(a) against a programmatic per-letter reward, (b) against a reward model trained (issue 11) on the same base
as adapter "reward" to rank the correct shift above a one-letter slip above the unshifted word. Both raise
the held-out reward of greedy answers while the KL to the reference stays bounded.

Measured 2026-12-01 (AMD EPYC, 2 cores, torch 2.13 CPU, seed 0): (a) 50 steps: held-out per-letter reward
0.433 -> 0.583, exact match 0.05 -> 0.12, max KL 2.6 nats (27 s); 100 steps: 0.433 -> 0.679, exact match
0.05 -> 0.18, max KL 3.8 (earlier builds that rounded one ulp differently gave 0.746 / 0.25 and 0.854 / 0.50:
a sampled trajectory moves with the last bit, hence the margins). (b) kl_coef 0.3, 10 steps: reward-model
score of held-out greedy answers -0.16 -> 0.89 (normalised units), max KL 0.9; 30 steps: -> 3.34, max KL 3.9,
exact match 0.05 -> 0.0.
"""
import copy
import random
import tempfile
from pathlib import Path

import pytest
import torch
from rl_fixtures import letters, sft_on_shift, shift_prompts

import tinytune as tt
from tinytune.cli import demo, demo_data

PPO = dict(max_new_tokens=6, batch_size=16, lr=5e-4, kl_coef=0.05, log_every=1000)
# The reward model's normalised scores span several units, so the KL needs a heavier weight to stay bounded
RM_KL_COEF = 0.3


def _mean_letters(model, tok, records):
    exact, answers = demo.exact_match(model, tok, records)
    return sum(letters(None, answers, [r["output"] for r in records])) / len(records), exact


def _policy(model):
    tt.seed_everything(0)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=16, alpha=32, targets="all-linear"), adapter_name="policy")
    return model


def _ppo_programmatic(cache, monkeypatch, steps):
    model, tok, train, held_out = sft_on_shift(cache, monkeypatch, merge=True)
    before = _mean_letters(_policy(model), tok, held_out)
    cfg = tt.rlhf.PPOConfig(steps=steps, stop_token_ids=[tok.eos_token_id], **PPO)
    history = tt.rlhf.ppo(model, shift_prompts(tok, train), letters, cfg, tokenizer=tok)
    return before, _mean_letters(model, tok, held_out), history


def test_ppo_with_a_programmatic_reward_raises_it_with_bounded_kl_fast(full_demo, monkeypatch):
    (r0, e0), (r1, e1), history = _ppo_programmatic(full_demo[1], monkeypatch, 50)
    assert r1 - r0 >= 0.08, (r0, r1, e0, e1)
    assert max(m["kl"] for m in history.metrics) < 5.0  # nats per completion of <= 6 tokens
    assert history.metrics[0]["kl"] == 0.0  # the fresh policy adapter is the reference, bit for bit


@pytest.mark.slow
def test_ppo_with_a_programmatic_reward_raises_it_with_bounded_kl(full_demo, monkeypatch):
    (r0, e0), (r1, e1), history = _ppo_programmatic(full_demo[1], monkeypatch, 100)
    assert r1 - r0 >= 0.2 and e1 - e0 >= 0.1, (r0, r1, e0, e1)
    assert max(m["kl"] for m in history.metrics) < 8.0  # nats per completion of <= 6 tokens
    assert history.metrics[0]["kl"] == 0.0  # the fresh policy adapter is the reference, bit for bit


def _ranking(word: str, rng: random.Random) -> list[str]:
    """best -> worst: the shift, the shift with one letter wrong, the word as typed."""
    good = demo_data.shift(word)
    i = rng.randrange(len(good))
    slip = good[:i] + demo_data.next_letter(good[i]) + good[i + 1:]
    return [good, slip, word]


def _reward_model(model, tok, train, tmp: Path) -> Path:
    """A reward model on a copy of the SFT base (adapter "reward"), trained and saved as a user would."""
    rng = random.Random(0)
    rows = [{"prompt": r["input"], "ranked": _ranking(r["input"], rng)} for r in train]
    rows = [{**row, "prompt": demo_data.TEMPLATE.prompt(demo_data.TASK, row["prompt"])} for row in rows]
    pairs = tt.data.load_preferences(demo_data.write_jsonl(tmp / "rm.jsonl", rows), tok)
    tt.seed_everything(0)
    rm = tt.rlhf.RewardModel(copy.deepcopy(model), adapter_name="reward")
    tt.lora.apply(rm, tt.lora.LoraConfig(rank=8, alpha=16, targets="all-linear"), adapter_name="reward")
    tt.rlhf.train_reward_model(rm, pairs, tt.rlhf.RewardConfig(lr=3e-3, steps=60, batch_size=16, log_every=1000))
    return tt.rlhf.save_reward_model(rm, tmp / "reward_model")


def _rm_score(model, rm, tok, records):
    """The reward model's mean (normalised) score of the policy's greedy answers to `records`."""
    _, answers = demo.exact_match(model, tok, records)
    ids = [tok.encode(demo_data.TEMPLATE.prompt(r["instruction"], r["input"]) + a) + [tok.eos_token_id]
           for r, a in zip(records, answers)]
    width = max(len(i) for i in ids)
    batch = torch.tensor([i + [0] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    with tt.rlhf.use_adapter(rm.decoder, rm.adapter_name):
        return tt.rlhf.normalized_scores(rm, batch, mask).mean().item()


def _ppo_against_reward_model(cache, monkeypatch, steps, kl_coef=RM_KL_COEF):
    model, tok, train, held_out = sft_on_shift(cache, monkeypatch, merge=True)
    with tempfile.TemporaryDirectory() as tmp:
        rm_dir = _reward_model(model, tok, train, Path(tmp))
        _policy(model)
        rm = tt.rlhf.load_reward_model(model, rm_dir, adapter_name="reward")
    before = _rm_score(model, rm, tok, held_out), _mean_letters(model, tok, held_out)[1]
    cfg = tt.rlhf.PPOConfig(steps=steps, stop_token_ids=[tok.eos_token_id], **{**PPO, "kl_coef": kl_coef})
    history = tt.rlhf.ppo(model, shift_prompts(tok, train), rm, cfg, tokenizer=tok)
    return before, (_rm_score(model, rm, tok, held_out), _mean_letters(model, tok, held_out)[1]), history


def test_ppo_against_a_trained_reward_model_raises_its_score_fast(full_demo, monkeypatch):
    (s0, e0), (s1, e1), history = _ppo_against_reward_model(full_demo[1], monkeypatch, 10)
    assert s1 - s0 >= 0.3, (s0, s1, e0, e1)
    assert max(m["kl"] for m in history.metrics) < 5.0


@pytest.mark.slow
def test_ppo_against_a_trained_reward_model_raises_its_score(full_demo, monkeypatch):
    """The score rises by several of the reward model's standard deviations; exact match does not follow:
    the policy finds what this small reward model over-rates (reward hacking, docs/rlhf.md)."""
    (s0, e0), (s1, e1), history = _ppo_against_reward_model(full_demo[1], monkeypatch, 30)
    assert s1 - s0 >= 1.0, (s0, s1, e0, e1)
    assert max(m["kl"] for m in history.metrics) < 10.0
