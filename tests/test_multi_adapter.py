"""Several LoRA adapters on one model: add/switch/delete/disable, training only the active one,
weighted combinations (cat: exact sum of deltas; linear: PEFT's maths), mixed batches (forward,
gradients and generate, row by row), named adapter files, and PEFT interop per adapter."""
import io
import math

import pytest
import torch
import torch.nn as nn

import tinytune as tt
from conftest import TinyLM
from tinytune.models.presets import init_weights

IDS = torch.randint(0, 32, (3, 6), generator=torch.Generator().manual_seed(0))


def _randomise(model, std=0.3):
    """Every adapter's A and B random (B starts at zero, which would hide a mixed-up adapter)."""
    with torch.no_grad():
        for _, layer in tt.lora.lora_layers(model):
            for name in layer.adapters:
                for kind, p in layer.adapter_parameters(name).items():
                    if kind != "lora_magnitude_vector":
                        p.normal_(std=std)


def _two_adapters(model=None, b_targets=("q_proj", "o_proj", "embed_tokens"), b_rank=2, b_dora=False):
    """TinyLM with "default" (rank 4 on q/v/embeddings) and "b" (own targets), both random."""
    torch.manual_seed(0)
    model = TinyLM().eval() if model is None else model
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "embed_tokens"]))
    tt.lora.add_adapter(model, "b", tt.lora.LoraConfig(rank=b_rank, alpha=4, targets=list(b_targets), dora=b_dora))
    _randomise(model)
    return model


def _base_copy(model):
    """The plain base model of a LoRA'd TinyLM (a fresh module tree, same base weights)."""
    plain = TinyLM()
    plain.load_state_dict({k.replace(".base", ""): v for k, v in model.state_dict().items() if ".lora_" not in k})
    return plain.eval()


def _single(model, name):
    """A fresh copy of the base with only adapter `name` of `model`, from its state dict."""
    fresh = _base_copy(model)
    spec = tt.lora.adapter_layers(model, name)[0][1].adapters[name]
    targets = [path for path, _ in tt.lora.adapter_layers(model, name)]
    tt.lora.apply(fresh, tt.lora.LoraConfig(rank=spec.rank, alpha=spec.alpha, targets=targets, dora=spec.dora))
    tt.lora.load_state_dict(fresh, tt.lora.state_dict(model, adapter=name))
    return fresh


# ------------------------------------------------------------------------------- add / set / delete
def test_single_adapter_keeps_its_names_and_a_second_is_added_inactive():
    model = TinyLM().eval()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, targets=["q_proj", "v_proj"]))
    q = model.layers[0]["self_attn"].q_proj
    assert tt.lora.list_adapters(model) == ["default"] and tt.lora.active_adapter(model) == "default"
    assert "layers.0.self_attn.q_proj.lora_A" in model.state_dict()  # the names single-adapter LoRA always had
    assert q.lora_A is q._parameters["lora_A"] and q.lora_B.shape == (16, 4)
    _randomise(model)
    before = model(IDS)
    names = tt.lora.add_adapter(model, "b", tt.lora.LoraConfig(rank=2, targets=["q_proj", "o_proj"]))
    assert names == [f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "o_proj")]
    assert tt.lora.list_adapters(model) == ["default", "b"] and tt.lora.active_adapter(model) == "default"
    assert isinstance(model.layers[0]["self_attn"].o_proj, tt.lora.LoRALinear)  # wrapped for "b" only
    _randomise(model)
    torch.testing.assert_close(model(IDS), _single(model, "default")(IDS), rtol=0, atol=1e-6)
    assert before.shape == model(IDS).shape
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)  # "default"'s only


def test_set_adapter_switches_output_and_trainable_parameters():
    model = _two_adapters()
    tt.lora.set_adapter(model, "b")
    assert tt.lora.active_adapter(model) == "b"
    torch.testing.assert_close(model(IDS), _single(model, "b")(IDS), rtol=0, atol=1e-5)
    q = model.layers[0]["self_attn"].q_proj
    assert q.lora_A is q._parameters["lora_A_b"] and q.rank == 2 and q.scaling == 2.0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("_b") for n in trainable)
    v = model.layers[0]["self_attn"].v_proj  # holds "default" only: computes its base under "b"
    assert not hasattr(v, "lora_A")  # not "default"'s A, registered under that name
    with pytest.raises(AttributeError, match=r"holds no adapter 'b' \(it holds \['default'\]\)"):
        v.lora_B
    x = torch.randn(2, 16)
    torch.testing.assert_close(v(x), v.base(x), rtol=0, atol=0)
    tt.lora.set_adapter(model, "default")
    torch.testing.assert_close(model(IDS), _single(model, "default")(IDS), rtol=0, atol=1e-5)


