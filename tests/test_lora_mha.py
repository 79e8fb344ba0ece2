"""LoRA on nn.MultiheadAttention (tt.lora.LoRAMultiheadAttention): against a hand-merged module and against
PEFT's lora.MultiheadAttention through adapter files both ways, merge/unmerge, disabled, the fused eval
paths, gradients, refusals, and a ViT-like model under "all-linear".

PEFT 0.21.2 adds the out_proj delta TWICE in its forward and its merge (`merge()` writes W + dW into
out_proj, then calls out_proj.merge(), which adds dW again; huggingface/peft PR #3774 fixes it).
tinytune computes W + dW, the LoRA the files describe; the comparisons with PEFT therefore use a copy of
the tinytune model whose out_proj B is multiplied by the factor PEFT is measured to apply
(`_peft_out_proj_factor`: 2 on 0.21.2, 1 once fixed), so they check everything else exactly.

Tolerances (fp32, outputs of size ~1-10): tinytune and the hand-merged module form the same
`W + (B @ A) * s` and run the module's own forward: ATOL = 1e-6 (observed: 0). PEFT rounds
`(W + dW) + dW` where the comparison copy forms `W + 2 dW`: PEFT_ATOL = 1e-5 (observed <= 4e-6; exact for
in_proj). The fused eval path (`torch._native_multi_head_attention`) against the unfused training-mode
computation, and merged against unmerged, differ by float reassociation only: FUSED_ATOL = 1e-5.
"""
import copy
import functools

import pytest
import torch
import torch.nn as nn

import tinytune as tt

peft = pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[dev]' installs it)")

E, HEADS, ATOL, PEFT_ATOL, FUSED_ATOL = 16, 4, 1e-6, 1e-5, 1e-5


class Net(nn.Module):
    """One nn.MultiheadAttention under a name (PEFT cannot target the root)."""

    def __init__(self, batch_first=True, **kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **kwargs)

    def forward(self, query, key, value, **kwargs):
        return self.attn(query, key, value, **kwargs)


@functools.lru_cache(maxsize=None)
def _peft_out_proj_factor() -> int:
    """How many times PEFT's forward adds the out_proj delta (2 on peft 0.21.2, see the module docstring)."""
    torch.manual_seed(0)
    net = Net()
    reference = copy.deepcopy(net.attn)
    theirs = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["attn"]))
    _randomise(theirs)
    layer = theirs.base_model.model.attn
    x = torch.randn(2, 3, E)
    out = theirs(x, x, x)[0]
    for factor in (1, 2):
        weights = {"in_proj_weight": reference.in_proj_weight + layer.get_delta_weight("default"),
                   "out_proj.weight": reference.out_proj.weight
                   + factor * layer.base_layer.out_proj.get_delta_weight("default")}
        if torch.allclose(torch.func.functional_call(reference, weights, (x, x, x))[0], out, atol=1e-5):
            return factor
    raise AssertionError("PEFT's MultiheadAttention computes neither W + dW nor W + 2 dW on out_proj")


