"""Reward-model and DPO training through `tt.train.fit` (issue 11, points 3 and 4): the per-task protocol,
losses against closed forms, accumulation, the reference, logged metrics, resume and refusals."""
import json
import math

import pytest
import torch

import tinytune as tt
from tinytune.rlhf import (DPOConfig, RewardConfig, RewardModel, collate_preferences, dpo, dpo_task,
                           grouped_reward_loss, precompute_reference, preference_accuracy, reward_task,
                           train_reward_model)

from text_fixtures import bpe_tokenizer, write_jsonl

CORPUS = ["the cat sat on the mat", "hello world, how are you?", "Paris is the capital of France"]
ROWS = [{"prompt": "the capital of France?", "chosen": " Paris", "rejected": " the mat"},
        {"prompt": "hello", "ranked": [" world", " how are you?", " cat sat"]},
        {"prompt": "the cat", "chosen": " sat on the mat", "rejected": " Paris", "margin": 0.5},
        {"prompt": "how are", "ranked": [" you?", " the capital", " mat", " hello"]}]


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer(CORPUS, vocab_size=256)


@pytest.fixture(scope="module")
def pairs(tok, tmp_path_factory):
    return tt.data.load_preferences(write_jsonl(tmp_path_factory.mktemp("pt") / "p.jsonl", ROWS), tok)


def _policy(tok, seed=0, lora_seed=0):
    model = tt.models.build("llama-tiny", vocab_size=tok.vocab_size, seed=seed)
    tt.seed_everything(lora_seed)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets="all-linear"))
    return model


def _rm(tok, seed=0):
    tt.seed_everything(seed)
    rm = RewardModel(tt.models.build("llama-tiny", vocab_size=tok.vocab_size, seed=seed))
    tt.lora.apply(rm, tt.lora.LoraConfig(rank=4, alpha=8, targets="all-linear"))
    return rm


QUIET = dict(log_every=1000, shuffle=False)


def test_reward_task_first_loss_is_the_grouped_bradley_terry_closed_form(tok, pairs):
    rm = _rm(tok)
    batch = collate_preferences(pairs, 0, "cpu")
    with torch.no_grad():
        r = rm(batch["input_ids"], batch["attention_mask"]).double()
    c, j, g = batch["chosen"], batch["rejected"], batch["pair_example"]
    margin = batch["margin"].double()
    per_pair = -torch.nn.functional.logsigmoid(r[c] - r[j] - margin) + 0.1 * (r[c] + r[j]) ** 2
    expected = torch.stack([per_pair[g == e].mean() for e in range(len(pairs))]).mean().item()  # groups first
    assert [int((g == e).sum()) for e in range(4)] == [1, 3, 1, 6]  # K(K-1)/2 pairs per ranking
    history = tt.train.fit(rm, pairs, RewardConfig(steps=1, batch_size=4, lr=1e-9, center_coef=0.1, **QUIET))
    assert history.losses[0] == pytest.approx(expected, abs=1e-6)
    acc = ((r[c] > r[j]).double() + 0.5 * (r[c] == r[j]).double()).mean().item()
    assert history.metrics[0]["accuracy"] == pytest.approx(acc, abs=1e-9)


@pytest.mark.parametrize("make, task", [(_rm, reward_task()), (_policy, dpo_task(beta=0.2))])
def test_accumulation_and_batch_size_give_the_same_step(tok, pairs, make, task):
    """2 micro-batches of 2 examples == 1 batch of 4: the loss is divided by the whole step's count (the
    later steps' losses agree too, so the updates did; AdamW's sign-like first update makes a direct
    weight comparison meaningless where a gradient is ~0)."""
    runs = []
    for bs, accum in ((4, 1), (2, 2)):
        model = make(tok)
        cfg = tt.train.TrainConfig(task=task, steps=3, batch_size=bs, grad_accum=accum, lr=1e-2, **QUIET)
        h = tt.train.fit(model, pairs, cfg)
        runs.append((h.losses, h.metrics))
    (l1, m1), (l2, m2) = runs
    assert l1 == pytest.approx(l2, abs=1e-5) and l1[-1] != l1[0]
    for step in range(3):
        for key in m1[0]:
            assert m1[step][key] == pytest.approx(m2[step][key], abs=1e-4), (step, key)


