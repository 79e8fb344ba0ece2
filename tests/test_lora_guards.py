"""Regressions found by a hostile review of LoRA on any module: each failing call leaves the model as it
was, each refusal names the reason, and torch's fused transformer paths never bypass an adapter."""
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations

import tinytune as tt


def _flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_parametrized_weights_refuse_merge_and_keep_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 8))
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["0", "2"]))
    with torch.no_grad():
        for _, layer in tt.lora.lora_layers(model):
            layer.lora_B.normal_()
    x = torch.randn(4, 8)
    before = model(x)
    for call in (tt.lora.merge, tt.lora.merge_and_unload):
        with pytest.raises(TypeError, match=r"'0': the ParametrizedLinear's weights are parametrized \(weight\)"):
            call(model)
        assert not any(layer.merged for _, layer in tt.lora.lora_layers(model))  # not even layer '2'
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_transformer_encoder_nested_tensor_path_never_reaches_the_adapters():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    tt.lora.apply(encoder, tt.lora.LoraConfig(rank=2, targets="all-linear"))
    with torch.no_grad():
        for _, lora_layer in tt.lora.lora_layers(encoder):
            for name, p in lora_layer.named_parameters(recurse=False):
                if "lora_B" in name or "lora_out_B" in name:
                    p.normal_(0, 0.1)
    x, pad = torch.randn(2, 5, 16), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out = encoder(x, src_key_padding_mask=pad)
        assert not out.is_nested
    with torch.no_grad():
        expected = encoder(x, src_key_padding_mask=pad)
        tt.lora.merge(encoder)
        torch.testing.assert_close(encoder(x, src_key_padding_mask=pad)[~pad], expected[~pad], rtol=1e-5, atol=1e-5)


def test_a_refused_apply_leaves_every_flag_and_weight_as_it_was():
    model = nn.ModuleDict({"lin": nn.Linear(8, 8), "conv": nn.Conv2d(3, 4, 3),
                           "attn": nn.MultiheadAttention(8, 2)})
    flags, weight = _flags(model), model["lin"].weight.detach().clone()
    with pytest.raises(ValueError, match="does not support dora=True"):
        tt.lora.apply(model, tt.lora.LoraConfig(rank=2, dora=True, targets=["conv", "attn"]))
    with pytest.raises(ValueError, match="init='pissa' is not supported for LoRAConv2d"):
        tt.lora.apply(model, tt.lora.LoraConfig(rank=2, init="pissa", targets=["lin", "conv"]))
    assert _flags(model) == flags and type(model["conv"]) is nn.Conv2d and type(model["lin"]) is nn.Linear
    torch.testing.assert_close(model["lin"].weight, weight, rtol=0, atol=0)  # PiSSA's residual was undone


def test_a_factory_that_returns_no_lora_layer_is_refused_and_nothing_changes():
    class Foo(nn.Linear):
        pass

    tt.lora.register_layer(Foo, lambda base, spec, name: nn.Identity())
    model = nn.Sequential(Foo(4, 4))
    with pytest.raises(TypeError, match="registered for Foo returned a Identity, not a tt.lora.LoRALayer"):
        tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["0"]))
    assert type(model[0]) is Foo and model[0].weight.requires_grad


def test_skip_warning_says_why_and_no_match_names_modules_to_save():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match=r"Why: '0' \(Conv2d\): it is a grouped convolution \(groups=2\)"):
        tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["0", "1"]))
    other = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"modules in modules_to_save \['1'\] and everything inside them"):
        tt.lora.apply(other, tt.lora.LoraConfig(rank=2, targets=["1"], modules_to_save=["1"]))


def test_dilated_or_padded_convs_warn_that_peft_computes_them_differently():
    with pytest.warns(UserWarning, match=r"dilation=\(2, 2\).*PEFT's A ignores it"):
        tt.lora.apply(nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2)), tt.lora.LoraConfig(rank=2, targets=["0"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a plain conv is silent
        tt.lora.apply(nn.Sequential(nn.Conv2d(3, 4, 3)), tt.lora.LoraConfig(rank=2, targets=["0"]))


def test_a_head_tensor_of_an_integer_dtype_is_refused_on_load(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["0"], modules_to_save=["2"]))
    tt.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("2.weight"))
    tensors[key] = tensors[key].to(torch.int64)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "tinytune_manifest.json").unlink()  # hand-edited on purpose
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    fresh = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    flags = _flags(fresh)
    with pytest.raises(ValueError, match=r"mistyped keys: .*2\.weight: file torch.int64 vs model torch.float32"):
        tt.load_adapter(fresh, tmp_path)
    assert _flags(fresh) == flags and type(fresh[0]) is nn.Linear
