"""A user's own layer type takes LoRA through `tt.lora.register_layer` (issue 10, item 3)."""
import pytest
import torch
import torch.nn as nn

import tinytune as tt


class Int8Linear(nn.Module):
    """A toy weight-only int8 linear: the weight is stored quantised, per output row scaled."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.detach().abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(linear.weight.detach() / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x):
        return x @ (self.qweight.float() * self.scale).t() + self.bias


class FloatLinearLike(nn.Module):
    """A linear with its own forward (it would bypass the fused op), keeping a float weight."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)

    def forward(self, x):
        return x @ self.weight.t()


tt.lora.register_layer(Int8Linear, tt.lora.LoRALinearLike, linear=True)
tt.lora.register_layer(FloatLinearLike, tt.lora.LoRALinearLike, linear=True)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(Int8Linear(nn.Linear(8, 16)), nn.GELU(), FloatLinearLike(16, 16), nn.Linear(16, 3))


def _set_b(model):
    with torch.no_grad():
        for _, layer in tt.lora.lora_layers(model):
            layer.lora_B.normal_()


def test_registered_types_take_lora_by_name_and_by_all_linear():
    model = _model()
    names = tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets="all-linear"))
    assert names == ["0", "2"]  # the last nn.Linear changes the width: the output layer, left out
    assert isinstance(model[0], tt.lora.LoRALinearLike) and isinstance(model[2], tt.lora.LoRALinearLike)
    assert tt.count_parameters(model).trainable == 2 * (8 + 16) + 2 * (16 + 16)


def test_forward_is_base_plus_low_rank_and_gradients_reach_only_the_adapter():
    model, plain = _model(), _model()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, alpha=4, targets=["0"]))
    _set_b(model)
    x = torch.randn(5, 8)
    layer = model[0]
    expected = plain[0](x) + 2.0 * (x @ layer.lora_A.t()) @ layer.lora_B.t()  # scaling = alpha / rank
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    model(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert layer.base.bias.grad is None and model[3].weight.grad is None


def test_adapter_files_round_trip_and_int8_refuses_merge(tmp_path):
    model = _model()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets="all-linear"))
    _set_b(model)
    tt.save_adapter(model, tmp_path)
    fresh = tt.load_adapter(_model(), tmp_path)
    x = torch.randn(4, 8)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"'0': cannot fold LoRA into Int8Linear, which has no weight.*dequantise"):
        tt.lora.merge(model)
    assert not model[2].merged  # the float layer was not merged either: a refused merge changes nothing
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_float_custom_layer_merges():
    model = _model()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["2"]))
    _set_b(model)
    x = torch.randn(4, 8)
    before = model(x)
    tt.lora.merge(model)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    tt.lora.merge_and_unload(model)
    assert type(model[2]) is FloatLinearLike
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_variants_needing_the_weight_are_refused():
    for kwargs, what in (({"dora": True}, "dora=True"), ({"init": "pissa"}, "init='pissa'")):
        with pytest.raises(ValueError, match=f"{what} needs the layer's weight"):
            tt.lora.apply(_model(), tt.lora.LoraConfig(rank=2, targets=["0"], **kwargs))


def test_register_layer_checks_its_arguments_and_unregistered_types_are_skipped():
    with pytest.raises(TypeError, match="module_type must be an nn.Module subclass"):
        tt.lora.register_layer(int, tt.lora.LoRALinearLike)
    with pytest.raises(TypeError, match="must subclass tt.lora.LoRALayer"):
        tt.lora.register_layer(nn.GELU, dict)

    class NoSizes(nn.Module):
        def forward(self, x):
            return x

    tt.lora.register_layer(NoSizes, tt.lora.LoRALinearLike)
    model = nn.Sequential(nn.Linear(4, 4), NoSizes())
    with pytest.warns(UserWarning, match=r"skipped: '1 \(NoSizes\)'"):
        assert tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["0", "1"])) == ["0"]


def test_a_type_registered_by_name_takes_lora_whatever_the_import_order():
    """GPT-2's Conv1D is registered by name: tinytune imported BEFORE transformers still adapts it."""
    import subprocess
    import sys

    code = ("import tinytune as tt, transformers\n"
            "cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)\n"
            "model = transformers.GPT2Model(cfg)\n"
            "print(tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets='all-linear')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "['h.0.attn.c_attn', 'h.0.attn.c_proj', 'h.0.mlp.c_fc', 'h.0.mlp.c_proj']" in done.stdout
    with pytest.raises(TypeError, match="expected 'package.module.ClassName'"):
        tt.lora.register_layer_by_name("Conv1D", tt.lora.LoRALinearLike)


def test_layers_made_inside_an_eval_model_are_in_eval_mode():
    """apply() on a model in eval(): no adapter dropout until the user calls train()."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Conv1d(8, 8, 1), nn.Linear(8, 8)).eval()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, dropout=0.5, targets=["0", "1"]))
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(layer.training for _, layer in tt.lora.lora_layers(model))