def test_dpo_first_loss_is_ln2_and_trl_metrics_are_logged(tok, pairs, tmp_path):
    model = _policy(tok)
    cfg = DPOConfig(steps=3, batch_size=2, lr=1e-2, out_dir=tmp_path / "run", eval_every=1, **QUIET)
    h = dpo(model, pairs, cfg, eval_pairs=pairs)
    assert h.losses[0] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0: the policy is its reference
    assert h.metrics[0]["rewards/margins"] == 0.0 and h.metrics[0]["rewards/chosen"] == 0.0
    assert h.losses[-1] < h.losses[0] and h.eval_metrics[-1]["rewards/margins"] > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected"}
    assert keys <= set(records[0]) and "eval_rewards/margins" in records[1]


def test_precomputed_reference_trains_exactly_as_the_per_batch_one(tok, pairs):
    runs = [dpo(_policy(tok), pairs, DPOConfig(steps=3, batch_size=2, lr=1e-2, precompute_ref=p, **QUIET)).losses
            for p in (False, True)]
    assert runs[0] == pytest.approx(runs[1], abs=1e-5)
    ref = precompute_reference(_policy(tok), pairs, DPOConfig(batch_size=3))
    assert [len(e["ref_logps"]) for e in ref] == [2, 3, 2, 4] and "ref_logps" not in pairs[0]  # copies


def test_the_reference_is_the_base_checked_against_a_frozen_copy(tok, pairs):
    """After training, the per-batch reference equals a separate, never-adapted copy of the base."""
    base = tt.models.build("llama-tiny", vocab_size=tok.vocab_size, seed=0).eval()
    model = _policy(tok)
    dpo(model, pairs, DPOConfig(steps=2, batch_size=4, lr=1e-2, **QUIET))
    batch = collate_preferences(pairs, 0, "cpu")
    ref = tt.rlhf.reference_logprobs(model.eval(), batch)
    with torch.no_grad():
        frozen = tt.rlhf.completion_logprobs(base, batch)
    assert torch.allclose(ref, frozen, atol=1e-5)
    assert not torch.allclose(tt.rlhf.completion_logprobs(model, batch).detach(), frozen, atol=1e-3)
    after = preference_accuracy(model, pairs)
    assert after["accuracy"] > 0.5 and after["margin"] > 0


@pytest.mark.parametrize("loss_type, extra", [("ipo", {}), ("hinge", {}), ("simpo", {"beta": 2.0}),
                                              ("sigmoid", {"label_smoothing": 0.2})])
def test_every_loss_type_trains(tok, pairs, loss_type, extra):
    h = dpo(_policy(tok), pairs, DPOConfig(steps=3, batch_size=4, lr=1e-2, loss_type=loss_type, **extra, **QUIET))
    assert all(math.isfinite(x) for x in h.losses) and h.losses[-1] < h.losses[0], h.losses


