"""LoRA on nn.Conv1d/2d/3d and on transformers' GPT-2 Conv1D (issue 10, item 1), checked against `peft`
on the same modules: outputs, adapter files both ways, merge, DoRA, PiSSA (Conv1D), refusals."""
import copy
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tinytune as tt

peft = pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[dev]' installs it)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")  # peft needs it too
from transformers.pytorch_utils import Conv1D  # noqa: E402

tt.lora.register_transformers_conv1d()  # tinytune was imported first: register GPT-2's Conv1D now

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
LAYER = {1: tt.lora.LoRAConv1d, 2: tt.lora.LoRAConv2d, 3: tt.lora.LoRAConv3d}
SIDE = {1: 12, 2: 8, 3: 6}  # input side length per dimension: small, yet both convs keep a few positions


def _cnn(dim: int = 2, seed: int = 0) -> nn.Module:
    """Conv(3, 8, 3, padding=1) -> ReLU -> Conv(8, 8, 3, stride=2) -> Flatten -> Linear, in `dim` dims."""
    torch.manual_seed(seed)
    conv = CONV[dim]
    n_flat = 8 * ((SIDE[dim] - 3) // 2 + 1) ** dim
    return nn.Sequential(conv(3, 8, 3, padding=1), nn.ReLU(), conv(8, 8, 3, stride=2), nn.Flatten(),
                         nn.Linear(n_flat, 4)).eval()


def _x(dim: int, n: int = 2, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, *(SIDE[dim],) * dim, dtype=dtype)


def _randomise(model: nn.Module, std: float = 0.3) -> None:
    """Nonzero B (and a perturbed DoRA magnitude), so the adapter changes the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:
                p.add_(torch.randn_like(p) * std)


def _peft_cnn(base, dim=2, dora=False, dropout=0.0):
    cfg = peft.LoraConfig(target_modules=["0", "2"], r=2, lora_alpha=4, use_dora=dora, lora_dropout=dropout)
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def _tt_cnn(base, dora=False, dropout=0.0):
    model = copy.deepcopy(base)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, alpha=4, targets=["0", "2"], dora=dora, dropout=dropout))
    return model


# ----------------------------------------------------------------------------- the layer itself
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_factors_have_peft_shapes_and_the_new_layer_equals_its_base(dim):
    base = _cnn(dim)
    model = _tt_cnn(base, dora=True)
    layer = model[2]
    assert isinstance(layer, LAYER[dim])
    assert tuple(layer.lora_A.shape) == (2, 8, *(3,) * dim)
    assert tuple(layer.lora_B.shape) == (8, 2, *(1,) * dim)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(8 * 3 ** dim)  # kaiming-uniform, a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert 0.5 * bound < layer.lora_A.abs().max() <= bound
    keys = tt.lora.state_dict(model)
    assert tuple(keys["base_model.model.2.lora_magnitude_vector"].shape) == (1, 8, *(1,) * dim)  # PEFT's shape
    x = _x(dim)
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)


def test_gaussian_init_and_trainable_parameters():
    model = _cnn()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets=["0", "2"], init="gaussian"))
    assert abs(model[2].lora_A.std().item() - 1 / 4) < 0.05  # N(0, 1/r), PEFT's "gaussian"
    assert tt.count_parameters(model).trainable == 4 * (3 * 9 + 8) + 4 * (8 * 9 + 8)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("dora", [False, True])
def test_forward_matches_peft_in_eval_and_with_dropout(dim, dora):
    base = _cnn(dim)
    theirs, ours = _peft_cnn(base, dim, dora, dropout=0.3), _tt_cnn(base, dora, dropout=0.3)
    _randomise(theirs)
    tt.lora.load_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    x = _x(dim)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=1e-5, atol=1e-6)
        theirs.train(), ours.train()
        torch.manual_seed(1)
        expected = theirs(x)
        torch.manual_seed(1)  # both draw the dropout mask from torch's generator, in the same order
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)


def test_forward_equals_a_naive_reference_in_float64_with_dilation_and_padding_modes():
    torch.manual_seed(0)
    for kwargs in ({"padding": 2, "dilation": 2}, {"padding": 1, "padding_mode": "reflect", "stride": 2},
                   {"padding": "same", "padding_mode": "circular"}):
        conv = nn.Conv2d(3, 5, 3, **kwargs).double()
        layer = tt.lora.LoRAConv2d(conv, rank=3, alpha=6)
        with torch.no_grad():
            layer.lora_B.normal_()
        x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
        # A convolves exactly as the base does (padding_mode included, here by hand); B mixes channels
        pad = conv._reversed_padding_repeated_twice if conv.padding_mode != "zeros" else None
        xa = F.pad(x, pad, mode=conv.padding_mode) if pad else x
        geometry = {"stride": conv.stride, "dilation": conv.dilation, "padding": 0 if pad else conv.padding}
        expected = conv(x) + 2.0 * F.conv2d(F.conv2d(xa, layer.lora_A, **geometry), layer.lora_B)
        out = layer(x)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(out.square().sum(), (x, layer.lora_A, layer.lora_B))
        want = torch.autograd.grad(expected.square().sum(), (x, layer.lora_A, layer.lora_B))
        for got, ref in zip(grads, want):
            torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
        assert torch.autograd.gradcheck(lambda t: layer(t), (x[:1, :, :5, :5].detach().requires_grad_(),))
        with torch.no_grad():  # merging is exact for every geometry: B A is one kernel of the base's shape
            merged = layer.base._conv_forward(x, layer.merged_weight(), conv.bias)
            torch.testing.assert_close(merged, out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_unmerge_disabled_and_merge_and_unload(dora):
    base = _cnn()
    model = _tt_cnn(base, dora)
    _randomise(model)
    x = _x(2)
    with torch.no_grad():
        y = model(x)
        with tt.lora.disabled(model):
            assert torch.equal(model(x), base(x))  # bit for bit
        tt.lora.merge(model)
        tt.lora.merge(model)  # twice is once
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
        tt.lora.unmerge(model)
        torch.testing.assert_close(model[0].base.weight, base[0].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)
        state = tt.lora.merged_state(model)
        tt.lora.merge_and_unload(model)
        assert type(model[0]) is nn.Conv2d and type(model[2]) is nn.Conv2d
        assert torch.equal(model[2].weight, state["2"]["weight"])
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-6)


def test_merge_equals_peft_merge():
    base = _cnn()
    theirs, ours = _peft_cnn(base), _tt_cnn(base)
    _randomise(theirs)
    tt.lora.load_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    merged_theirs = theirs.merge_and_unload()
    tt.lora.merge_and_unload(ours)
    for a, b in zip(merged_theirs.state_dict().values(), ours.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bf16_base_keeps_fp32_adapters():
    model = _cnn().to(torch.bfloat16)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, alpha=4, targets=["0"]))
    assert model[0].lora_A.dtype == torch.float32
    assert model(_x(2, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_two_adapters_and_a_mixed_batch():
    model = _cnn()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, alpha=4, targets=["0", "2"]))
    tt.lora.add_adapter(model, "other", tt.lora.LoraConfig(rank=3, alpha=3, targets=["2"]))
    tt.lora.set_adapter(model, "other")
    _randomise(model)
    tt.lora.set_adapter(model, "default")
    _randomise(model)
    x = _x(2, n=3)
    with torch.no_grad():
        per_adapter = {}
        for name in ("default", "other"):
            tt.lora.set_adapter(model, name)
            per_adapter[name] = model(x)
        with tt.lora.adapter_per_row(model, ["other", "default", "other"]):
            mixed = model(x)
    torch.testing.assert_close(mixed[0], per_adapter["other"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[1], per_adapter["default"][1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("dora", [False, True])
def test_tinytune_adapter_loads_in_peft(tmp_path, dim, dora):
    base = _cnn(dim)
    ours = _tt_cnn(base, dora)
    _randomise(ours)
    tt.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["use_dora"], config["fan_in_fan_out"], config["target_modules"]) == (dora, False, ["0", "2"])
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    x = _x(dim)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("dora", [False, True])
def test_peft_adapter_loads_in_tinytune(tmp_path, dim, dora):
    base = _cnn(dim)
    theirs = _peft_cnn(base, dim, dora)
    _randomise(theirs)
    theirs.save_pretrained(str(tmp_path))
    ours = tt.load_adapter(copy.deepcopy(base), tmp_path)
    assert isinstance(ours[0], LAYER[dim]) and ours[0].dora is dora
    x = _x(dim)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs.eval()(x), rtol=1e-5, atol=1e-6)


def test_a_conv_file_whose_rank_disagrees_with_its_config_is_refused(tmp_path):
    model = _tt_cnn(_cnn())
    tt.save_adapter(model, tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), r=3)))
    (tmp_path / "tinytune_manifest.json").unlink(missing_ok=True)  # hand-edited on purpose
    with pytest.raises(ValueError, match=r"lora_A.weight' has shape \(2, 3, 3, 3\).*r=3 \(expected size 3 on axis 0\)"):
        tt.load_adapter(_cnn(), tmp_path)


# ------------------------------------------------------------------------------------ refusals
def test_grouped_convolutions_are_skipped_with_the_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    with pytest.warns(UserWarning, match=r"skipped: '1 \(Conv2d\)'"):
        assert tt.lora.apply(model, tt.lora.LoraConfig(rank=2, alpha=4, targets=["0", "1"])) == ["0"]
    with pytest.raises(TypeError, match=r"grouped convolution \(groups=8\).*could never be merged"):
        tt.lora.LoRAConv2d(nn.Conv2d(8, 8, 3, groups=8), rank=8, alpha=8)
    with pytest.raises(TypeError, match=r"matched only modules LoRA cannot adapt.*groups=2"):
        tt.lora.apply(nn.Sequential(nn.Conv1d(4, 4, 3, groups=2)), tt.lora.LoraConfig(rank=2, targets=["0"]))


def test_a_peft_adapter_on_a_grouped_convolution_is_refused_by_name(tmp_path):
    base = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2))
    with pytest.warns(UserWarning, match="groups > 1"):
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["0"], r=2, lora_alpha=4))
    theirs.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"lora_B.weight' has shape \(8, 1, 1, 1\).*PEFT's LoRA on a grouped "
                                         r"convolution \(groups=2\), which tinytune\s+does not adapt"):
        tt.load_adapter(copy.deepcopy(base), tmp_path)
    assert not tt.lora.is_applied(base)


def test_pissa_on_a_convolution_is_refused_and_nothing_changes():
    model = _cnn()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"init='pissa' is not supported for LoRAConv2d .*no\s+PiSSA for convolutions"):
        tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["0", "2"], init="pissa"))
    assert not tt.lora.is_applied(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_all_linear_leaves_convolutions_out():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4, 16), nn.ReLU(), nn.Linear(16, 2))
    assert tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets="all-linear")) == ["2"]  # "4": the output layer


def test_the_constructor_checks_the_type():
    with pytest.raises(TypeError, match="LoRAConv3d wraps an nn.Conv3d, got Conv2d"):
        tt.lora.LoRAConv3d(nn.Conv2d(3, 3, 1), rank=1, alpha=1)


# ------------------------------------------------------------------------------ training smoke
def test_a_cnn_with_lora_trains_saves_loads_and_merges(tmp_path):
    base = _cnn()
    model = _tt_cnn(base)
    x, target = _x(2, n=16), torch.randint(0, 4, (16,))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    frozen = copy.deepcopy(base.state_dict())
    losses = []
    model.train()
    for _ in range(20):
        loss = F.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    base_state = {k.replace(".base", ""): v for k, v in model.state_dict().items() if ".lora" not in k}
    assert all(torch.equal(frozen[k], v) for k, v in base_state.items())  # only the adapter moved
    tt.save_adapter(model, tmp_path)
    fresh = tt.load_adapter(copy.deepcopy(base), tmp_path).eval()
    model.eval()
    with torch.no_grad():
        y = model(x)
        assert torch.equal(fresh(x), y)
        tt.lora.merge(fresh)
        torch.testing.assert_close(fresh(x), y, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------- GPT-2's Conv1D
def _gpt2(seed=0):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def _ids():
    return torch.randint(0, 64, (2, 7))


def _adapted_names(peft_model):
    return sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer))


@pytest.mark.parametrize("targets", [["c_attn", "c_proj"], "all-linear"])
@pytest.mark.parametrize("dora", [False, True])
def test_gpt2_conv1d_matches_peft_with_fan_in_fan_out(targets, dora):
    hf = _gpt2()
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(target_modules=targets, r=4, lora_alpha=8,
                                                                     use_dora=dora, fan_in_fan_out=True))
    ours = copy.deepcopy(hf)
    names = tt.lora.apply(ours, tt.lora.LoraConfig(rank=4, alpha=8, targets=targets, dora=dora))
    assert sorted(names) == _adapted_names(theirs) and "lm_head" not in names
    assert all(isinstance(ours.get_submodule(n), tt.lora.LoRAConv1D) for n in names)
    _randomise(theirs, std=0.1)
    tt.lora.load_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
        y = ours(ids).logits
        tt.lora.merge(ours)
        torch.testing.assert_close(ours(ids).logits, y, rtol=1e-5, atol=1e-5)
        tt.lora.unmerge(ours)
        tt.lora.merge_and_unload(ours)
        assert type(ours.transformer.h[0].attn.c_attn) is Conv1D
        torch.testing.assert_close(ours(ids).logits, y, rtol=1e-5, atol=1e-5)


def test_gpt2_files_both_ways(tmp_path):
    hf = _gpt2()
    ours = copy.deepcopy(hf)
    tt.lora.apply(ours, tt.lora.LoraConfig(rank=4, alpha=8, targets="all-linear", dora=True))
    _randomise(ours, std=0.1)
    tt.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ours")).eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
    theirs.save_pretrained(str(tmp_path / "theirs"))  # fan_in_fan_out: true, which tinytune accepts
    assert json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    again = tt.load_adapter(copy.deepcopy(hf), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


def test_gpt2_pissa_matches_peft():
    hf = _gpt2()
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(target_modules=["c_attn"], r=4, lora_alpha=8,
                                                                     init_lora_weights="pissa", fan_in_fan_out=True))
    ours = copy.deepcopy(hf)
    tt.lora.apply(ours, tt.lora.LoraConfig(rank=4, alpha=8, targets=["c_attn"], init="pissa"))
    layer, peft_layer = ours.transformer.h[1].attn.c_attn, theirs.base_model.model.transformer.h[1].attn.c_attn
    torch.testing.assert_close(layer.base.weight, peft_layer.base_layer.weight, rtol=1e-6, atol=1e-6)  # the residual
    torch.testing.assert_close(layer.lora_A, peft_layer.lora_A.default.weight, rtol=1e-6, atol=1e-6)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)  # PiSSA: W_res + s B A = W


def test_conv1d_layer_in_float64_against_the_reference():
    torch.manual_seed(0)
    conv = Conv1D(6, 5).double()  # nf=6 outputs, nx=5 inputs: weight (5, 6)
    layer = tt.lora.LoRAConv1D(conv, rank=2, alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    assert (layer.in_features, layer.out_features, tuple(layer.delta_weight().shape)) == (5, 6, (5, 6))
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    expected = conv(x) + 2.0 * x @ layer.lora_A.t() @ layer.lora_B.t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv(x) + x @ layer.delta_weight(), expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x[:1].detach().requires_grad_(),))


def test_conv1d_subclass_with_its_own_forward_is_refused():
    class Scaled(Conv1D):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(TypeError, match="overrides Conv1D.forward"):
        tt.lora.LoRAConv1D(Scaled(4, 4), rank=1, alpha=1)


def test_conv1d_registration_is_lazy_and_tinytune_never_imports_transformers():
    script = (
        "import sys, torch.nn as nn, tinytune as tt\n"
        "assert 'transformers' not in sys.modules\n"
        "assert 'transformers.pytorch_utils.Conv1D' in tt.lora.registered_types()  # by name: nothing imported\n"
        "assert tt.lora.register_transformers_conv1d() is False\n"
        "from transformers.pytorch_utils import Conv1D\n"
        "assert tt.lora.adaptable_modules(nn.Sequential(Conv1D(4, 3))) == ['0']\n"
        "assert tt.lora.register_transformers_conv1d() is True and Conv1D in tt.lora.registered_types()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    script = (  # transformers loaded first: the same
        "import torch.nn as nn\n"
        "from transformers.pytorch_utils import Conv1D\n"
        "import tinytune as tt\n"
        "assert tt.lora.adaptable_modules(nn.Sequential(Conv1D(4, 3))) == ['0']\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_weighted_combinations_of_conv_adapters_refuse_cat_and_svd_by_name():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["0"]))
    tt.lora.add_adapter(model, "b", tt.lora.LoraConfig(rank=2, targets=["0"]))
    for combination in ("cat", "svd"):
        with pytest.raises(ValueError, match=r"layers \['0'\] hold convolution factors; use combination='linear'"):
            tt.lora.add_weighted_adapter(model, ["default", "b"], [0.5, 0.5], "c", combination=combination)
    assert tt.lora.list_adapters(model) == ["default", "b"]
    tt.lora.add_weighted_adapter(model, ["default", "b"], [0.5, 0.5], "c", combination="linear")
    assert "c" in tt.lora.list_adapters(model)
