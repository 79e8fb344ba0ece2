"""(IA)^3 (tinytune.peft.ia3): the maths (bias included), base equality at init and when disabled,
merge/unmerge, only the vectors train, exact counts, state-dict round trips, every error, and
interop with Hugging Face `peft` both ways (outputs, state dicts, adapter directories).
Tolerances: fp32; merged vs unmerged atol 1e-6 on logits of size ~0.5 (one extra rounding per weight);
against peft 1e-5 (the same maths; peft's own op order)."""
import copy
import json
import re

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import tinytune as tt
from conftest import TinyLM
from tinytune.peft import ia3

IDS = (2, 7)


def _llama(**overrides):
    return tt.models.build("llama-tiny", **overrides)


def _randomise(model, biases=False):
    """Vectors ~ N(1, 0.3) (non-ones, like a trained adapter); optionally random base biases too."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ia3_l"):
                p.normal_(1.0, 0.3)
            elif biases and name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model


def _adapted(**overrides):
    model = _randomise(_llama(qkv_bias=True, o_bias=True, mlp_bias=True, **overrides), biases=True)
    ia3.apply(model, ia3.IA3Config())
    return _randomise(model)


def _ids(vocab=256):
    return torch.randint(0, vocab, IDS)


@pytest.mark.parametrize("make,targets,ff,make_input", [
    (_llama, ["k_proj", "v_proj", "down_proj"], ["down_proj"], _ids),
    (TinyLM, "all-linear", r".*mlp\.2", lambda: _ids(32)),
    (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), ["0", "2"], ["2"], lambda: torch.randn(4, 6)),
], ids=["llama-tiny", "custom-all-linear", "sequential"])
def test_equal_to_base_at_init(make, targets, ff, make_input):
    model = make()
    base = copy.deepcopy(model)
    names = ia3.apply(model, ia3.IA3Config(targets=targets, feedforward=ff))
    assert any(layer.feedforward for _, layer in ia3.ia3_layers(model))
    assert names
    x = make_input()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))  # l = 1: multiplying by one is exact


def test_layer_maths_shapes_and_bias_follow_peft():
    base = nn.Linear(5, 3)
    x = torch.randn(4, 5)
    out_layer, in_layer = ia3.IA3Linear(base, feedforward=False), ia3.IA3Linear(base, feedforward=True)
    assert out_layer.ia3_l.shape == (3, 1) and in_layer.ia3_l.shape == (1, 5)
    assert out_layer.base is base and out_layer.weight is base.weight and out_layer.bias is base.bias
    assert not base.weight.requires_grad and out_layer.ia3_l.requires_grad
    with torch.no_grad():
        out_layer.ia3_l.normal_()
        in_layer.ia3_l.normal_()
        w, b = base.weight, base.bias
        torch.testing.assert_close(out_layer(x), (x @ w.T + b) * out_layer.ia3_l.T, rtol=0, atol=1e-6)  # bias scaled
        torch.testing.assert_close(in_layer(x), (x * in_layer.ia3_l) @ w.T + b, rtol=0, atol=1e-6)  # bias not
    with pytest.raises(TypeError, match="wraps an nn.Linear, got Conv1d"):
        ia3.IA3Linear(nn.Conv1d(2, 2, 1), feedforward=False)
    assert not torch.equal(ia3.IA3Linear(nn.Linear(4, 4), False, init_ones=False).ia3_l, torch.ones(4, 1))


def test_disabled_is_bit_for_bit_base():
    model = _adapted()
    plain = _llama(qkv_bias=True, o_bias=True, mlp_bias=True)
    plain.load_state_dict({k.replace(".base", ""): v for k, v in model.state_dict().items() if "ia3_l" not in k})
    ids = _ids()
    with torch.no_grad(), ia3.disabled(model):
        assert torch.equal(model(ids), plain(ids))
    with torch.no_grad():
        assert not torch.equal(model(ids), plain(ids))  # enabled again after the block


def test_merge_equals_unmerged_twice_is_once_and_unmerge_restores():
    model = _adapted()
    ids = _ids()
    base_weights = {n: p.clone() for n, p in model.named_parameters() if ".base." in n}
    with torch.no_grad():
        ref = model(ids)
        ia3.merge(model)
        merged = model(ids)
        once = [p.clone() for p in model.parameters()]
        ia3.merge(model)
        assert all(torch.equal(a, b) for a, b in zip(once, model.parameters()))
    torch.testing.assert_close(merged, ref, rtol=0, atol=1e-6)  # fp32, logits ~0.5: one rounding per weight
    with pytest.raises(RuntimeError, match="merged into"):
        with ia3.disabled(model):
            pass
    ia3.unmerge(model)
    ia3.unmerge(model)  # safe twice
    for n, p in model.named_parameters():
        if n in base_weights:
            torch.testing.assert_close(p, base_weights[n], rtol=1e-6, atol=1e-7)  # (w * l) / l in fp32


def test_merge_scales_the_bias_only_for_output_scaling():
    model = _adapted()
    k = model.model.layers[0].self_attn.k_proj
    down = model.model.layers[0].mlp.down_proj
    k_bias, down_bias, down_w = k.base.bias.clone(), down.base.bias.clone(), down.base.weight.clone()
    ia3.merge(model)
    torch.testing.assert_close(k.base.bias, k_bias * k.ia3_l.flatten(), rtol=0, atol=0)
    assert torch.equal(down.base.bias, down_bias)
    torch.testing.assert_close(down.base.weight, down_w * down.ia3_l, rtol=0, atol=0)  # columns scaled


def test_merge_refuses_zeros_but_merge_and_unload_does_not():
    model = _adapted()
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.ia3_l[0] = 0.0
    with pytest.raises(ValueError, match=r"\['model.layers.1.self_attn.v_proj'\] has zero entries"):
        ia3.merge(model)
    assert not any(layer.merged for _, layer in ia3.ia3_layers(model))  # nothing merged
    ids = _ids()
    with torch.no_grad():
        ref = model(ids)
        assert ia3.merge_and_unload(model) is model
        assert not list(ia3.ia3_layers(model))
        assert type(model.model.layers[1].self_attn.v_proj) is nn.Linear
        assert (model(ids) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_only_the_vectors_move_in_one_step():
    model = _adapted()
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".ia3_l") for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(_ids()).pow(2).mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_count_parameters_exact():
    model = _llama()
    total = tt.count_parameters(model).total
    ia3.apply(model, ia3.IA3Config())
    layers, kv, inter = 2, 32, 128  # llama-tiny: k/v project to 2 heads of 16; down_proj reads 128
    assert model.model.layers[0].mlp.down_proj.in_features == inter
    pc = tt.count_parameters(model)
    assert pc.trainable == layers * (kv + kv + inter)  # out_features for k, v; in_features for down
    assert (pc.total, pc.frozen) == (total + pc.trainable, total)


def test_state_dict_uses_peft_keys_and_round_trips_bitwise():
    model = _adapted()
    sd = ia3.state_dict(model)
    assert set(sd) == {f"base_model.model.model.layers.{i}.{m}.ia3_l" for i in range(2)
                       for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert sd["base_model.model.model.layers.0.mlp.down_proj.ia3_l"].shape == (1, 128)
    assert sd["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"].shape == (32, 1)
    fresh = _llama(qkv_bias=True, o_bias=True, mlp_bias=True)
    fresh.load_state_dict({k.replace(".base", ""): v for k, v in model.state_dict().items() if "ia3_l" not in k})
    ia3.apply(fresh, ia3.IA3Config())
    assert ia3.load_state_dict(fresh, {k.removeprefix("base_model.model."): v for k, v in sd.items()}) == ([], [])
    assert all(torch.equal(ia3.state_dict(fresh)[k], v) for k, v in sd.items())
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_load_state_dict_errors_name_the_keys():
    model = _adapted()
    sd = {k: v.clone() for k, v in ia3.state_dict(model).items()}
    key = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
    with pytest.raises(ValueError, match=re.escape(f"missing keys: ['{key}']")):
        ia3.load_state_dict(model, {k: v for k, v in sd.items() if k != key})
    with pytest.raises(ValueError, match=r"unexpected keys: \['base_model.model.x.ia3_l'\]"):
        ia3.load_state_dict(model, {**sd, "x.ia3_l": torch.ones(1)})
    with pytest.raises(ValueError, match=re.escape(f"{key}: given (1, 32) vs model (32, 1)")):
        ia3.load_state_dict(model, {**sd, key: torch.ones(1, 32)})
    missing, _ = ia3.load_state_dict(model, {key: torch.full((32, 1), 2.0)}, strict=False)
    assert len(missing) == 5 and torch.equal(model.model.layers[0].self_attn.k_proj.ia3_l, torch.full((32, 1), 2.0))
    with pytest.raises(ValueError, match="CausalLM has no \\(IA\\)\\^3 layers; call ia3.apply first"):
        ia3.load_state_dict(_llama(), sd)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"targets": None}, r"targets is None"),
        ({"targets": "k_proj("}, r"IA3Config.targets='k_proj\(' is not a valid regular expression"),
        ({"targets": ["k_proj"], "feedforward": ["down_proj"]}, r"feedforward entries \['down_proj'\] are not in targets"),
        ({"feedforward": 3}, r"IA3Config.feedforward must be"),
        ({"exclude": [""]}, r"IA3Config.exclude entries must be non-empty"),
        ({"init_ones": "yes"}, r"init_ones='yes'"),
    ],
)
def test_config_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ia3.IA3Config(**kwargs)


def test_apply_errors():
    with pytest.raises(ValueError, match=r"\['kproj'\].*matched no module.*'model.layers.0.self_attn.q_proj'"):
        ia3.apply(_llama(), ia3.IA3Config(targets=["kproj"], feedforward=None))
    model = _llama()
    ia3.apply(model, ia3.IA3Config())
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj' already has \(IA\)\^3"):
        ia3.apply(model, ia3.IA3Config())
    with pytest.raises(ValueError, match="already has"):
        ia3.apply(model, ia3.IA3Config(targets=r".*k_proj.*", feedforward=None))
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"'0' matched the \(IA\)\^3 targets but is a Conv2d"):
        ia3.apply(conv, ia3.IA3Config(targets=["0", "2"], feedforward=None))
    assert type(conv[2]) is nn.Linear and all(p.requires_grad for p in conv.parameters())  # nothing half-applied
    mha = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    with pytest.raises(TypeError, match=r"'self_attn.out_proj'.*MultiheadAttention"):
        ia3.apply(mha, ia3.IA3Config(targets=["out_proj"], feedforward=None))
    with pytest.raises(TypeError, match="expects an ia3.IA3Config, got LoraConfig"):
        ia3.apply(_llama(), tt.lora.LoraConfig())
    lora_model = _llama()
    tt.lora.apply(lora_model, tt.lora.LoraConfig(targets=["k_proj"]))
    with pytest.raises(TypeError, match=r"'model.layers.0.self_attn.k_proj.base'.*LoRALinear"):
        ia3.apply(lora_model, ia3.IA3Config(targets=r".*k_proj\.base", feedforward=None))
    with pytest.raises(ValueError, match="has no \\(IA\\)\\^3 layers"):
        ia3.merge(_llama())


def test_encoder_layer_fast_path_does_not_skip_the_vector():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    ia3.apply(layer, ia3.IA3Config(targets=["linear1", "linear2"], feedforward=["linear2"]))
    _randomise(layer)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        active = layer(x)
        with ia3.disabled(layer):
            plain = layer(x)
    assert (active - plain).abs().max() > 1e-3


def test_bf16_base_keeps_fp32_vectors():
    model = _llama(dtype=torch.bfloat16)
    ia3.apply(model, ia3.IA3Config())
    layer = model.model.layers[0].mlp.down_proj
    assert layer.base.weight.dtype == torch.bfloat16 and layer.ia3_l.dtype == torch.float32
    out = model(_ids())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.ia3_l.grad is not None and layer.ia3_l.grad.dtype == torch.float32


def test_peft_config_dict_and_config_from_peft():
    cfg = ia3.IA3Config(targets=["k_proj", "down_proj"], feedforward=["down_proj"], exclude=r".*layers\.0\..*")
    d = json.loads(json.dumps(ia3.peft_config_dict(cfg)))
    assert (d["peft_type"], d["target_modules"], d["feedforward_modules"]) == ("IA3", ["k_proj", "down_proj"], ["down_proj"])
    assert (d["fan_in_fan_out"], d["init_ia3_weights"], d["exclude_modules"]) == (False, True, r".*layers\.0\..*")
    back = ia3.config_from_peft(d)
    assert (sorted(back.targets), back.feedforward, back.exclude) == (sorted(cfg.targets), cfg.feedforward, cfg.exclude)
    with pytest.raises(ValueError, match="peft_type='LORA'"):
        ia3.config_from_peft({**d, "peft_type": "LORA"})
    with pytest.raises(ValueError, match=r"unknown IA3 config fields \['r'\]"):
        ia3.config_from_peft({**d, "r": 8})
    with pytest.raises(ValueError, match="'target_modules' is missing"):
        ia3.config_from_peft({**d, "target_modules": None})
    assert ia3.config_from_peft({**d, "modules_to_save": ["lm_head"]}).modules_to_save == ["lm_head"]
    with pytest.raises(ValueError, match=r"field 'modules_to_save' must be None or a list of strings"):
        ia3.config_from_peft({**d, "modules_to_save": "lm_head"})
    with pytest.raises(ValueError, match="targets is a callable"):
        ia3.peft_config_dict(ia3.IA3Config(targets=lambda n, m: True, feedforward=None))
    with pytest.raises(TypeError, match="got str"):
        ia3.peft_config_dict("IA3")


def test_peft_config_dict_of_a_model_writes_exact_paths_and_guards_suffix_clashes():
    model = _llama()
    names = ia3.apply(model, ia3.IA3Config())
    d = ia3.peft_config_dict(model)
    assert d["target_modules"] == names
    assert d["feedforward_modules"] == [n for n in names if n.endswith("down_proj")]

    class Clash(nn.Module):  # PEFT tests "fc" as a plain suffix, which "xfc" also has
        def __init__(self):
            super().__init__()
            self.fc, self.xfc = nn.Linear(4, 4), nn.Linear(4, 4)

    clash = Clash()
    ia3.apply(clash, ia3.IA3Config(targets=["fc", "xfc"], feedforward=["fc"]))
    ff = ia3.peft_config_dict(clash)["feedforward_modules"]
    assert isinstance(ff, str) and re.fullmatch(ff, "fc") and not re.fullmatch(ff, "xfc")


# ---- interop with Hugging Face peft (skipped where peft/transformers are not installed) ----

@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A tiny random transformers Llama (with biases) and its save_pretrained directory, built once."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF zero-inits biases; randomise so the bias scaling is exercised
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return hf, path


def _peft_model(hf, peft):
    cfg = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    return peft.get_peft_model(copy.deepcopy(hf), cfg).eval()


def test_outputs_and_state_dicts_match_peft_both_ways(hf_checkpoint):
    peft = pytest.importorskip("peft")
    hf, path = hf_checkpoint
    ours, _ = tt.load_pretrained(path)
    ia3.apply(ours, ia3.IA3Config())
    _randomise(ours)
    theirs = _peft_model(hf, peft)
    result = peft.set_peft_model_state_dict(theirs, ia3.state_dict(ours))
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "ia3_l" in k]
    ids = _ids(64)
    with torch.no_grad():
        want = theirs(ids).logits
        torch.testing.assert_close(ours(ids), want, rtol=1e-5, atol=1e-5)  # fp32, same op order
        assert (want - hf(ids).logits).abs().max() > 1e-3  # the vectors matter
    reverse = {k: torch.randn_like(v) * 0.3 + 1 for k, v in peft.get_peft_model_state_dict(theirs).items()}
    peft.set_peft_model_state_dict(theirs, reverse)
    ia3.load_state_dict(ours, reverse)  # strict: PEFT's keys and shapes are exactly ours
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-5, atol=1e-5)
        ia3.merge(ours)
        merged = theirs.merge_and_unload()
        torch.testing.assert_close(ours(ids), merged(ids).logits, rtol=1e-5, atol=1e-5)  # bias treated alike


def test_adapter_directories_load_both_ways(hf_checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    hf, path = hf_checkpoint
    ours, _ = tt.load_pretrained(path)
    ia3.apply(ours, ia3.IA3Config())
    _randomise(ours)
    out = tmp_path / "ours"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(ia3.peft_config_dict(ours)))
    save_file({k: v.contiguous() for k, v in ia3.state_dict(ours).items()}, str(out / "adapter_model.safetensors"))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(out)).eval()
    ids = _ids(64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)

    theirs = _peft_model(hf, peft)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "ia3_l" in n:
                p.normal_(1.0, 0.3)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    fresh, _ = tt.load_pretrained(path)
    cfg = ia3.config_from_peft(json.loads((tmp_path / "theirs" / "adapter_config.json").read_text()))
    ia3.apply(fresh, cfg)
    ia3.load_state_dict(fresh, load_file(str(tmp_path / "theirs" / "adapter_model.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_merge_refuses_a_tied_lm_head(tmp_path):
    """Scaling a tied lm_head's weight would scale the input embedding too."""
    model = tt.models.build("qwen2-tiny").eval()  # tie_word_embeddings=True
    tt.ia3.apply(model, tt.ia3.IA3Config(targets=["lm_head"], feedforward=[]))
    with torch.no_grad():
        model.lm_head.ia3_l.fill_(2.0)
    before = model.model.embed_tokens.weight.detach().clone()
    for merge in (tt.ia3.merge, tt.ia3.merge_and_unload, lambda m: tt.save_pretrained(m, tmp_path)):
        with pytest.raises(ValueError, match="tied"):
            merge(model)
    assert torch.equal(model.model.embed_tokens.weight, before)
