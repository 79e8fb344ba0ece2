"""Every error the contract lists: the stated type, and a message that names the thing."""
import pytest
import torch
import torch.nn as nn

import tinytune as tt
from conftest import TinyLM


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank": 0}, r"rank=0"),
        ({"rank": -3}, r"rank=-3"),
        ({"rank": 2.5}, r"rank=2.5"),
        ({"alpha": 0}, r"alpha=0"),
        ({"alpha": -1.0}, r"alpha=-1.0"),
        ({"dropout": 1.0}, r"dropout=1.0"),
        ({"dropout": -0.1}, r"dropout=-0.1"),
        ({"init": "xavier"}, r"init='xavier'.*'kaiming'.*'gaussian'"),
        ({"targets": "q_proj("}, r"not a valid regular expression"),
        ({"targets": 5}, r"targets must be"),
        ({"targets": None}, r"targets is None"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tt.lora.LoraConfig(**kwargs)


def test_layer_constructor_validates_too():
    with pytest.raises(ValueError, match="rank=0"):
        tt.lora.LoRALinear(nn.Linear(4, 4), rank=0, alpha=1)
    with pytest.raises(TypeError, match="wraps an nn.Linear, got Conv1d"):
        tt.lora.LoRALinear(nn.Conv1d(4, 4, 1), rank=1, alpha=1)


def test_no_match_names_targets_and_lists_existing_modules():
    with pytest.raises(ValueError, match=r"\['qproj'\].*matched no module.*'layers.0.self_attn.q_proj'"):
        tt.lora.apply(TinyLM(), tt.lora.LoraConfig(targets=["qproj"]))


def test_everything_excluded_is_no_match():
    with pytest.raises(ValueError, match="exclude="):
        tt.lora.apply(TinyLM(), tt.lora.LoraConfig(targets=["q_proj"], exclude=["q_proj"]))


def test_unsupported_type_names_module_and_type():
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"'1' \(GELU\).*Modules that would work: '0', '2'"):
        tt.lora.apply(model, tt.lora.LoraConfig(targets=["1"]))
    assert type(model[0]) is nn.Linear  # nothing half-applied


def test_unadaptable_matches_are_skipped_with_a_warning_when_others_match():
    """PEFT's rule: a regex or list that also matches modules LoRA cannot adapt skips them."""
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"skipped: '1 \(GELU\)'"):
        names = tt.lora.apply(model, tt.lora.LoraConfig(targets=r"\d"))
    assert names == ["0", "2"] and type(model[1]) is nn.GELU


def test_linear_subclass_with_own_forward_is_refused():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Scaled(4, 4))
    with pytest.raises(TypeError, match="Scaled.*overrides nn.Linear.forward"):
        tt.lora.apply(model, tt.lora.LoraConfig(targets=["0"]))


def test_applying_twice_raises():
    model = TinyLM()
    tt.lora.apply(model, tt.lora.LoraConfig(targets=["q_proj"]))
    with pytest.raises(ValueError, match=r"'layers.0.self_attn.q_proj' already has LoRA"):
        tt.lora.apply(model, tt.lora.LoraConfig(targets=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA"):
        tt.lora.apply(model, tt.lora.LoraConfig(targets="all-linear"))  # would reach q_proj.base


def test_multihead_attention_projection_is_refused_with_reason():
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    with pytest.raises(TypeError, match=r"self_attn.out_proj.*reads its projection weights directly.*"
                                        r"target the MultiheadAttention 'self_attn' itself.*linear1"):
        tt.lora.apply(layer, tt.lora.LoraConfig(targets=["out_proj"]))
    names = tt.lora.apply(layer, tt.lora.LoraConfig(targets="all-linear"))
    assert names == ["self_attn", "linear1", "linear2"]  # the MHA as a unit, not its out_proj on its own


def test_model_without_lora():
    for call in (tt.lora.merge, tt.lora.unmerge, tt.lora.merge_and_unload, tt.lora.state_dict):
        if call is tt.lora.state_dict:
            assert call(TinyLM()) == {}
            continue
        with pytest.raises(ValueError, match="TinyLM has no LoRA layers"):
            call(TinyLM())
    with pytest.raises(ValueError, match="has no LoRA layers"):
        tt.lora.load_state_dict(TinyLM(), {})


def _lora_model():
    model = TinyLM()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["q_proj"]))
    return model


def test_load_state_dict_names_missing_unexpected_and_misshaped_keys():
    model = _lora_model()
    sd = dict(tt.lora.state_dict(model))
    missing_key = "base_model.model.layers.1.self_attn.q_proj.lora_B.weight"
    sd.pop(missing_key)
    sd["base_model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(2, 16)
    sd["base_model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(3, 16)
    with pytest.raises(ValueError) as info:
        tt.lora.load_state_dict(model, sd)
    msg = str(info.value)
    assert "missing keys" in msg and missing_key in msg
    assert "unexpected keys" in msg and "k_proj.lora_A.weight" in msg
    assert "mis-shaped" in msg and "q_proj.lora_A.weight: file (3, 16) vs model (2, 16)" in msg


def test_non_strict_load_reports_but_still_refuses_bad_shapes():
    model = _lora_model()
    sd = {"layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 16)}
    missing, unexpected = tt.lora.load_state_dict(model, sd, strict=False)
    assert len(missing) == 3 and unexpected == []
    assert torch.equal(model.layers[0]["self_attn"].q_proj.lora_A, torch.ones(2, 16))
    with pytest.raises(ValueError, match="mis-shaped"):
        tt.lora.load_state_dict(model, {"layers.0.self_attn.q_proj.lora_A.weight": torch.ones(1, 16)}, strict=False)


def test_apply_wants_a_lora_config():
    with pytest.raises(TypeError, match="LoraConfig, got dict"):
        tt.lora.apply(TinyLM(), {"rank": 8})
