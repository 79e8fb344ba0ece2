"""Issue 12's value model: a per-token scalar head on a decoder body, zero or from a reward model."""
import pytest
import torch

import tinytune as tt
from tinytune.rlhf import RewardModel, ValueModel


def _ids():
    ids = torch.randint(3, 200, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, -2:] = 0  # right padding
    return ids, mask


def test_a_fresh_value_model_predicts_zero_everywhere():
    torch.manual_seed(0)
    value = ValueModel(tt.models.build("llama-tiny"))
    ids, mask = _ids()
    out = value(ids, mask)
    assert out.shape == (3, 7) and out.dtype == torch.float32 and torch.equal(out, torch.zeros(3, 7))


def test_from_a_reward_model_its_value_at_the_last_token_is_the_reward_and_the_head_is_a_copy():
    torch.manual_seed(0)
    rm = RewardModel(tt.models.build("llama-tiny")).eval()
    value = ValueModel.from_reward_model(rm).eval()
    ids, mask = _ids()
    with torch.no_grad():
        scores, values = rm(ids, mask), value(ids, mask)
    last = torch.tensor([6, 4, 6])
    assert torch.allclose(values[torch.arange(3), last], scores, atol=1e-6)
    assert value.score is not rm.score and value.score.weight.data_ptr() != rm.score.weight.data_ptr()
    before = rm.score.weight.clone()
    value.score.weight.data.add_(1.0)
    assert torch.equal(rm.score.weight, before)  # training the value head never moves the reward model's


def test_lora_on_the_body_keeps_the_head_trainable_and_refusals_are_named():
    value = ValueModel(tt.models.build("llama-tiny"))
    tt.lora.apply(value, tt.lora.LoraConfig(rank=4, targets="all-linear"))
    trainable = {n for n, p in value.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and any("lora_A" in n for n in trainable)
    with pytest.raises(ValueError, match="hidden_size=64"):
        ValueModel(tt.models.build("llama-tiny"), torch.nn.Linear(8, 1))
    with pytest.raises(TypeError, match="RewardModel"):
        ValueModel.from_reward_model(value)
