"""tinytune.rlhf.RewardModel (issue 11, item 3): scores at the last real token, LoRA + head training,
preference batches, metrics, and the atomic, verified save of adapter + head + reward statistics."""
import json

import pytest
import torch

import tinytune as tt
from tinytune._manifest import IntegrityError
from tinytune.models.heads import hidden_states
from tinytune.rlhf import (RewardModel, load_reward_model, pairwise_metrics, preference_batch, reward_loss,
                           save_reward_model)

from text_fixtures import EOS, PAD, bpe_tokenizer, write_jsonl

CORPUS = ["the cat sat on the mat", "hello world, how are you?", "Paris is the capital of France"]


def _backbone(seed=0):
    torch.manual_seed(seed)
    return tt.models.build("llama-tiny").eval()


def _lora_rm(seed=0):
    rm = RewardModel(_backbone(seed))
    tt.lora.apply(rm, tt.lora.LoraConfig(rank=4, alpha=8, targets="all-linear"))
    with torch.no_grad():  # B != 0, so LoRA changes the scores and a round trip is a real check
        for name, p in rm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return rm


def _manual_scores(rm, ids, mask):
    """The head applied to the hidden state at the last 1 of each mask row, found by a Python loop."""
    h = hidden_states(rm.decoder, ids, mask)
    last = [max(t for t in range(ids.shape[1]) if mask[b, t]) for b in range(ids.shape[0])]
    return torch.stack([rm.score(h[b, t]) for b, t in enumerate(last)]).squeeze(-1)


# ------------------------------------------------------------------------------ scores
@pytest.mark.parametrize("side", ["right", "left"])
def test_scores_are_read_at_the_last_real_token_even_when_pad_is_eos(side):
    rm = _lora_rm()
    rows = [[5, 6, 7, EOS], [8, 9, EOS], [10, EOS]]  # every row ends with EOS, and EOS pads them too
    batch = tt.data.pad_batch([{"input_ids": r} for r in rows], EOS, padding_side=side)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (ids == EOS).sum() > len(rows)  # padding really is EOS
    with torch.no_grad():
        scores = rm(ids, mask)
        alone = torch.cat([rm(torch.tensor([r])) for r in rows])
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, _manual_scores(rm, ids, mask).detach())
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=1e-5)  # padding changes nothing


def test_a_wrong_head_is_refused_naming_its_shape():
    with pytest.raises(ValueError, match=r"hidden_size=64 .*nn.Linear\(64, 2\)"):
        RewardModel(_backbone(), head=torch.nn.Linear(64, 2))
    with pytest.raises(TypeError, match="Sequential"):
        RewardModel(_backbone(), head=torch.nn.Sequential())
    with pytest.raises(TypeError, match="CausalLM"):
        RewardModel(torch.nn.Linear(2, 2))


def test_gradients_reach_lora_and_the_head_only():
    rm = _lora_rm()
    ids = torch.randint(3, 256, (2, 6))
    rm(ids).sum().backward()
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and all("lora_" in n or n == "score.weight" for n in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in rm.named_parameters() if p.requires_grad)
    assert all(p.grad is None for p in rm.parameters() if not p.requires_grad)
    assert "reward_mean" in rm.state_dict() and "reward_std" in rm.state_dict()


def test_calibrate_sets_the_statistics_and_refuses_bad_scores():
    rm = RewardModel(_backbone())
    mean, std = rm.calibrate(torch.tensor([1.0, 2.0, 3.0]))
    assert (mean, std) == (2.0, 1.0) and rm.reward_mean.item() == 2.0
    torch.testing.assert_close(rm.normalize(torch.tensor([3.0])), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="non-finite"):
        rm.calibrate(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match=">= 2 scores"):
        rm.calibrate(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="all equal"):
        rm.calibrate(torch.tensor([1.0, 1.0]))


# ------------------------------------------------------------------------------ batches and metrics
@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer(CORPUS, vocab_size=256)


def test_preference_batch_scores_each_completion_once_and_feeds_reward_loss(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "the capital of France?", "chosen": " Paris", "rejected": " the mat", "margin": 1.0},
        {"prompt": "hello", "ranked": [" world", " how are you?", " cat"]}])
    examples = tt.data.load_preferences(path, tok)
    batch = preference_batch(examples, PAD)
    assert batch["input_ids"].shape[0] == 5  # 2 + 3 completions, each once
    assert batch["chosen"].tolist() == [0, 2, 2, 3] and batch["rejected"].tolist() == [1, 3, 4, 4]
    assert batch["group"].tolist() == [0, 1, 1, 1] and batch["margin"].tolist() == [1.0, 0.0, 0.0, 0.0]
    rm = _lora_rm()
    r = rm(batch["input_ids"], batch["attention_mask"])
    loss = reward_loss(r[batch["chosen"]], r[batch["rejected"]], batch["margin"])
    loss.backward()
    assert torch.isfinite(loss) and rm.score.weight.grad.abs().sum() > 0
    rows = tt.data.preference_sequences(examples[1])
    with torch.no_grad():  # row 3 is example 1's second completion, scored alone
        alone = rm(torch.tensor([rows[1]["input_ids"]]))
    torch.testing.assert_close(r[3:4].detach(), alone, atol=1e-5, rtol=1e-5)
    assert preference_batch(examples[1:], PAD)["margin"] is None
    with pytest.raises(ValueError, match="no examples"):
        preference_batch([], PAD)


