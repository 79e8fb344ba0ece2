"""Prefix tuning (tinytune.peft.prefix): the hook equals calling the model with explicit `prefix_kv`
and positions P, P+1, ...; only the prefixes (or their MLP) train through `fit`, with gradient
checkpointing too; exact counts, plain and reparameterised; `fold` keeps the outputs; bitwise
state-dict round trips; `disabled()` is the base; KV-cache generation (cached == uncached, left
padding == one by one); packed == unpacked; every error; and interop with Hugging Face `peft` (the
same per-layer keys/values and logits, Llama with GQA and GPT-2; adapter files both ways).
Tolerances: fp32; 1e-5 where only the op order differs (measured 0.0 against peft); bitwise otherwise."""
import copy
import io
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import tinytune as tt
from tinytune.peft import prefix, prompt
from tinytune.train import TrainConfig, evaluate, fit

P = 3


def _model(preset="llama-tiny", n=P, reparam_hidden=None, scale=0.3):
    model = tt.models.build(preset)
    prefix.apply(model, prefix.PrefixConfig(num_virtual_tokens=n, reparam_hidden=reparam_hidden))
    if reparam_hidden is None:
        with torch.no_grad():  # N(0, 1) prefixes swamp a 0.02-init model; smaller ones keep greedy choices varied
            prefix.prefix_encoder(model).embedding.mul_(scale)
    return model


def _data(n=16):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        start = int(torch.randint(0, 16, (1,), generator=g))
        ids = [(start + k) % 16 for k in range(6 + i % 5)]
        out.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return out


def _cfg(**kw):
    return TrainConfig(**{"lr": 1e-2, "steps": 3, "batch_size": 4, "log_every": 1000, **kw})


def _left_padded(lengths, vocab=256):
    width = max(lengths)
    ids, mask = torch.zeros(len(lengths), width, dtype=torch.long), torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(1, vocab, (n,))
        mask[row, width - n:] = 1
    return ids, mask


def _greedy(model, ids, new):
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat((ids, model(ids)[:, -1].argmax(-1)[:, None]), dim=1)
    return ids


# ---------------------------------------------------------------------------------------- maths


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
def test_hook_equals_explicit_prefix_kv_at_shifted_positions(preset):
    model = _model(preset)
    ids, mask = _left_padded([7, 4])
    encoder = prefix.prefix_encoder(model)
    flat = encoder.flat()  # (P, L * 2 * nkv * hd) laid out (layer, k|v, head, hd) per virtual token
    nkv, hd = model.config.num_kv_heads, model.config.head_dim
    layers = flat.view(P, 2, 2, nkv, hd)  # (P, L, k|v, nkv, hd)
    prefix_kv = [(layers[:, i, 0].transpose(0, 1)[None], layers[:, i, 1].transpose(0, 1)[None]) for i in range(2)]
    positions = (mask.cumsum(-1) - 1).clamp(min=0) + P
    with torch.no_grad():
        got = model(ids, attention_mask=mask)
        with prefix.disabled(model):
            want = model(ids, attention_mask=mask, position_ids=positions, prefix_kv=prefix_kv)
            base = model(ids, attention_mask=mask)
    assert torch.equal(got, want)
    assert (got - base).abs().max() > 1e-3