def _like_peft(model):
    """A copy of a tinytune model computing what PEFT computes from the same adapter (see the docstring)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in tt.lora.lora_layers(model):
            if isinstance(layer, tt.lora.LoRAMultiheadAttention):
                for name in layer.adapters:
                    layer._factor("lora_out_B", name).mul_(_peft_out_proj_factor())
    return model


def _randomise(model, std=0.1):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=std)


def _inputs(batch_first, n=3, lq=5, lk=7):
    """The same query, key, value and masks on every call (a generator of its own)."""
    generator = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(n, length, E, generator=generator) for length in (lq, lk, lk))
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    padding = torch.zeros(n, lk, dtype=torch.bool)
    padding[1, -3:] = True  # row 1: its last three keys are padding
    attn_mask = torch.rand(lq, lk, generator=generator) > 0.6  # True: not attended
    attn_mask[:, 0] = False  # key 0 always is, so no row is empty
    return (q, k, v), padding, attn_mask


# the call variants every parity test runs: masks, weights per head or averaged, causal
CALLS = [
    {},
    {"need_weights": False},
    {"average_attn_weights": False},
    {"key_padding_mask": True},
    {"attn_mask": True},
    {"key_padding_mask": True, "attn_mask": True, "average_attn_weights": False},
    {"attn_mask": "causal", "is_causal": True, "need_weights": False},
]


def _call(model, batch_first, call, self_attention=False):
    (q, k, v), padding, attn_mask = _inputs(batch_first)
    if self_attention:
        k = v = q
        padding, attn_mask = padding[:, :q.shape[1 if batch_first else 0]], attn_mask[:, :5]
    kwargs = dict(call)
    if kwargs.get("key_padding_mask"):
        kwargs["key_padding_mask"] = padding
    if kwargs.get("attn_mask") == "causal":
        kwargs["attn_mask"] = torch.ones(attn_mask.shape, dtype=torch.bool).triu(1)  # True above the diagonal
    elif kwargs.get("attn_mask"):
        kwargs["attn_mask"] = attn_mask
    return model(q, k, v, **kwargs)


def _assert_outputs_equal(ours, theirs, atol=ATOL):
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=atol)
    if theirs[1] is None:
        assert ours[1] is None
    else:
        torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=atol)


def _compare_all_calls(ours, theirs, batch_first, atol=ATOL):
    for mode in ("train", "eval"):
        ours.train(mode == "train"), theirs.train(mode == "train")
        for call in CALLS:
            for self_attention in (False, True):
                a, b = _call(ours, batch_first, call, self_attention), _call(theirs, batch_first, call, self_attention)
                _assert_outputs_equal(a, b, atol)
                with torch.no_grad():  # in eval: the fused path in both
                    a, b = (_call(m, batch_first, call, self_attention) for m in (ours, theirs))
                _assert_outputs_equal(a, b, atol)


@pytest.mark.parametrize("batch_first", [True, False])
def test_tinytune_adapter_loads_in_peft_with_equal_outputs(tmp_path, batch_first):
    base = Net(batch_first)
    plain = copy.deepcopy(base)
    names = tt.lora.apply(base, tt.lora.LoraConfig(rank=4, alpha=8, targets=["attn"]))
    assert names == ["attn"] and isinstance(base.attn, tt.lora.LoRAMultiheadAttention)
    _randomise(base)
    tt.save_adapter(base, tmp_path)
    theirs = peft.PeftModel.from_pretrained(plain, str(tmp_path))
    for key, value in peft.get_peft_model_state_dict(theirs).items():  # PEFT's key layout, the same tensors
        torch.testing.assert_close(tt.lora.state_dict(base)[key], value, rtol=0, atol=0)
    assert set(tt.lora.state_dict(base)) == set(peft.get_peft_model_state_dict(theirs))
    _compare_all_calls(_like_peft(base), theirs, batch_first, PEFT_ATOL)


@pytest.mark.parametrize("batch_first", [True, False])
def test_peft_adapter_loads_in_tinytune_with_equal_outputs(tmp_path, batch_first):
    base = Net(batch_first)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["attn"], use_rslora=True)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    _randomise(theirs)
    theirs.save_pretrained(str(tmp_path))
    tt.load_adapter(base, tmp_path)
    assert base.attn.scaling == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
    _compare_all_calls(_like_peft(base), theirs, batch_first, PEFT_ATOL)


def test_file_keys_and_shapes_are_peft_layout():
    model = Net()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=3, targets=["attn"]))
    shapes = {k: tuple(v.shape) for k, v in tt.lora.state_dict(model).items()}
    assert shapes == {"base_model.model.attn.lora_A.weight": (3, E), "base_model.model.attn.lora_B.weight": (3 * E, 3),
                      "base_model.model.attn.base_layer.out_proj.lora_A.weight": (3, E),
                      "base_model.model.attn.base_layer.out_proj.lora_B.weight": (E, 3)}


@pytest.mark.parametrize("batch_first", [True, False])
def test_equals_the_module_with_hand_merged_weights(batch_first):
    """The LoRA the files describe: in_proj_weight + s B A and out_proj.weight + s B' A', each added once."""
    model = Net(batch_first)
    reference = copy.deepcopy(model)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=3, alpha=6, targets=["attn"]))
    _randomise(model)
    layer, s = model.attn, 6 / 3
    with torch.no_grad():
        reference.attn.in_proj_weight += (layer.lora_B @ layer.lora_A) * s
        reference.attn.out_proj.weight += (layer.lora_out_B @ layer.lora_out_A) * s
    _compare_all_calls(model, reference, batch_first)
    query, key = torch.randn(5, E), torch.randn(7, E)  # unbatched: (L, E)
    _assert_outputs_equal(model(query, key, key), reference(query, key, key))


def test_peft_out_proj_factor_is_known():
    assert _peft_out_proj_factor() in (1, 2)  # 2: PEFT's double add (module docstring); 1: fixed


def test_bias_k_bias_v_add_zero_attn_match_peft(tmp_path):
    base = Net(add_bias_kv=True, add_zero_attn=True)
    plain = copy.deepcopy(base)
    tt.lora.apply(base, tt.lora.LoraConfig(rank=2, targets=["attn"]))
    _randomise(base)
    tt.save_adapter(base, tmp_path)
    theirs = peft.PeftModel.from_pretrained(plain, str(tmp_path))
    like_peft = _like_peft(base)
    for call in CALLS:
        _assert_outputs_equal(_call(like_peft, True, call), _call(theirs, True, call), PEFT_ATOL)


def test_new_adapter_computes_the_base_and_disabled_is_the_base_bit_for_bit():
    # bit for bit against a module whose weights require grad exactly when ours do: attention picks
    # its kernel by that, and two kernels differ in the last bits
    model = Net()
    trainable, frozen = copy.deepcopy(model), copy.deepcopy(model).requires_grad_(False)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["attn"]))
    for call in CALLS:  # B = 0: W + 0 is W
        _assert_outputs_equal(_call(model, True, call), _call(trainable, True, call), atol=0)
    _randomise(model)
    assert not torch.allclose(_call(model, True, {})[0], _call(frozen, True, {})[0])
    with tt.lora.disabled(model):
        for call in CALLS:
            _assert_outputs_equal(_call(model, True, call), _call(frozen, True, call), atol=0)


def test_merge_unmerge_merged_state_and_merge_and_unload():
    model = Net()
    plain = copy.deepcopy(model)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["attn"]))
    _randomise(model)
    expected = _call(model, True, {"key_padding_mask": True})
    state = tt.lora.merged_state(model)["attn"]
    assert set(state) == set(plain.attn.state_dict())
    weight, parameter = model.attn.base.in_proj_weight.clone(), model.attn.base.in_proj_weight
    tt.lora.merge(model)
    tt.lora.merge(model)  # twice is once
    assert model.attn.merged and model.attn.base.in_proj_weight is parameter  # merged in place
    _assert_outputs_equal(_call(model, True, {"key_padding_mask": True}), expected, atol=FUSED_ATOL)
    for key, value in model.attn.base.state_dict().items():  # what a merged checkpoint holds
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    tt.lora.unmerge(model)
    torch.testing.assert_close(model.attn.base.in_proj_weight, weight, rtol=0, atol=1e-6)
    plain.attn.load_state_dict(state)
    _assert_outputs_equal(_call(plain, True, {"key_padding_mask": True}), expected, atol=FUSED_ATOL)
    tt.lora.merge_and_unload(model)
    assert type(model.attn) is nn.MultiheadAttention and type(model.attn.out_proj).__name__ != "LoRALinear"
    _assert_outputs_equal(_call(model, True, {"key_padding_mask": True}), expected, atol=FUSED_ATOL)


def test_gradients_reach_both_adapters_and_not_the_base():
    model = Net()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["attn"]))
    _randomise(model)
    out, weights = _call(model, True, {"key_padding_mask": True})
    (out.square().sum() + weights.sum()).backward()
    layer = model.attn
    for p in (layer.lora_A, layer.lora_B, layer.lora_out_A, layer.lora_out_B):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in layer.base.parameters())


def _spy(monkeypatch, name):
    calls = []
    real = getattr(torch, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)
    monkeypatch.setattr(torch, name, spy)
    return calls


def test_fused_eval_path_uses_the_adapter(monkeypatch):
    model = Net()
    plain = copy.deepcopy(model).eval()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["attn"]))
    _randomise(model)
    x = torch.randn(2, 5, E)
    training_mode = model.train()(x, x, x)[0]  # dropout 0: the unfused computation
    fused = _spy(monkeypatch, "_native_multi_head_attention")
    model.eval()
    with torch.no_grad():
        out = model(x, x, x)[0]
        base_out = plain(x, x, x)[0]
    assert fused == ["_native_multi_head_attention"] * 2  # the fused path ran, for the adapted model too
    assert not torch.allclose(out, base_out, atol=1e-3)
    torch.testing.assert_close(out, training_mode, rtol=0, atol=FUSED_ATOL)


def test_transformer_encoder_layer_fast_path_does_not_bypass_the_adapter(monkeypatch):
    layer = nn.TransformerEncoderLayer(E, HEADS, 32, dropout=0.0, batch_first=True)
    plain = copy.deepcopy(layer).eval()
    assert tt.lora.apply(layer, tt.lora.LoraConfig(rank=2, targets=["self_attn"])) == ["self_attn"]
    _randomise(layer)
    x = torch.randn(2, 5, E)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    training_mode = layer.train()(x, src_key_padding_mask=padding)
    block_fused = _spy(monkeypatch, "_transformer_encoder_layer_fwd")
    layer.eval()
    with torch.no_grad():
        out = layer(x, src_key_padding_mask=padding)
        base_out = plain(x, src_key_padding_mask=padding)
    assert block_fused == ["_transformer_encoder_layer_fwd"]  # the plain layer only: LoRA's guard disables it
    assert not torch.allclose(out[0], base_out[0], atol=1e-3)
    torch.testing.assert_close(out[0], training_mode[0], rtol=0, atol=FUSED_ATOL)
    torch.testing.assert_close(out[1, :3], training_mode[1, :3], rtol=0, atol=FUSED_ATOL)  # unpadded positions


def test_refusals_name_the_reason():
    with pytest.raises(ValueError, match="does not support dora=True"):
        tt.lora.apply(Net(), tt.lora.LoraConfig(targets=["attn"], dora=True))
    with pytest.raises(ValueError, match="does not support init='pissa'"):
        tt.lora.apply(Net(), tt.lora.LoraConfig(targets=["attn"], init="pissa"))
    with pytest.raises(TypeError, match=r"separate q/k/v weights \(kdim=8, vdim=4, embed_dim=16\)"):
        tt.lora.apply(Net(kdim=8, vdim=4), tt.lora.LoraConfig(targets=["attn"]))
    model = Net()
    tt.lora.apply(model, tt.lora.LoraConfig(targets=["attn"]))
    with pytest.raises(TypeError, match="merged_weights"):
        model.attn.merged_weight()
    tt.lora.add_adapter(model, "other", tt.lora.LoraConfig(targets=["attn"]))
    with tt.lora.adapter_per_row(model, ["default", "default", "default"]):
        _call(model, True, {})  # one adapter for every row: fine
    with pytest.raises(RuntimeError, match="cannot mix adapters in one batch"):
        with tt.lora.adapter_per_row(model, ["default", "other", None]):
            _call(model, True, {})


def test_dropout_is_not_applied_and_says_so():
    with pytest.warns(UserWarning, match="dropout=0.5 has no effect on nn.MultiheadAttention"):
        model = Net()
        tt.lora.apply(model, tt.lora.LoraConfig(targets=["attn"], dropout=0.5))
    _randomise(model)
    model.train()
    first, second = _call(model, True, {})[0], _call(model, True, {})[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # no dropout mask anywhere


def test_out_proj_inside_mha_points_at_the_mha():
    model = Net()
    with pytest.raises(TypeError, match=r"'attn.out_proj'.*target the MultiheadAttention 'attn' itself"):
        tt.lora.apply(model, tt.lora.LoraConfig(targets=["out_proj"]))
    tt.lora.apply(model, tt.lora.LoraConfig(targets=["attn"]))
    with pytest.raises(TypeError, match=r"'attn.base.out_proj'.*target the MultiheadAttention 'attn' itself"):
        tt.lora.add_adapter(model, "two", tt.lora.LoraConfig(targets=["out_proj"]))


def test_second_adapter_set_and_delete():
    model = Net()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["attn"]))
    assert tt.lora.add_adapter(model, "two", tt.lora.LoraConfig(rank=3, targets="all-linear")) == ["attn"]
    layer = model.attn
    assert {k for k, p in layer.named_parameters() if p.requires_grad} == {
        "lora_A", "lora_B", "lora_out_A", "lora_out_B"}
    tt.lora.set_adapter(model, "two")
    assert {k for k, p in layer.named_parameters() if p.requires_grad} == {
        "lora_A_two", "lora_B_two", "lora_out_A_two", "lora_out_B_two"}
    assert layer.lora_B.shape == (3 * E, 3)
    tt.lora.set_adapter(model, "default")
    tt.lora.delete_adapter(model, "two")
    assert sorted(k for k, _ in layer.named_parameters() if "lora" in k) == ["lora_A", "lora_B", "lora_out_A",
                                                                           "lora_out_B"]


# ---------------------------------------------------------------------------------- a ViT-like model
class TinyViT(nn.Module):
    """Patch embedding (a strided conv), two encoder layers, a classifier head of another width."""

    def __init__(self, d=16, classes=5):
        super().__init__()
        self.patch = nn.Conv2d(3, d, kernel_size=4, stride=4)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
                                    for _ in range(2))
        self.head = nn.Linear(d, classes)

    def forward(self, images):
        x = self.patch(images).flatten(2).transpose(1, 2)  # (B, patches, d)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(dim=1))


def test_vit_all_linear_trains_saves_loads_and_merges(tmp_path):
    model = TinyViT()
    fresh, plain = copy.deepcopy(model), copy.deepcopy(model)
    names = tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets="all-linear"))
    assert names == [f"layers.{i}.{m}" for i in range(2) for m in ("self_attn", "linear1", "linear2")]
    assert type(model.head) is nn.Linear and type(model.patch) is nn.Conv2d
    images, labels = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    tt.save_adapter(model, tmp_path)
    tt.load_adapter(fresh, tmp_path)
    model.eval(), fresh.eval()
    with torch.no_grad():
        expected = model(images)
        torch.testing.assert_close(fresh(images), expected, rtol=0, atol=ATOL)
        tt.lora.merge(fresh)
        torch.testing.assert_close(fresh(images), expected, rtol=0, atol=FUSED_ATOL)
    # PEFT reads the same file. In training mode (dropout is 0): in eval, nn.TransformerEncoderLayer's fused
    # path reads the raw weights of PEFT's layers (PEFT sets no guard), and PEFT computes the base model
    theirs = peft.PeftModel.from_pretrained(plain, str(tmp_path)).train()
    torch.testing.assert_close(theirs(images), _like_peft(model).train()(images), rtol=0, atol=PEFT_ATOL)


def test_weighted_adapter_and_loraplus_cover_both_factor_pairs():
    """add_weighted_adapter combines in_proj AND out_proj factors; LoRA+ finds both B factors."""
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)[0]

    torch.manual_seed(0)
    model = Wrap()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["attn"]))
    with torch.no_grad():
        for p in model.attn.parameters():
            if p.requires_grad:
                p.normal_()
    tt.lora.add_weighted_adapter(model, ["default"], [1.0], "copy")
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        expected = model(x)
        tt.lora.set_adapter(model, "copy")
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    b_factors = {id(p) for group in tt.lora.loraplus_param_groups(model, lr=1e-3, lr_ratio=16) if group["lr"] > 1e-3
                 for p in group["params"]}
    assert {id(model.attn.lora_B), id(model.attn.lora_out_B)} <= b_factors
