"""LoRA variants: DoRA (against a naive float64 reference and against HF peft), PiSSA (equal to the
base at init, principal subspace, peft parity) and LoRA+ parameter groups. Tolerances are stated
next to each check. The peft checks are skipped only where peft is not installed."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tinytune as tt
from conftest import TinyLM
from tinytune.models.hf import merged_state_dict
from tinytune.peft.lora.variants import dora_linear
from tinytune.train import TrainConfig, build_optimizer, build_scheduler


def _naive_dora(x, weight, bias, lora_A, lora_B, magnitude, scaling, detach_norm=True):
    """The paper's formula, written out: W' = m (W + s B A) / ||W + s B A||_row, y = x W'^T + b."""
    adapted = weight + scaling * lora_B @ lora_A
    norm = adapted.norm(dim=1, keepdim=True)
    if detach_norm:
        norm = norm.detach()
    y = x @ (magnitude[:, None] * adapted / norm).t()
    return y if bias is None else y + bias


def _dora_layer(d_in=12, d_out=7, rank=3, dtype=torch.float64, bias=True, **kw):
    layer = tt.lora.LoRALinear(nn.Linear(d_in, d_out, bias=bias, dtype=dtype), rank=rank, alpha=6, dora=True, **kw)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
        layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand_like(layer.lora_magnitude_vector))
    return layer


def _randomise(model, std=0.3):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * std)
    return model


def _plain_copy(model_with_lora, make=TinyLM):
    plain = make()
    plain.load_state_dict({k.replace(".base", ""): v for k, v in model_with_lora.state_dict().items() if ".lora_" not in k})
    return plain.eval()


# ---------------------------------------------------------------------------------------------- DoRA maths


@pytest.mark.parametrize("bias", [True, False])
def test_dora_forward_matches_naive_float64(bias):
    layer = _dora_layer(bias=bias).eval()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    want = _naive_dora(x, layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B,
                       layer.lora_magnitude_vector, layer.scaling)
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)  # float64, different op order


def test_dora_grads_match_reference_and_norm_is_detached():
    layer = _dora_layer().eval()
    x = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)
    params = [x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector]
    g = torch.randn(6, 7, dtype=torch.float64)
    ours = torch.autograd.grad(layer(x), params, g)
    ref = torch.autograd.grad(_naive_dora(x, layer.base.weight, layer.base.bias, *params[1:], layer.scaling), params, g)
    for name, a, b in zip(["x", "A", "B", "m"], ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)  # float64
    through_norm = torch.autograd.grad(
        _naive_dora(x, layer.base.weight, layer.base.bias, *params[1:], layer.scaling, detach_norm=False), params, g)
    assert (ours[1] - through_norm[1]).abs().max() > 1e-6  # A's gradient would differ if the norm were not detached
    assert ours[3].abs().sum() > 0  # the magnitude learns
    # x and m do not enter the norm, so their analytical gradients must also match finite differences
    base, a, b, s = layer.base, layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    norm = layer.dora_weight_norm()

    def fn(x_, m_):
        return dora_linear(x_, base.weight, base.bias, a, b, m_, norm, s, 0.0)

    m = layer.lora_magnitude_vector.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x[:3].detach().requires_grad_(True), m))


def test_dora_embedding_matches_naive_float64():
    emb = nn.Embedding(20, 6, padding_idx=0, dtype=torch.float64)
    layer = tt.lora.LoRAEmbedding(emb, rank=3, alpha=6, dora=True)
    ids = torch.randint(0, 20, (2, 5))
    assert torch.equal(layer(ids), emb(ids))  # B = 0 and m = ||W||: the base, bit for bit here
    assert layer.lora_magnitude_vector.shape == (6,)  # PEFT: one magnitude per embedding dim
    torch.testing.assert_close(layer.lora_magnitude_vector, emb.weight.norm(dim=0), rtol=0, atol=0)
    with torch.no_grad():
        layer.lora_embedding_B.normal_()
        layer.lora_magnitude_vector.mul_(1.5)
    adapted = emb.weight + layer.scaling * (layer.lora_embedding_B @ layer.lora_embedding_A).t()  # (vocab, dim)
    merged = layer.lora_magnitude_vector * adapted / adapted.norm(dim=0)
    torch.testing.assert_close(layer(ids), F.embedding(ids, merged), rtol=1e-12, atol=1e-12)