def test_disabled_gives_the_base_with_several_adapters():
    model = _two_adapters()
    with tt.lora.disabled(model):
        out = model(IDS)
    assert torch.equal(out, _base_copy(model)(IDS))
    assert not torch.allclose(model(IDS), out)


def test_delete_adapter_removes_parameters_and_unwraps_empty_layers():
    model = _two_adapters()
    with pytest.raises(ValueError, match=r"'default' is the active adapter.*others: \['b'\]"):
        tt.lora.delete_adapter(model, "default")
    tt.lora.set_adapter(model, "b")
    tt.lora.delete_adapter(model, "default")
    assert tt.lora.list_adapters(model) == ["b"]
    assert type(model.layers[0]["self_attn"].v_proj) is nn.Linear  # held "default" only
    assert not any("lora_A" == n.rpartition(".")[2] for n, _ in model.named_parameters())
    torch.testing.assert_close(model(IDS), _single(model, "b")(IDS), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"no LoRA adapter 'default'; its adapters are \['b'\]"):
        tt.lora.delete_adapter(model, "default")


def test_errors_name_the_offending_adapter():
    model = _two_adapters()
    cfg = tt.lora.LoraConfig(rank=2, targets=["q_proj"])
    with pytest.raises(ValueError, match=r"already has an adapter named 'b' \(adapters: \['default', 'b'\]\)"):
        tt.lora.add_adapter(model, "b", cfg)
    with pytest.raises(ValueError, match="without '.', got 'x.y'"):
        tt.lora.add_adapter(model, "x.y", cfg)
    with pytest.raises(ValueError, match=r"no LoRA adapter 'zzz'"):
        tt.lora.set_adapter(model, "zzz")
    with pytest.raises(ValueError, match="matched no module"):
        tt.lora.add_adapter(model, "c", tt.lora.LoraConfig(targets=["nope"]))
    with pytest.raises(ValueError, match="train_bias=True is not supported for an added adapter"):
        tt.lora.add_adapter(model, "c", tt.lora.LoraConfig(targets=["q_proj"], train_bias=True))
    with pytest.raises(ValueError, match=r"'layers.0.self_attn.q_proj' holds adapters.*PiSSA"):
        tt.lora.add_adapter(model, "c", tt.lora.LoraConfig(rank=2, targets=["q_proj"], init="pissa"))
    assert tt.lora.list_adapters(model) == ["default", "b"]  # nothing changed by the refusals
    with pytest.raises(TypeError, match="strict must be True or False, got 'b'"):
        tt.lora.load_state_dict(model, {}, "b")
    with pytest.raises(ValueError, match="has no LoRA layers"):
        tt.lora.list_adapters(TinyLM()) or tt.lora.active_adapter(TinyLM())


def test_add_adapter_on_a_plain_model_is_apply_under_that_name():
    model = TinyLM()
    tt.lora.add_adapter(model, "first", tt.lora.LoraConfig(targets=["q_proj"]))
    assert tt.lora.list_adapters(model) == ["first"] and tt.lora.active_adapter(model) == "first"
    assert "layers.0.self_attn.q_proj.lora_A_first" in dict(model.named_parameters())


def test_all_linear_matches_the_same_modules_after_lora():
    model = TinyLM()
    tt.lora.apply(model, tt.lora.LoraConfig(targets=["q_proj"]))
    names = tt.lora.add_adapter(model, "b", tt.lora.LoraConfig(targets="all-linear"))
    assert names == [n for n, _ in tt.lora.adapter_layers(model, "b")]
    assert "layers.0.self_attn.q_proj" in names and "lm_head" not in names
    assert not any(n.endswith(".base") for n in names)


# ------------------------------------------------------------------------------ merge / training
def test_merge_merges_the_active_adapter_and_blocks_switching():
    model = _two_adapters()
    tt.lora.set_adapter(model, "b")
    expected = model(IDS)
    tt.lora.merge(model)
    torch.testing.assert_close(model(IDS), expected, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match=r"adapter 'b' is merged.*unmerge"):
        tt.lora.set_adapter(model, "default")
    with pytest.raises(RuntimeError, match="adapter_per_row: an adapter is merged"):
        with tt.lora.adapter_per_row(model, ["b", "b", "b"]):
            pass
    tt.lora.set_adapter(model, "b")  # the merged one itself: allowed
    tt.lora.unmerge(model)
    tt.lora.set_adapter(model, "default")
    torch.testing.assert_close(model(IDS), _single(model, "default")(IDS), rtol=0, atol=1e-5)


