"""Selective fine-tuning (tinytune.peft.freeze): what each selection trains, LoRA's matching rules,
only the selected parameters move, exact parameter counts, state-dict round trips and every error."""
import copy
import json

import pytest
import torch
import torch.nn as nn

import tinytune as tt
from conftest import TinyLM
from tinytune.peft import freeze


def _llama(**overrides):
    return tt.models.build("llama-tiny", **overrides)


def _trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _params_of(module, prefix):
    return {f"{prefix}.{n}" for n, _ in module.named_parameters()}


class FancyNorm(nn.Module):
    """A user's own norm: recognised by its class name."""

    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * self.scale


def test_freeze_freezes_everything_and_returns_model():
    model = _llama()
    assert freeze.freeze(model) is model
    assert not _trainable_names(model)


@pytest.mark.parametrize("spec", [["q_proj", "down_proj"], r"model\.layers\.\d\.self_attn\.(k|v)_proj", "all-linear",
                                  lambda name, m: name.endswith("up_proj")], ids=["list", "regex", "all-linear", "callable"])
def test_unfreeze_matches_exactly_like_lora_targets(spec):
    model, other = _llama(), _llama()
    freeze.freeze(model)
    names = freeze.unfreeze(model, spec)
    assert names == tt.lora.apply(other, tt.lora.LoraConfig(rank=2, targets=spec))
    expected = set().union(*(_params_of(model.get_submodule(n), n) for n in names))
    assert _trainable_names(model) == expected


def test_unfreeze_all_linear_leaves_out_the_head_and_is_additive():
    model = _llama()
    freeze.freeze(model)
    freeze.unfreeze(model, ["lm_head"])
    names = freeze.unfreeze(model, "all-linear")
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(names) == linears - {"lm_head"}
    assert model.lm_head.weight.requires_grad  # unfreeze never freezes what was trainable


def test_unfreeze_exclude():
    model = freeze.freeze(_llama())
    names = freeze.unfreeze(model, ["q_proj"], exclude=r"model\.layers\.0\..*")
    assert names == ["model.layers.1.self_attn.q_proj"]


def test_unfreeze_no_match_names_targets_and_lists_modules():
    model = freeze.freeze(_llama())
    with pytest.raises(ValueError, match=r"\['qproj'\].*matched no module.*'model.layers.0.self_attn.q_proj'"):
        freeze.unfreeze(model, ["qproj"])
    assert not _trainable_names(model)
    with pytest.raises(ValueError, match=r"\['1'\].*without parameters"):
        freeze.unfreeze(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), ["1"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        freeze.unfreeze(model, "q_proj(")
    with pytest.raises(ValueError, match="targets is None"):
        freeze.unfreeze(model, None)


def test_bitfit_trains_exactly_the_biases_with_exact_counts():
    model = nn.Sequential(nn.Linear(512, 64), nn.LayerNorm(64), nn.Linear(64, 10))
    names = freeze.bitfit(model)
    assert names == ["0.bias", "1.bias", "2.bias"]
    pc = tt.count_parameters(model)
    assert pc.trainable == 64 + 64 + 10
    assert pc.total == 512 * 64 + 64 + 2 * 64 + 64 * 10 + 10
    assert pc.frozen == pc.total - pc.trainable


def test_bitfit_on_a_decoder_with_biases():
    model = _llama(qkv_bias=True, o_bias=True, mlp_bias=True)
    names = freeze.bitfit(model)
    assert names and all(n.endswith(".bias") for n in names)
    d, kv, inter, layers = 64, 32, 128, 2  # llama-tiny: hidden 64, 2 kv heads of 16, intermediate 128
    assert model.model.layers[0].self_attn.k_proj.out_features == kv
    expected = layers * ((d + kv + kv) + d + (inter + inter + d))  # q,k,v + o + gate,up,down biases
    assert tt.count_parameters(model).trainable == expected


def test_bitfit_without_biases_raises_and_changes_nothing():
    model = _llama()  # llama has no biases
    with pytest.raises(ValueError, match="CausalLM has no bias parameters"):
        freeze.bitfit(model)
    assert len(_trainable_names(model)) == len(list(model.parameters()))


def test_norms_only_finds_torch_and_named_norms():
    model = _llama()
    names = freeze.norms_only(model)
    d, layers = model.lm_head.in_features, len(model.model.layers)
    assert names == [f"model.layers.{i}.{k}" for i in range(layers) for k in ("input_layernorm", "post_attention_layernorm")] + ["model.norm"]
    assert tt.count_parameters(model).trainable == (2 * layers + 1) * d  # RMSNorm: one weight of size d
    mixed = nn.Sequential(nn.Linear(4, 4), FancyNorm(4), nn.BatchNorm1d(4), nn.GroupNorm(2, 4), nn.LayerNorm(4))
    assert freeze.norms_only(mixed) == ["1", "2", "3", "4"]
    assert tt.count_parameters(mixed).trainable == 4 + 2 * (4 + 4 + 4)


def test_norms_only_without_norms_raises():
    with pytest.raises(ValueError, match="Sequential has no normalisation layer.*'0'"):
        freeze.norms_only(nn.Sequential(nn.Linear(2, 2)))


def test_last_blocks_auto_detects_the_block_list():
    model = _llama()
    assert freeze.last_blocks(model, 1) == ["model.layers.1"]
    assert _trainable_names(model) == _params_of(model.model.layers[1], "model.layers.1")
    assert tt.count_parameters(model).trainable == sum(p.numel() for p in model.model.layers[1].parameters())
    assert freeze.last_blocks(model, 2, blocks="model.layers") == ["model.layers.0", "model.layers.1"]


def test_last_blocks_prefers_the_outer_list_over_longer_inner_ones():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(3))
            self.mixed = nn.ModuleList([nn.Linear(4, 4), nn.ReLU()] * 4)  # mixed types: never a block list

    model = Model()
    assert freeze.last_blocks(model, 2) == ["blocks.1", "blocks.2"]
    assert freeze.find_blocks(model)[0] == "blocks"


