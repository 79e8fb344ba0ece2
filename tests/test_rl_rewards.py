"""Issue 12's rewards (tt.rlhf.rewards): weighted reward functions with abstentions, `module:function`
names, and a reward model's normalised, clipped scores."""
import math
import sys
import types

import pytest
import torch

import tinytune as tt
from tinytune.rlhf.rewards import combine_rewards, load_reward_function, normalized_scores, reward_matrix


def exact(prompts, completions, answer=None, **_):
    return [float(c == a) for c, a in zip(completions, answer)]


def short(prompts, completions, **_):
    return [None if len(c) > 3 else -len(c) for c in completions]  # abstains on long completions


PROMPTS, COMPLETIONS, ANSWERS = ["1+1=", "1+1=", "2+3="], ["2", "three", "5"], ["2", "2", "5"]


def test_weighted_sum_with_abstentions_as_trls_nansum():
    m = reward_matrix([exact, short], PROMPTS, COMPLETIONS, answer=ANSWERS)
    assert m.shape == (3, 2) and math.isnan(m[1, 1])
    r = combine_rewards([exact, short], PROMPTS, COMPLETIONS, weights=[1.0, 0.5], answer=ANSWERS)
    assert r.tolist() == pytest.approx([1.0 - 0.5, 0.0, 1.0 - 0.5])
    nobody = combine_rewards([short], PROMPTS, COMPLETIONS)
    assert math.isnan(nobody[1]) and nobody[0] == -1.0  # no function had an opinion: NaN, not 0


def test_bad_reward_functions_and_arguments_are_named():
    with pytest.raises(ValueError, match="bad_length must return one float or None per completion"):
        def bad_length(prompts, completions, **_):
            return [1.0]
        combine_rewards([bad_length], PROMPTS, COMPLETIONS)
    with pytest.raises(ValueError, match=r"nan_reward returned nan for completion 0"):
        def nan_reward(prompts, completions, **_):
            return [math.nan] * len(completions)
        combine_rewards([nan_reward], PROMPTS, COMPLETIONS)
    with pytest.raises(ValueError, match="weights must be 2 finite numbers"):
        combine_rewards([exact, short], PROMPTS, COMPLETIONS, weights=[1.0], answer=ANSWERS)
    with pytest.raises(ValueError, match="'answer' has 2 values for 3 completions"):
        combine_rewards([exact], PROMPTS, COMPLETIONS, answer=ANSWERS[:2])
    with pytest.raises(ValueError, match="2 prompts for 3 completions"):
        combine_rewards([exact], PROMPTS[:2], COMPLETIONS, answer=ANSWERS)


def test_load_reward_function_by_module_and_name(monkeypatch):
    module = types.ModuleType("my_rewards")
    module.exact = exact
    module.Rules = type("Rules", (), {"short": staticmethod(short)})
    module.NOT_CALLABLE = 3
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    assert load_reward_function("my_rewards:exact") is exact
    assert load_reward_function("my_rewards:Rules.short") is short
    for spec, message in [("my_rewards", "'module:function'"), ("no_such_module_x:f", "cannot import"),
                          ("my_rewards:missing", "no attribute 'missing'"), ("my_rewards:NOT_CALLABLE", "not a callable")]:
        with pytest.raises(ValueError, match=message):
            load_reward_function(spec)


def test_reward_model_scores_are_normalised_by_its_statistics_and_clipped():
    torch.manual_seed(0)
    rm = tt.rlhf.RewardModel(tt.models.build("llama-tiny")).train()
    ids, mask = torch.randint(3, 200, (4, 6)), torch.ones(4, 6, dtype=torch.long)
    with torch.no_grad():
        raw = rm.eval()(ids, mask)
    rm.train()
    rm.set_statistics(0.5, 2.0)
    got = normalized_scores(rm, ids, mask)
    assert torch.allclose(got, (raw - 0.5) / 2.0) and rm.training  # its mode is restored
    assert torch.equal(normalized_scores(rm, ids, mask, normalize=False), raw)
    clipped = normalized_scores(rm, ids, mask, normalize=False, clip=0.01)
    assert clipped.abs().max() <= 0.01
    with pytest.raises(ValueError, match="clip"):
        normalized_scores(rm, ids, mask, clip=0)