def test_only_the_active_adapter_trains_in_fit():
    torch.manual_seed(0)
    model = tt.models.build("llama-tiny")
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    tt.lora.add_adapter(model, "b", tt.lora.LoraConfig(rank=2, alpha=4, targets=["q_proj", "o_proj"]))
    tt.lora.set_adapter(model, "b")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = [{"input_ids": [(j + k) % 16 for k in range(8)], "labels": [(j + k) % 16 for k in range(8)]} for j in range(8)]
    tt.train.fit(model, data, tt.train.TrainConfig(lr=1e-2, steps=2, batch_size=4, log_every=1000), stream=io.StringIO())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    b_names = {n for n in before if n.endswith(("lora_A_b", "lora_B_b"))}
    assert changed == b_names and len(b_names) == 8  # 4 layers x (A, B); "default" and the base unchanged


def test_loraplus_groups_hold_the_active_b_factors_only():
    model = _two_adapters()
    groups = tt.lora.loraplus_param_groups(model, lr=1e-3, lr_ratio=16)
    fast = {n for g in groups if g["lr"] == 16e-3 for n in g["names"]}
    assert fast and all(n.endswith(("lora_B", "lora_embedding_B")) for n in fast)


# --------------------------------------------------------------------------- weighted combinations
def _deltas(model, name):
    return {path: layer.delta_weight(name).detach() for path, layer in tt.lora.adapter_layers(model, name)}


def test_cat_combination_is_the_exact_weighted_sum_of_deltas():
    model = _two_adapters()  # ranks 4 and 2; "b" on o_proj, "default" on v_proj: layers with one source
    weights = [0.7, -1.3]
    touched = tt.lora.add_weighted_adapter(model, ["default", "b"], weights, "mix", combination="cat")
    d_a, d_b, d_mix = _deltas(model, "default"), _deltas(model, "b"), _deltas(model, "mix")
    assert sorted(touched) == sorted(set(d_a) | set(d_b)) == sorted(d_mix)
    for path, delta in d_mix.items():
        expected = weights[0] * d_a.get(path, 0) + weights[1] * d_b.get(path, 0)
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)
    layer = model.layers[0]["self_attn"].o_proj  # holds "b" only: zero rows pad A up to rank 4 + 2
    assert layer.adapters["mix"].rank == 6 and layer.adapters["mix"].scaling == 1.0
    assert torch.equal(layer._factor("lora_A", "mix")[2:], torch.zeros(4, 16))
    assert tt.lora.active_adapter(model) == "default"
    assert not any(p.requires_grad for p in layer.adapter_parameters("mix").values())


def test_linear_combination_follows_peft_maths():
    model = _two_adapters(b_rank=4, b_targets=("q_proj", "v_proj", "embed_tokens"))
    weights = [0.6, -0.9]
    tt.lora.add_weighted_adapter(model, ["default", "b"], weights, "mix", combination="linear")
    for path, layer in tt.lora.adapter_layers(model, "mix"):
        coefficients = [w * layer.adapters[n].scaling for n, w in zip(["default", "b"], weights)]
        a = sum(math.copysign(math.sqrt(abs(c)), c) * layer._factor(layer._A, n) for n, c in zip(["default", "b"], coefficients))
        b = sum(math.sqrt(abs(c)) * layer._factor(layer._B, n) for n, c in zip(["default", "b"], coefficients))
        torch.testing.assert_close(layer.delta_weight("mix"), (b @ a if layer._A == "lora_A" else (b @ a).t()))
    # one adapter: "linear" (whatever is asked, as PEFT) is exact
    tt.lora.add_weighted_adapter(model, ["b"], [-2.0], "neg", combination="cat")
    for path, delta in _deltas(model, "neg").items():
        torch.testing.assert_close(delta, -2.0 * _deltas(model, "b")[path], rtol=1e-5, atol=1e-6)