@pytest.mark.parametrize("n", [0, 3, -1, True, 1.5])
def test_last_blocks_bad_n_names_n_and_the_count(n):
    model = _llama()
    with pytest.raises(ValueError, match=rf"n={n!r}.*'model.layers'.*which is 2"):
        freeze.last_blocks(model, n)
    assert len(_trainable_names(model)) == len(list(model.parameters()))  # nothing frozen


def test_last_blocks_bad_block_names():
    model = _llama()
    with pytest.raises(ValueError, match=r"blocks='model.blocks' names no module.*'model.layers'"):
        freeze.last_blocks(model, 1, blocks="model.blocks")
    with pytest.raises(TypeError, match=r"blocks='lm_head' is a Linear"):
        freeze.last_blocks(model, 1, blocks="lm_head")
    with pytest.raises(ValueError, match="no nn.ModuleList of identical blocks"):
        freeze.last_blocks(nn.Sequential(nn.Linear(2, 2)), 1)
    seq = nn.Sequential(nn.Embedding(5, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    assert freeze.last_blocks(seq, 1, blocks="1") == ["1.1"]


def test_embeddings_and_head_untied_and_tied():
    model = _llama()
    assert freeze.embeddings_and_head(model) == ["model.embed_tokens", "lm_head"]
    vocab, d = model.model.embed_tokens.weight.shape
    assert tt.count_parameters(model).trainable == 2 * vocab * d
    tied = tt.models.build("qwen2-tiny")
    freeze.embeddings_and_head(tied)
    assert tt.count_parameters(tied).trainable == vocab * d  # one shared matrix, counted once
    with pytest.raises(ValueError, match="no nn.Embedding and no output head"):
        freeze.embeddings_and_head(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "lora"}, r"mode='lora'.*'bitfit'.*'targets'"),
        ({"mode": "targets"}, r"targets is None"),
        ({"mode": "targets", "targets": 5}, r"targets must be"),
        ({"mode": "bitfit", "targets": ["q_proj"]}, r"targets=\['q_proj'\] is only used with mode='targets'"),
        ({"mode": "last_blocks"}, r"n_blocks must be an integer >= 1, got n_blocks=None"),
        ({"mode": "last_blocks", "n_blocks": 0}, r"n_blocks=0"),
        ({"mode": "last_blocks", "n_blocks": 1, "blocks": 3}, r"blocks must be a dotted module name"),
        ({"mode": "norms", "n_blocks": 2}, r"n_blocks=2 is only used with mode='last_blocks'"),
    ],
)
def test_config_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        freeze.FreezeConfig(**kwargs)


CONFIGS = [
    (freeze.FreezeConfig(mode="norms"), freeze.norms_only),
    (freeze.FreezeConfig(mode="last_blocks", n_blocks=1), lambda m: freeze.last_blocks(m, 1)),
    (freeze.FreezeConfig(mode="embeddings"), freeze.embeddings_and_head),
    (freeze.FreezeConfig(mode="targets", targets=["q_proj", "lm_head"]),
     lambda m: freeze.unfreeze(freeze.freeze(m), ["q_proj", "lm_head"])),
]


@pytest.mark.parametrize("cfg,same", CONFIGS, ids=[c.mode for c, _ in CONFIGS])
def test_apply_freezes_first_and_equals_the_function(cfg, same):
    model, other = _llama(), _llama()
    names = freeze.apply(model, cfg)
    assert names == same(other)
    assert _trainable_names(model) == _trainable_names(other)
    assert 0 < len(_trainable_names(model)) < len(list(model.parameters()))