def test_pairwise_metrics():
    m = pairwise_metrics(torch.tensor([2.0, 1.0, 0.0, 1.0]), torch.tensor([1.0, 2.0, -1.0, 1.0]))
    assert m["accuracy"] == 0.625 and m["margin"] == 0.25  # 2 right, 1 wrong, 1 tie (half)
    assert m["reward_mean"] == pytest.approx(0.875) and m["chosen_mean"] == 1.0
    with pytest.raises(ValueError, match="differ in shape"):
        pairwise_metrics(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="r_chosen"):
        pairwise_metrics(torch.zeros(2, dtype=torch.long), torch.zeros(2))


# ------------------------------------------------------------------------------ save / load
def test_save_load_round_trip_gives_identical_scores(tmp_path):
    rm = _lora_rm()
    torch.nn.init.normal_(rm.score.weight, 0, 0.5)
    rm.set_statistics(0.25, 2.0)
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "README.md").write_text("kept")
    save_reward_model(rm, tmp_path / "rm")
    assert {p.name for p in (tmp_path / "rm").iterdir()} == {
        "adapter_config.json", "adapter_model.safetensors", "reward_model.json", "tinytune_manifest.json",
        "README.md"}
    config = json.loads((tmp_path / "rm" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    back = load_reward_model(_backbone(), tmp_path / "rm")
    ids = torch.randint(3, 256, (3, 7))
    with torch.no_grad():
        assert torch.equal(rm(ids), back(ids))
    assert (back.reward_mean.item(), back.reward_std.item()) == (0.25, 2.0)


def test_a_damaged_or_mismatched_save_is_refused(tmp_path):
    save_reward_model(_lora_rm(), tmp_path / "rm")
    stats = tmp_path / "rm" / "reward_model.json"
    text = stats.read_text()
    stats.write_text(text.replace('"reward_std": 1.0', '"reward_std": 9.0'))
    with pytest.raises(IntegrityError, match="reward_model.json"):
        load_reward_model(_backbone(), tmp_path / "rm")
    stats.write_text(text)
    weights = tmp_path / "rm" / "adapter_model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        load_reward_model(_backbone(), tmp_path / "rm")
    wide = tt.models.build(tt.models.ModelConfig(**{**_backbone().config.__dict__, "hidden_size": 128}))
    with pytest.raises(ValueError, match="hidden_size=64.*backbone's hidden_size is 128"):
        load_reward_model(wide, tmp_path / "rm")
    with pytest.raises(TypeError, match="RewardModel"):
        save_reward_model(_backbone(), tmp_path / "x")


# ------------------------------------------------------------------------------ a short training run
def _pairs(n, gen, marker=7, length=6):
    """Pairs of random rows; the chosen one holds `marker` at a random place, the rejected one does not."""
    chosen, rejected = [], []
    for _ in range(n):
        row = torch.randint(10, 256, (length,), generator=gen)
        bad = torch.randint(10, 256, (length,), generator=gen)
        row[int(torch.randint(0, length, (1,), generator=gen))] = marker
        chosen.append(row.tolist() + [EOS])
        rejected.append(bad.tolist() + [EOS])
    return torch.tensor(chosen), torch.tensor(rejected)


def test_thirty_adamw_steps_learn_a_marker_rule():
    """~3 s on 2 CPU cores."""
    rm = RewardModel(_backbone())
    tt.lora.apply(rm, tt.lora.LoraConfig(rank=8, alpha=16, targets="all-linear"))
    gen = torch.Generator().manual_seed(1)
    test_c, test_r = _pairs(64, gen)
    with torch.no_grad():
        before = pairwise_metrics(rm(test_c), rm(test_r))["accuracy"]
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-2)
    rm.train()
    for _ in range(30):
        c, r = _pairs(16, gen)
        loss = reward_loss(rm(c), rm(r))
        opt.zero_grad()
        loss.backward()
        opt.step()
    rm.eval()
    with torch.no_grad():
        metrics = pairwise_metrics(rm(test_c), rm(test_r))
    # held-out accuracy after 30 steps is 1.0 for seeds 1-3 (from ~0.5, chance): 0.9 leaves room
    assert metrics["accuracy"] >= 0.9 and metrics["accuracy"] - before >= 0.25, (before, metrics)


def test_a_refused_save_leaves_the_previous_one_whole(tmp_path):
    rm = _lora_rm()
    save_reward_model(rm, tmp_path / "rm")
    before = {p.name: p.read_bytes() for p in (tmp_path / "rm").iterdir()}
    with pytest.raises(ValueError, match="has no adapter"):  # a bare reward model carries no PEFT method
        save_reward_model(RewardModel(_backbone()), tmp_path / "rm")
    assert {p.name: p.read_bytes() for p in (tmp_path / "rm").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["rm"]  # no staging directory left behind