def test_weighted_adapter_errors():
    model = _two_adapters()  # ranks 4 and 2
    with pytest.raises(ValueError, match=r"'linear' needs adapters of one rank, got \{'default': 4, 'b': 2\}"):
        tt.lora.add_weighted_adapter(model, ["default", "b"], [1, 1], "mix", combination="linear")
    with pytest.raises(ValueError, match=r"combination='ties' is not supported; choose one of \('cat', 'linear', 'svd'\)"):
        tt.lora.add_weighted_adapter(model, ["default", "b"], [1, 1], "mix", combination="ties")
    with pytest.raises(ValueError, match=r"svd_rank must be an int >= 1 or None, got 0"):
        tt.lora.add_weighted_adapter(model, ["default", "b"], [1, 1], "mix", combination="svd", svd_rank=0)
    with pytest.raises(ValueError, match=r"weights \[1\] must be one number per adapter"):
        tt.lora.add_weighted_adapter(model, ["default", "b"], [1], "mix")
    with pytest.raises(ValueError, match="already has an adapter 'b'"):
        tt.lora.add_weighted_adapter(model, ["default"], [1], "b")
    with pytest.raises(ValueError, match="no LoRA adapter 'zzz'"):
        tt.lora.add_weighted_adapter(model, ["default", "zzz"], [1, 1], "mix")
    dora = _two_adapters(b_dora=True)
    with pytest.raises(ValueError, match="adapter 'b' is DoRA"):
        tt.lora.add_weighted_adapter(dora, ["default", "b"], [1, 1], "mix")
    assert tt.lora.list_adapters(model) == ["default", "b"]


# ----------------------------------------------------------------------------------- mixed batches
def _llama_two_adapters(b_dora=False):
    torch.manual_seed(1)
    model = init_weights(tt.models.build("llama-tiny"), std=0.15).eval()  # spread logits: no greedy near-ties
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "embed_tokens"]))
    tt.lora.add_adapter(model, "b", tt.lora.LoraConfig(rank=2, alpha=4, targets=["q_proj", "o_proj", "down_proj"],
                                                       dora=b_dora))
    with torch.no_grad():
        for _, layer in tt.lora.lora_layers(model):
            for name in layer.adapters:
                for kind, p in layer.adapter_parameters(name).items():
                    if kind != "lora_magnitude_vector":
                        p.normal_(std=0.1 if kind.endswith("A") else 0.5)
    return model


def _alone(model, name, fn):
    """fn() with only adapter `name` in effect (None: the base)."""
    if name is None:
        with tt.lora.disabled(model):
            return fn()
    previous = tt.lora.active_adapter(model)
    tt.lora.set_adapter(model, name)
    try:
        return fn()
    finally:
        tt.lora.set_adapter(model, previous)


@pytest.mark.parametrize("b_dora", [False, True])
def test_mixed_batch_forward_equals_each_adapter_alone_row_by_row(b_dora):
    model = _llama_two_adapters(b_dora)
    names = ["default", "b", "default", None]
    ids = torch.randint(0, 256, (4, 7))
    with torch.no_grad(), tt.lora.adapter_per_row(model, names):
        mixed = model(ids)
    with torch.no_grad():
        for row, name in enumerate(names):
            alone = _alone(model, name, lambda: model(ids))
            torch.testing.assert_close(mixed[row], alone[row], rtol=0, atol=1e-5)
        assert not torch.allclose(mixed[0], _alone(model, "b", lambda: model(ids))[0], atol=1e-3)
    assert model.model.layers[0].self_attn.q_proj._rows is None  # restored on exit


def test_mixed_batch_generate_equals_each_adapter_alone():
    model = _llama_two_adapters()
    names = ["b", None, "default", "b"]
    prompts = torch.randint(1, 256, (4, 5))
    with tt.lora.adapter_per_row(model, names):
        mixed = tt.generate(model, prompts, max_new_tokens=6, eos_token_id=[])
    per_adapter = {n: _alone(model, n, lambda: tt.generate(model, prompts, max_new_tokens=6, eos_token_id=[]))
                   for n in set(names)}
    for row, name in enumerate(names):
        assert torch.equal(mixed[row], per_adapter[name][row]), (row, name)
    assert len({tuple(per_adapter[n][0].tolist()) for n in per_adapter}) == 3  # the adapters do differ


def test_mixed_batch_gradients_reach_each_rows_adapter():
    model = _llama_two_adapters()
    q = model.model.layers[0].self_attn.q_proj
    for name in ("default", "b"):
        for p in q.adapter_parameters(name).values():
            p.requires_grad_(True)
    ids = torch.randint(0, 256, (3, 5))
    with tt.lora.adapter_per_row(model, ["default", "b", "default"]):
        model(ids).square().mean().backward()
    mixed = {n: q.adapter_parameters(n)["lora_B"].grad.clone() for n in ("default", "b")}
    for name, rows in (("default", [0, 2]), ("b", [1])):
        model.zero_grad()
        _alone(model, name, lambda: (model(ids[rows]).square().sum() / model(ids).numel()).backward())
        torch.testing.assert_close(mixed[name], q.adapter_parameters(name)["lora_B"].grad, rtol=1e-4, atol=1e-7)