def test_packed_rows_score_like_unpacked_ones():
    model, data = _model(), _data(10)
    packed = tt.data.pack_examples(data, max_length=40)
    assert len(packed) < len(data)
    cfg = _cfg()
    assert evaluate(model, packed, cfg)["loss"] == pytest.approx(evaluate(model, data, cfg)["loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("reparam_hidden,checkpointing", [(None, False), (None, True), (8, False)])
def test_fit_moves_only_the_prefix_parameters(reparam_hidden, checkpointing):
    model = _model(reparam_hidden=reparam_hidden)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = fit(model, _data(), _cfg(grad_checkpointing=checkpointing), stream=io.StringIO())
    assert len(history.losses) == 3 and all(x == x for x in history.losses)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable and all(n.startswith("prefix_encoder.") for n in trainable)
    assert len(trainable) == (1 if reparam_hidden is None else 5)


def test_gradient_checkpointing_gives_the_same_gradient():
    def grad(checkpointing):
        torch.manual_seed(0)
        model = _model()
        model.set_gradient_checkpointing(checkpointing)
        model.train()
        model(torch.arange(12)[None] % 7).logsumexp(-1).mean().backward()
        return prefix.prefix_encoder(model).embedding.grad

    plain, ckpt = grad(False), grad(True)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-7)


def test_counts_plain_reparameterised_and_folded():
    base = tt.count_parameters(tt.models.build("llama-tiny")).total
    L, nkv, hd, d, h = 2, 2, 16, 64, 8  # llama-tiny: 2 layers, 2 kv heads of 16, hidden 64
    plain = L * 2 * P * nkv * hd
    pc = tt.count_parameters(_model())
    assert (pc.trainable, pc.total) == (plain, base + plain)
    model = _model(reparam_hidden=h)
    assert tt.count_parameters(model).trainable == P * d + (d * h + h) + (h * L * 2 * nkv * hd + L * 2 * nkv * hd)
    ids = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        before = model(ids)
        assert prefix.fold(model) is model and prefix.fold(model) is model  # twice is once
        assert torch.equal(model(ids), before)
    assert tt.count_parameters(model).trainable == plain


def test_bf16_base_keeps_fp32_prefixes():
    model = tt.models.build("llama-tiny", dtype=torch.bfloat16)
    prefix.apply(model, prefix.PrefixConfig(num_virtual_tokens=2))
    assert prefix.prefix_encoder(model).embedding.dtype == torch.float32
    assert model(torch.randint(0, 256, (1, 4))).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------- state


def test_state_dict_round_trip_is_bitwise_and_reparam_saves_the_prefixes():
    a, b = _model(), _model()
    sd = prefix.state_dict(a)
    assert list(sd) == ["prompt_embeddings"] and sd["prompt_embeddings"].shape == (P, 2 * 2 * 2 * 16)
    assert prefix.load_state_dict(b, sd) == ([], [])
    ids = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
    r = _model(reparam_hidden=8)
    sd = prefix.state_dict(r)  # computed through the MLP; the model is not folded by it
    assert not prefix.prefix_encoder(r).folded
    with pytest.raises(ValueError, match=r"MLP \(reparam_hidden=8\).*call prefix.fold\(model\) first"):
        prefix.load_state_dict(r, sd)
    prefix.load_state_dict(b, sd)
    with torch.no_grad():
        torch.testing.assert_close(b(ids), r(ids), rtol=0, atol=1e-6)


def test_disabled_is_the_base_bit_for_bit():
    base = tt.models.build("llama-tiny")
    ids, mask = _left_padded([6, 3])
    with torch.no_grad():
        want = base(ids, attention_mask=mask)
    gen_want = tt.generate(base, ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
    model = _model()
    with prefix.disabled(model), torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask), want)
        assert torch.equal(tt.generate(model, ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[]), gen_want)


# ---------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
def test_cached_generation_equals_uncached(preset):
    model = _model(preset)
    ids = torch.randint(0, 256, (2, 5))
    assert torch.equal(tt.generate(model, ids, max_new_tokens=6, eos_token_id=[]), _greedy(model, ids, 6))


def test_left_padded_batch_equals_one_by_one():
    model = _model(reparam_hidden=8)
    ids, mask = _left_padded([7, 3, 5])
    batch = tt.generate(model, ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[])
    for row in range(3):
        alone = ids[row][mask[row].bool()][None]
        one = tt.generate(model, alone, max_new_tokens=5, eos_token_id=[])
        assert torch.equal(batch[row, 7 - alone.shape[1]:], one[0])


# ---------------------------------------------------------------------------------------- errors


class NoConfig(nn.Module):
    def forward(self, input_ids, position_ids=None, prefix_kv=None):
        return input_ids


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens must be an integer >= 1, got num_virtual_tokens=0"),
    (dict(reparam_hidden=0), "reparam_hidden must be an integer >= 1 or None"),
])
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prefix.PrefixConfig(**kwargs)


def test_apply_errors():
    model = _model()
    with pytest.raises(ValueError, match="already has prefix tuning applied"):
        prefix.apply(model, prefix.PrefixConfig())
    with pytest.raises(ValueError, match="already has prefix tuning applied"):
        prompt.apply(model, prompt.PromptConfig())
    with pytest.raises(ValueError, match="prefix_kv was passed to a model with prefix tuning"):
        model(torch.ones(1, 2, dtype=torch.long), prefix_kv=[])
    with pytest.raises(ValueError, match="NoConfig has no config"):
        prefix.apply(NoConfig(), prefix.PrefixConfig())
    no_layers = NoConfig()
    no_layers.config = {"hidden_size": 8, "num_heads": 2}
    with pytest.raises(ValueError, match=r"NoConfig.config lacks num_layers \(or num_hidden_layers\)"):
        prefix.apply(no_layers, prefix.PrefixConfig())
    with pytest.raises(TypeError, match="expects a prefix.PrefixConfig, got PromptConfig"):
        prefix.apply(tt.models.build("llama-tiny"), prompt.PromptConfig())
    for call in (prefix.state_dict, prefix.fold, lambda m: prefix.disabled(m).__enter__()):
        with pytest.raises(ValueError, match="has no prefix tuning; call prefix.apply"):
            call(tt.models.build("llama-tiny"))