def test_dora_starts_at_base_with_row_norm_magnitude_and_adds_out_features_params():
    lin = nn.Linear(64, 24)
    layer = tt.lora.LoRALinear(lin, rank=4, alpha=8, dora=True)
    torch.testing.assert_close(layer.lora_magnitude_vector, lin.weight.norm(dim=1), rtol=0, atol=0)
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), lin(x), rtol=0, atol=1e-6)  # f = 1 up to fp32 rounding of m / ||W||
    plain = tt.count_parameters(tt.lora.LoRALinear(nn.Linear(64, 24), rank=4, alpha=8)).trainable
    assert tt.count_parameters(layer).trainable == plain + 24 == 4 * (64 + 24) + 24


def test_dora_dropout_and_grads_match_peft_in_training():
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 8))
    ours = copy.deepcopy(model)
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.3, target_modules=["0"],
                                                        use_dora=True))
    tt.lora.apply(ours, tt.lora.LoraConfig(rank=2, alpha=4, dropout=0.3, targets=["0"], dora=True))
    _randomise(theirs)
    tt.lora.load_state_dict(ours, {k: v.detach() for k, v in peft.get_peft_model_state_dict(theirs).items()})
    x = torch.randn(4, 10)
    outs, grads = [], []
    for m in (theirs.train(), ours.train()):
        torch.manual_seed(7)  # both draw the dropout mask first, from the same generator state
        out = m(x)
        outs.append(out)
        grads.append(torch.autograd.grad(out.pow(2).sum(), [p for p in m.parameters() if p.requires_grad]))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)  # fp32, different op order
    for a, b in zip(grads[1], grads[0]):  # same parameter order: A, B, magnitude
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dora_under_bf16_autocast_keeps_fp32_magnitude_grads():
    model = TinyLM()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, targets="all-linear", dora=True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randint(0, 32, (2, 7)))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    mag = model.layers[0]["self_attn"].q_proj.lora_magnitude_vector
    assert mag.grad is not None and mag.grad.dtype == torch.float32


# -------------------------------------------------------------------------------------- DoRA model invariants


def _dora_model():
    model = TinyLM()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "mlp.0", "embed_tokens"],
                                            dora=True))
    return _randomise(model).eval(), torch.randint(0, 32, (3, 9))


