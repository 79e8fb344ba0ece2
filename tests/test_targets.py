"""The matching rules of the contract, for targets and exclude alike."""
import torch.nn as nn

import tinytune as tt
from conftest import TinyLM
from tinytune.peft._targets import find_targets


def names(model, targets, exclude=None):
    return [n for n, _ in find_targets(model, targets, exclude)]


def test_list_matches_equal_or_dotted_suffix():
    model = TinyLM(layers=2)
    assert names(model, ["q_proj"]) == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]
    assert names(model, ["1.self_attn.q_proj"]) == ["layers.1.self_attn.q_proj"]
    assert names(model, ["proj"]) == []  # a suffix must start at a dot
    assert names(model, ["lm_head"]) == ["lm_head"]


def test_string_is_a_fullmatch_regex():
    model = TinyLM(layers=2)
    assert names(model, r"layers\.0\.self_attn\.(q|v)_proj") == ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"]
    assert names(model, r"q_proj") == []  # fullmatch, not search


def test_all_linear_skips_heads_by_name_and_by_tying():
    model = TinyLM(layers=1)
    found = names(model, "all-linear")
    assert "lm_head" not in found and len(found) == 6
    tied = nn.ModuleDict({"emb": nn.Embedding(10, 4), "out": nn.Linear(4, 10, bias=False), "mid": nn.Linear(4, 4)})
    tied["out"].weight = tied["emb"].weight
    assert names(tied, "all-linear") == ["mid"]


def test_callable_and_exclude():
    model = TinyLM(layers=2)
    pick = lambda name, module: isinstance(module, nn.Linear) and name.startswith("layers.1")  # noqa: E731
    assert names(model, pick) == [
        "layers.1.self_attn.q_proj", "layers.1.self_attn.k_proj", "layers.1.self_attn.v_proj",
        "layers.1.self_attn.o_proj", "layers.1.mlp.0", "layers.1.mlp.2",
    ]
    assert names(model, "all-linear", exclude=["mlp.0", "mlp.2"]) == [
        n for n in names(model, "all-linear") if ".mlp." not in n
    ]
    assert names(model, ["q_proj"], exclude=r"layers\.0\..*") == ["layers.1.self_attn.q_proj"]


def test_apply_returns_replaced_names_in_model_order():
    model = TinyLM(layers=1)
    out = tt.lora.apply(model, tt.lora.LoraConfig(targets=["v_proj", "q_proj", "embed_tokens"]))
    assert out == ["embed_tokens", "layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"]