def test_apply_bitfit_and_wrong_config_type():
    model = _llama(mlp_bias=True)
    assert freeze.apply(model, freeze.FreezeConfig()) == [n for n, _ in model.named_parameters() if n.endswith("bias")]
    with pytest.raises(TypeError, match="expects a freeze.FreezeConfig, got str"):
        freeze.apply(model, "bitfit")
    with pytest.raises(ValueError, match=r"\['nothing'\].*matched no module"):
        freeze.apply(model, freeze.FreezeConfig(mode="targets", targets=["nothing"]))
    assert _trainable_names(model)  # the failed apply froze nothing


def _one_step(model, make_input):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(make_input()).float().pow(2).mean().backward()
    opt.step()
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


@pytest.mark.parametrize("make,select,make_input", [
    (_llama, lambda m: freeze.last_blocks(m, 1), lambda: torch.randint(0, 256, (2, 6))),
    (_llama, lambda m: freeze.apply(m, freeze.FreezeConfig(mode="targets", targets=r".*\.(q|v)_proj")),
     lambda: torch.randint(0, 256, (2, 6))),
    (lambda: _llama(qkv_bias=True), freeze.bitfit, lambda: torch.randint(0, 256, (2, 6))),
    (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)), freeze.norms_only, lambda: torch.randn(4, 6)),
    (TinyLM, freeze.embeddings_and_head, lambda: torch.randint(0, 32, (2, 5))),
], ids=["last_blocks", "targets", "bitfit", "norms-sequential", "embeddings-custom"])
def test_only_the_selected_parameters_move(make, select, make_input):
    model = make()
    select(model)
    trainable = _trainable_names(model)
    changed = _one_step(model, make_input)
    assert changed and changed <= trainable
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_state_dict_round_trip_is_bitwise():
    model = _llama()
    freeze.last_blocks(model, 1)
    _one_step(model, lambda: torch.randint(0, 256, (2, 6)))
    sd = freeze.state_dict(model)
    assert set(sd) == _trainable_names(model)
    fresh = _llama()
    freeze.last_blocks(fresh, 1)
    assert freeze.load_state_dict(fresh, sd) == ([], [])
    for n, p in fresh.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[n]), n
    ids = torch.randint(0, 256, (2, 6))
    model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_load_state_dict_errors_name_the_keys():
    model = freeze.freeze(_llama())
    freeze.unfreeze(model, ["q_proj"])
    sd = {k: v.clone() for k, v in freeze.state_dict(model).items()}
    key = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match=rf"missing keys: \['{key}'\]"):
        freeze.load_state_dict(model, {k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match=r"unexpected keys: \['lm_head.weight'\].*are frozen in this model"):
        freeze.load_state_dict(model, {**sd, "lm_head.weight": torch.zeros(256, 64)})
    with pytest.raises(ValueError, match=rf"mis-shaped keys: \['{key}: given \(2, 2\) vs model \(64, 64\)'\]"):
        freeze.load_state_dict(model, {**sd, key: torch.zeros(2, 2)})
    partial = {key: torch.zeros(64, 64)}
    missing, unexpected = freeze.load_state_dict(model, {**partial, "extra": torch.zeros(1)}, strict=False)
    assert missing == ["model.layers.1.self_attn.q_proj.weight"] and unexpected == ["extra"]
    assert torch.count_nonzero(model.get_parameter(key)) == 0
    with pytest.raises(ValueError, match="every parameter of CausalLM is frozen"):
        freeze.load_state_dict(freeze.freeze(_llama()), sd)


def test_peft_config_dict_restores_the_exact_selection():
    model = _llama(mlp_bias=True)
    freeze.bitfit(model)
    freeze.unfreeze(model, ["model.norm"])
    config = json.loads(json.dumps(freeze.peft_config_dict(model)))  # JSON-able
    assert config["peft_type"] == "FREEZE"
    other = _llama(mlp_bias=True)
    assert freeze.apply_peft_config(other, config) == config["trainable_parameters"]
    assert _trainable_names(other) == _trainable_names(model)
    with pytest.raises(ValueError, match=r"has no parameters \['nope.weight'\]"):
        freeze.apply_peft_config(other, {**config, "trainable_parameters": ["nope.weight"]})
    with pytest.raises(ValueError, match="peft_type='LORA'"):
        freeze.apply_peft_config(other, {**config, "peft_type": "LORA"})
    with pytest.raises(ValueError, match="nothing to save"):
        freeze.peft_config_dict(freeze.freeze(copy.deepcopy(other)))