def test_dora_merge_unmerge_disabled_and_unload():
    model, ids = _dora_model()
    plain = _plain_copy(model)
    before = {n: p.clone() for n, p in model.named_parameters() if ".base." in n}
    with torch.no_grad():
        ref = model(ids)
        expected_weights = {n: layer.merged_weight().clone() for n, layer in tt.lora.lora_layers(model)}
        tt.lora.merge(model)
        once = [p.clone() for p in model.parameters()]
        tt.lora.merge(model)
        assert all(torch.equal(a, b) for a, b in zip(once, model.parameters()))  # twice is once
        assert (model(ids) - ref).abs().max() <= 1e-5 * ref.abs().max()  # fp32, relative to the output scale
        for n, layer in tt.lora.lora_layers(model):
            assert torch.equal(layer.base.weight, expected_weights[n]), n  # merged_weight() is what merge writes
        tt.lora.unmerge(model)
        tt.lora.unmerge(model)
        for n, p in model.named_parameters():
            if n in before:  # fp32 rounding of (f (W + d)) / f - d, weights of order 1
                torch.testing.assert_close(p, before[n], rtol=1e-5, atol=1e-6, msg=n)
        with tt.lora.disabled(model):
            torch.testing.assert_close(model(ids), plain(ids), rtol=0, atol=1e-6)  # unmerge rounding only
        unloaded = tt.lora.merge_and_unload(copy.deepcopy(model))
        assert not list(tt.lora.lora_layers(unloaded))
        assert (unloaded(ids) - ref).abs().max() <= 1e-5 * ref.abs().max()
        folded = TinyLM()
        folded.load_state_dict(merged_state_dict(model))  # save_pretrained's fold, model unchanged
        assert (folded.eval()(ids) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_dora_state_dict_round_trip_is_bitwise(tmp_path):
    model, ids = _dora_model()
    sd = tt.lora.state_dict(model)
    assert "base_model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in sd
    assert sd["base_model.model.embed_tokens.lora_magnitude_vector"].shape == (16,)
    other, _ = _dora_model()
    other.load_state_dict({k: v for k, v in model.state_dict().items() if ".base." in k}, strict=False)
    tt.lora.load_state_dict(other, sd)
    assert all(torch.equal(v, tt.lora.state_dict(other)[k]) for k, v in sd.items())
    tt.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["init_lora_weights"] is True
    fresh = _plain_copy(model)
    tt.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(ids), model(ids))


@pytest.mark.parametrize("variant", [{"dora": True}, {"init": "pissa"}, {"dora": True, "init": "pissa"}],
                         ids=["dora", "pissa", "dora+pissa"])
def test_only_adapter_parameters_change_in_a_step(variant):
    model = TinyLM()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, targets=["q_proj", "mlp.2", "embed_tokens"], **variant))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n for n in trainable)
    start = {n: p.clone() for n, p in trainable.items()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model(torch.randint(0, 32, (2, 6))).pow(2).mean().backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    moved = [n for n, p in trainable.items() if p.grad.abs().sum() > 0]
    assert all(not torch.equal(trainable[n], start[n]) for n in moved)
    assert set(moved) >= {n for n in trainable if n.endswith(("lora_B", "lora_magnitude_vector"))}


# ---------------------------------------------------------------------------------------------- PiSSA


def test_pissa_equals_base_and_holds_the_principal_subspace():
    lin = nn.Linear(48, 32)
    original = lin.weight.detach().clone()
    x = torch.randn(5, 48)
    y = lin(x).detach()
    layer = tt.lora.LoRALinear(lin, rank=6, alpha=12, init="pissa")
    assert layer.base is lin and lin.weight.data_ptr() == layer.base.weight.data_ptr()  # rewritten in place
    torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-5)  # fp32 SVD: residual + principal part = W
    u, s, vh = torch.linalg.svd(original.double(), full_matrices=False)
    principal = u[:, :6] @ torch.diag(s[:6]) @ vh[:6]
    torch.testing.assert_close(layer.delta_weight().double(), principal, rtol=0, atol=1e-5)
    torch.testing.assert_close(lin.weight.double(), original.double() - principal, rtol=0, atol=1e-5)
    # A's rows and B's columns are orthogonal, with squared norms S_r / scaling
    torch.testing.assert_close(layer.lora_A @ layer.lora_A.t(), torch.diag(s[:6] / layer.scaling).float(),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.t() @ layer.lora_B, torch.diag(s[:6] / layer.scaling).float(),
                               rtol=1e-4, atol=1e-5)
    # the residual keeps exactly the remaining spectrum
    torch.testing.assert_close(torch.linalg.svdvals(lin.weight.double()), torch.cat([s[6:], s.new_zeros(6)]),
                               rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="init='pissa'.*residual"):
        layer.reset_lora_parameters()