def test_a_transformers_model_is_refused_with_the_protocol_named():
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                                                num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(TypeError, match="LlamaForCausalLM.forward has no 'prefix_kv'.*peft's PrefixTuningConfig"):
        prefix.apply(hf, prefix.PrefixConfig())
    assert all(p.requires_grad for p in hf.parameters())  # nothing was changed


def test_load_state_dict_errors_name_the_keys():
    model = _model()
    with pytest.raises(ValueError, match=r"mis-shaped 'prompt_embeddings': given \(3, 64\), model \(3, 128\)"):
        prefix.load_state_dict(model, {"prompt_embeddings": torch.zeros(3, 64)})
    with pytest.raises(ValueError, match=r"missing keys: \['prompt_embeddings'\]"):
        prefix.load_state_dict(model, {})
    with pytest.raises(ValueError, match=r"unexpected keys: \['x'\]"):
        prefix.load_state_dict(model, {**prefix.state_dict(model), "x": torch.zeros(1)})


def test_peft_config_round_trip_and_errors():
    model = _model(reparam_hidden=8)
    d = prefix.peft_config_dict(model)
    assert {k: d[k] for k in ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_attention_heads",
                              "num_layers", "prefix_projection", "num_transformer_submodules")} == {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": P, "token_dim": 32,
        "num_attention_heads": 2, "num_layers": 2, "prefix_projection": True, "num_transformer_submodules": 1}
    assert d["encoder_hidden_size"] == 8
    assert prefix.config_from_peft(json.loads(json.dumps(d))) == prefix.PrefixConfig(num_virtual_tokens=P)
    for bad, match in [({"peft_type": "PROMPT_TUNING"}, "expected 'PREFIX_TUNING'"),
                       ({"r": 8}, r"unknown PREFIX_TUNING config fields \['r'\]"),
                       ({"task_type": "SEQ_2_SEQ_LM"}, "task_type='SEQ_2_SEQ_LM'"),
                       ({"num_transformer_submodules": 2}, "num_transformer_submodules=2")]:
        with pytest.raises(ValueError, match=match):
            prefix.config_from_peft({**d, **bad})


# ---------------------------------------------------------------------------------------- interop with peft


def _hf_config(transformers, family):
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module", params=["llama-gqa", "gpt2"])
def hf_checkpoint(request, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(_hf_config(transformers, request.param)).eval()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, path


def _peft_prefix(hf, peft, **kw):
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, **kw)
    theirs = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    with torch.no_grad():
        for p in theirs.prompt_encoder.parameters():
            p.mul_(0.3)
    return theirs


def test_layout_logits_and_greedy_match_peft(hf_checkpoint):
    peft = pytest.importorskip("peft")
    hf, path = hf_checkpoint
    theirs = _peft_prefix(hf, peft, prefix_projection=True, encoder_hidden_size=12)  # MLP, folded at save
    ours, _ = tt.load_pretrained(path)
    prefix.apply(ours, prefix.PrefixConfig(num_virtual_tokens=4))
    prefix.load_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    cache = theirs.get_prompt(batch_size=1)
    for i, (k, v) in enumerate(prefix.prefix_encoder(ours).layer_prefixes()):
        assert torch.equal(k, cache.layers[i].keys) and torch.equal(v, cache.layers[i].values)
    ids = torch.randint(0, 96, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # right padding: PEFT's forward counts positions 0.. over padding too, left padding differs
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)
        assert (want - hf(input_ids=ids, attention_mask=mask).logits)[mask.bool()].abs().max() > 1e-3
        greedy_theirs = _greedy(lambda x: theirs(input_ids=x).logits, ids, 5)  # peft's generate: see test_prompt
    assert torch.equal(tt.generate(ours, ids, max_new_tokens=5, eos_token_id=[]), greedy_theirs)


def test_adapter_files_load_both_ways(hf_checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    hf, path = hf_checkpoint
    ours, _ = tt.load_pretrained(path)
    prefix.apply(ours, prefix.PrefixConfig(num_virtual_tokens=4, reparam_hidden=8))  # saved folded
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "adapter_config.json").write_text(json.dumps(prefix.peft_config_dict(ours)))
    tensors = {k: v.contiguous() for k, v in prefix.state_dict(ours).items()}
    save_file(tensors, str(tmp_path / "ours" / "adapter_model.safetensors"))
    ids = torch.randint(0, 96, (2, 6))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ours")).eval()
    assert loaded.peft_config["default"].prefix_projection  # recorded as PEFT does; the file holds the prefixes
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours(ids), rtol=1e-5, atol=1e-5)

    theirs = _peft_prefix(hf, peft)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    fresh, _ = tt.load_pretrained(path)
    prefix.apply(fresh, prefix.config_from_peft(json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())))
    prefix.load_state_dict(fresh, load_file(str(tmp_path / "theirs" / "adapter_model.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