def test_reward_model_training_calibrates_its_statistics(tok, pairs):
    rm = _rm(tok)
    h = train_reward_model(rm, pairs, RewardConfig(steps=4, batch_size=4, lr=1e-2, **QUIET), eval_pairs=pairs)
    scores = tt.rlhf.score_completions(rm, pairs, tt.train.TrainConfig())
    assert scores.shape == (11,)
    assert rm.reward_mean.item() == pytest.approx(scores.double().mean().item(), abs=1e-5)
    assert rm.reward_std.item() == pytest.approx(scores.double().std().item(), abs=1e-5)
    metrics = tt.rlhf.evaluate_reward_model(rm, pairs)
    assert h.eval_metrics[-1]["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-9)
    assert h.eval_metrics[-1]["margin"] == pytest.approx(metrics["margin"], abs=1e-5)


def test_resume_continues_exactly_and_other_dpo_settings_are_refused(tok, pairs, tmp_path):
    whole = dpo(_policy(tok), pairs, DPOConfig(steps=4, batch_size=2, lr=1e-2, **QUIET)).losses
    out = tmp_path / "run"
    dpo(_policy(tok), pairs, DPOConfig(steps=2, batch_size=2, lr=1e-2, out_dir=out, **QUIET))
    resumed = dpo(_policy(tok, lora_seed=5), pairs, DPOConfig(steps=4, batch_size=2, lr=1e-2, out_dir=out, resume=True,
                                                         **QUIET))
    assert resumed.losses == pytest.approx(whole, abs=1e-6)
    with pytest.raises(ValueError, match="beta"):
        dpo(_policy(tok), pairs, DPOConfig(steps=6, batch_size=2, lr=1e-2, beta=0.5, out_dir=out, resume=True,
                                           **QUIET))


def test_refusals_name_the_offending_thing(tok, pairs):
    plain = tt.models.build("llama-tiny", vocab_size=tok.vocab_size, seed=0)
    with pytest.raises(ValueError, match="adapter disabled"):
        dpo(plain, pairs, DPOConfig(steps=1))
    with pytest.raises(ValueError, match=r"pairs\[1\].*completion_ids"):
        dpo(_policy(tok), [pairs[0], {**pairs[1], "completion_ids": [[5]]}], DPOConfig(steps=1))
    with pytest.raises(ValueError, match=r"pairs\[0\].*two different completion indices"):
        dpo(_policy(tok), [{**pairs[0], "chosen": [0], "rejected": [0]}], DPOConfig(steps=1))
    with pytest.raises(ValueError, match=r"pairs\[0\].*'margin' must hold one finite number"):
        dpo(_policy(tok), [{**pairs[0], "margin": ["big"]}], DPOConfig(steps=1))
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="leave it unset"):
        DPOConfig(task="classification")
    with pytest.raises(TypeError, match="DPOConfig"):
        dpo(_policy(tok), pairs, tt.train.TrainConfig())
    with pytest.raises(ValueError, match="center_coef"):
        RewardConfig(center_coef=-1)
    with pytest.raises(ValueError, match="tt.train.Task"):
        tt.train.TrainConfig(task="reward")
    with pytest.raises(ValueError, match="one score per row"):  # a causal LM is not a reward model
        tt.train.fit(_policy(tok), pairs, tt.train.TrainConfig(task=reward_task(), steps=1, **QUIET))


def _marker_pairs(n, seed, marker=" cat"):
    """Rows whose chosen completion contains `marker` and whose rejected one does not."""
    import random
    rnd = random.Random(seed)
    words = [" the", " mat", " hello", " world", " how", " are", " you", " Paris", " is", " capital", " of"]
    rows = []
    for _ in range(n):
        body = [rnd.choice(words) for _ in range(4)]
        good = list(body)
        good[rnd.randrange(4)] = marker
        rows.append({"prompt": "".join(rnd.choice(words) for _ in range(3)), "chosen": "".join(good),
                     "rejected": "".join(rnd.choice(words) for _ in range(4))})
    return rows


def test_reward_model_learns_a_marker_word_rule_fast(tok, tmp_path):
    """Fast sibling of the slow learning test: ~5 s on 2 cores; held-out accuracy 1.0 measured (seed 0)."""
    train = tt.data.load_preferences(write_jsonl(tmp_path / "t.jsonl", _marker_pairs(96, 0)), tok)
    test = tt.data.load_preferences(write_jsonl(tmp_path / "e.jsonl", _marker_pairs(64, 1)), tok)
    rm = _rm(tok)
    before = tt.rlhf.evaluate_reward_model(rm, test)["accuracy"]
    train_reward_model(rm, train, RewardConfig(steps=30, batch_size=16, lr=1e-2, log_every=1000))
    after = tt.rlhf.evaluate_reward_model(rm, test)
    assert after["accuracy"] >= 0.9 and after["accuracy"] - before >= 0.2, (before, after)


def test_sft_weight_adds_the_mean_nll_of_the_chosen_tokens(tok, pairs):
    """RPO / TRL's ["sigmoid", "sft"]: loss + w * (-sum of chosen-token log-probs / chosen tokens), from logits."""
    model = _policy(tok)
    batch = collate_preferences(pairs, 0, "cpu")
    plain, _ = tt.rlhf.dpo_batch_loss(model, batch)
    with_sft, metrics = tt.rlhf.dpo_batch_loss(model, batch, sft_weight=0.5)
    logp = torch.log_softmax(model(batch["input_ids"]).double(), -1)[:, :-1]
    token_lp = logp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = (batch["labels"][:, 1:] != -100).double()
    c = batch["chosen"]
    nll = -(token_lp[c] * mask[c]).sum() / mask[c].sum()
    assert metrics["sft_nll"] == pytest.approx(nll.item(), rel=1e-5)
    assert with_sft.item() == pytest.approx(plain.item() + 0.5 * nll.item(), rel=1e-5)
    with pytest.raises(ValueError, match="sft_weight"):
        DPOConfig(sft_weight=-1.0)