def test_pissa_matches_peft_init_and_loads_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    base = TinyLM().eval()
    ids = torch.randint(0, 32, (2, 6))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                                                       init_lora_weights="pissa"))
    ours = copy.deepcopy(base)
    tt.lora.apply(ours, tt.lora.LoraConfig(rank=4, alpha=8, targets=["q_proj", "o_proj"], init="pissa"))
    for key, value in peft.get_peft_model_state_dict(theirs).items():
        torch.testing.assert_close(tt.lora.state_dict(ours)[key], value, rtol=0, atol=1e-6)  # same fp32 SVD steps
    for i in range(2):
        residual = theirs.base_model.model.layers[i]["self_attn"].o_proj.base_layer.weight
        torch.testing.assert_close(ours.layers[i]["self_attn"].o_proj.base.weight, residual, rtol=0, atol=1e-6)
    _randomise(ours)
    tt.save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    # PEFT re-runs the SVD on the ORIGINAL base it is given, then loads A and B: the fine-tuned model
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    back = tt.load_adapter(copy.deepcopy(base), tmp_path).eval()  # and so does tinytune
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), ours.eval()(ids), rtol=1e-5, atol=1e-5)  # fp32, SVD rounding
        torch.testing.assert_close(back(ids), ours(ids), rtol=0, atol=1e-6)


def test_pissa_refusals_name_the_module():
    model = TinyLM()
    with pytest.raises(ValueError, match=r"rank <= min\(in_features, out_features\); 'layers.0.self_attn.q_proj' is 16 -> 16, got rank=20"):
        tt.lora.apply(model, tt.lora.LoraConfig(rank=20, targets=["q_proj"], init="pissa"))
    assert not list(tt.lora.lora_layers(model))  # nothing changed
    tied = TinyLM(vocab=16, d=16)
    tied.lm_head.weight = tied.embed_tokens.weight
    with pytest.raises(ValueError, match=r"'lm_head', which is shared with \['embed_tokens'\]"):
        tt.lora.apply(tied, tt.lora.LoraConfig(rank=2, targets=["lm_head"], init="pissa"))
    with pytest.raises(ValueError, match="PiSSA needs rank <= min"):
        tt.lora.LoRALinear(nn.Linear(8, 3), rank=4, alpha=4, init="pissa")


# ---------------------------------------------------------------------------------------------- LoRA+


def test_loraplus_param_groups():
    model = TinyLM()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["q_proj", "embed_tokens"], dora=True, train_bias=True))
    groups = tt.lora.loraplus_param_groups(model, lr=1e-3, lr_ratio=8.0)
    by_name = {n: g for g in groups for n in g["names"]}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(by_name) == sorted(trainable) and sum(len(g["names"]) for g in groups) == len(trainable)
    for name, group in by_name.items():
        is_b = name.endswith(("lora_B", "lora_embedding_B"))
        assert group["lr"] == pytest.approx(8e-3 if is_b else 1e-3), name
    assert any(n.endswith("lora_magnitude_vector") for n in by_name) and any(n.endswith("bias") for n in by_name)
    decayed = tt.lora.loraplus_param_groups(model, lr=1e-3, weight_decay=0.1)
    # A matrices (decayed), 1-D magnitudes and biases (not decayed), B matrices (decayed, 16x lr)
    assert [(g["lr"], g["weight_decay"]) for g in decayed] == [(1e-3, 0.1), (1e-3, 0.0), (16e-3, 0.1)]
    assert all(p.ndim == 1 for p in decayed[1]["params"]) and all(p.ndim == 2 for p in decayed[0]["params"])
    opt = torch.optim.AdamW(decayed)  # usable as is
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in decayed]
    with pytest.raises(ValueError, match="lr_ratio must be a finite number > 0, got lr_ratio=0"):
        tt.lora.loraplus_param_groups(model, lr=1e-3, lr_ratio=0)
    with pytest.raises(ValueError, match="TinyLM has no LoRA layers"):
        tt.lora.loraplus_param_groups(TinyLM(), lr=1e-3)