def test_adapter_per_row_errors():
    model = _llama_two_adapters()
    with pytest.raises(ValueError, match=r"unknown adapters \['zzz'\]; the model has \['default', 'b'\]"):
        with tt.lora.adapter_per_row(model, ["b", "zzz"]):
            pass
    with pytest.raises(ValueError, match="one adapter name .or None. per row, got 'b'"):
        with tt.lora.adapter_per_row(model, "b"):
            pass
    with pytest.raises(ValueError, match=r"gave 3 adapters \(one per row\).*LoRAEmbedding.s input has shape \(2, 4\)"):
        with tt.lora.adapter_per_row(model, ["b", None, "default"]):
            model(torch.randint(0, 256, (2, 4)))


# -------------------------------------------------------------------------------- files and PEFT
def test_named_adapter_files_round_trip(tmp_path):
    model = _two_adapters()
    tt.save_adapter(model, tmp_path / "b", adapter="b")
    tt.save_adapter(model, tmp_path / "default")  # the active one
    fresh = _base_copy(model)
    tt.load_adapter(fresh, tmp_path / "default")
    tt.load_adapter(fresh, tmp_path / "b", adapter_name="b")
    assert tt.lora.list_adapters(fresh) == ["default", "b"] and tt.lora.active_adapter(fresh) == "default"
    for name in ("default", "b"):
        ours, theirs = tt.lora.state_dict(model, adapter=name), tt.lora.state_dict(fresh, adapter=name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    plain = _base_copy(model)
    tt.load_adapter(plain, tmp_path / "b", adapter_name="b")  # no LoRA yet: created active under its name
    assert tt.lora.list_adapters(plain) == ["b"]
    with pytest.raises(ValueError, match=r"save_adapter: .*no LoRA adapter 'zzz'"):
        tt.save_adapter(model, tmp_path / "z", adapter="zzz")
    tt.save_adapter(model, tmp_path / "mis", adapter="b")
    (tmp_path / "mis" / "adapter_config.json").write_text(
        (tmp_path / "b" / "adapter_config.json").read_text().replace('"r": 2', '"r": 3'))
    (tmp_path / "mis" / "tinytune_manifest.json").unlink()  # hand-edited on purpose: past the integrity check
    with pytest.raises(ValueError, match=r"has shape \(\d+, \d+\), but .*says r=3"):
        tt.load_adapter(fresh, tmp_path / "mis", adapter_name="c")
    assert tt.lora.list_adapters(fresh) == ["default", "b"]  # the half-loaded "c" was removed again


def test_two_adapters_saved_one_by_one_load_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = _two_adapters()
    for name in ("default", "b"):
        tt.save_adapter(model, tmp_path / name, adapter=name)
    theirs = peft.PeftModel.from_pretrained(_base_copy(model), str(tmp_path / "default"))
    theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    with torch.no_grad():
        for name in ("default", "b"):
            theirs.set_adapter(name)
            tt.lora.set_adapter(model, name)
            torch.testing.assert_close(theirs(IDS), model(IDS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("combination", ["cat", "linear", "svd"])
def test_weighted_adapter_equals_peft(tmp_path, combination):
    peft = pytest.importorskip("peft")
    model = _two_adapters(b_rank=4, b_targets=("q_proj", "o_proj", "embed_tokens"))
    for name in ("default", "b"):
        tt.save_adapter(model, tmp_path / name, adapter=name)
    theirs = peft.PeftModel.from_pretrained(_base_copy(model), str(tmp_path / "default"))
    theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
    theirs.add_weighted_adapter(["default", "b"], [0.8, -0.5], "mix", combination_type=combination)
    theirs.set_adapter("mix")
    tt.lora.add_weighted_adapter(model, ["default", "b"], [0.8, -0.5], "mix", combination=combination)
    tt.lora.set_adapter(model, "mix")
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS), model(IDS), rtol=1e-5, atol=1e-5)
    tt.save_adapter(model, tmp_path / "mix", adapter="mix")  # and the combination's file loads in PEFT
    again = peft.PeftModel.from_pretrained(_base_copy(model), str(tmp_path / "mix"))
    with torch.no_grad():
        torch.testing.assert_close(again(IDS), model(IDS), rtol=1e-5, atol=1e-5)