def test_train_config_loraplus_lr_ratio():
    model = TinyLM()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["q_proj", "embed_tokens"]))
    cfg = TrainConfig(lr=1e-3, loraplus_lr_ratio=4.0, schedule="linear", steps=4)
    opt = build_optimizer(model, cfg)
    assert opt.param_groups[0]["lr"] == 1e-3  # the base rate first: fit logs param_groups[0]
    for group in opt.param_groups:
        is_b = all(n.endswith(("lora_B", "lora_embedding_B")) for n in group["names"])
        assert is_b or not any(n.endswith(("lora_B", "lora_embedding_B")) for n in group["names"])
        assert group["lr"] == (4e-3 if is_b else 1e-3)
    sched = build_scheduler(opt, cfg)
    opt.step()
    sched.step()
    lrs = sorted({g["lr"] for g in opt.param_groups})
    assert lrs == pytest.approx([0.75e-3, 3e-3])  # the schedule scales both rates
    plain = {n for g in build_optimizer(model, TrainConfig()).param_groups for n in g["names"]}
    assert plain == {n for g in opt.param_groups for n in g["names"]}
    with pytest.raises(ValueError, match="loraplus_lr_ratio must be None or a finite number > 0, got -1"):
        TrainConfig(loraplus_lr_ratio=-1)
    with pytest.raises(ValueError, match="loraplus_lr_ratio is set, but Linear has no LoRA layers"):
        build_optimizer(nn.Linear(3, 3), TrainConfig(loraplus_lr_ratio=2.0))


# ---------------------------------------------------------------------------------------------- errors and files


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="dora must be True or False, got dora='yes'"):
        tt.lora.LoraConfig(dora="yes")
    with pytest.raises(ValueError, match=r"unknown LoRA init='svd'; expected one of 'kaiming', 'gaussian', 'pissa'"):
        tt.lora.LoraConfig(init="svd")
    mixed = TinyLM()
    tt.lora.apply(mixed, tt.lora.LoraConfig(rank=2, targets=["q_proj"], dora=True))
    tt.lora.apply(mixed, tt.lora.LoraConfig(rank=2, targets=["v_proj"]))
    with pytest.raises(ValueError, match="LoRA layers differ in dora"):
        tt.save_adapter(mixed, tmp_path)
    model, _ = _dora_model()
    tt.save_adapter(model, tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    config = json.loads(cfg_path.read_text())
    for value in ("olora", "pissa_niter_4"):
        cfg_path.write_text(json.dumps(dict(config, init_lora_weights=value)))
        (tmp_path / "tinytune_manifest.json").unlink(missing_ok=True)  # hand-edited on purpose: unchecked
        with pytest.raises(ValueError, match=f"init_lora_weights='{value}'.*not supported"):
            tt.load_adapter(TinyLM(), tmp_path)
    plain = TinyLM()
    tt.lora.apply(plain, tt.lora.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "mlp.0", "embed_tokens"]))
    tt.save_adapter(plain, tmp_path)
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), use_dora=True)))
    (tmp_path / "tinytune_manifest.json").unlink(missing_ok=True)  # hand-edited on purpose: unchecked
    with pytest.raises(ValueError, match=r"missing keys: .*lora_magnitude_vector.*use_dora mismatch"):
        tt.load_adapter(TinyLM(), tmp_path)


def test_dora_round_trip_through_transformers_llama(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 7))
    ours = copy.deepcopy(hf)
    tt.lora.apply(ours, tt.lora.LoraConfig(rank=4, alpha=16, targets="all-linear", dora=True))
    _randomise(ours, std=0.1)
    tt.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)  # fp32, op order
    made = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                                 target_modules=["q_proj", "down_proj", "embed_tokens"]))
    _randomise(made, std=0.1)
    # (PEFT would also save the whole embedding matrix of a transformers model; tinytune's loader
    # reads adapter weights only, so that is switched off here)
    made.save_pretrained(str(tmp_path / "theirs"), save_embedding_layers=False)
    back = tt.load_adapter(copy.deepcopy(hf), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, made.eval()(ids).logits, rtol=1e-4, atol=1e-4)
