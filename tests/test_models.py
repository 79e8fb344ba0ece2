"""The decoder's own invariants: unsupported features refused by name, loader errors, the
PEFT hooks (inputs_embeds, per-layer prefixes) and gradient checkpointing with a frozen base."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import tinytune as tt
from tinytune.models import ModelConfig, build, load_model, save_pretrained


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"model_type": "falcon"}, r"model_type='falcon' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, r"rope_type='yarn'"),
        ({"num_local_experts": 8}, r"num_local_experts=8"),
        ({"hidden_act": "mish"}, r"hidden_act='mish'"),
        ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor"),
    ],
)
def test_unsupported_llama_features_are_named(patch, match, tmp_path):
    save_pretrained(build("llama-tiny"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(patch)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        load_model(tmp_path)


def test_qwen2_sliding_window_and_gpt2_layer_scaling_are_refused():
    qwen = build("qwen2-tiny").config.to_hf()
    with pytest.raises(ValueError, match="use_sliding_window=True"):
        ModelConfig.from_hf(dict(qwen, use_sliding_window=True))
    gpt2 = build("gpt2-tiny").config.to_hf()
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True"):
        ModelConfig.from_hf(dict(gpt2, scale_attn_by_inverse_layer_idx=True))


def test_bad_config_fields():
    with pytest.raises(ValueError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
        ModelConfig(num_heads=6, num_kv_heads=4, hidden_size=48)
    with pytest.raises(ValueError, match="unknown model preset 'llama-huge'"):
        build("llama-huge")


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    save_pretrained(build("llama-tiny"), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights.pop("model.layers.1.mlp.up_proj.weight")
    weights["model.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    weights["model.norm.weight"] = torch.ones(3)
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "tinytune_manifest.json").unlink()  # hand-made damage, past the integrity check
    with pytest.raises(ValueError) as info:
        load_model(tmp_path)
    msg = str(info.value)
    assert "missing keys: ['model.layers.1.mlp.up_proj.weight']" in msg
    assert "unexpected keys: ['model.layers.0.self_attn.extra.weight']" in msg
    assert "model.norm.weight: file (3,) vs model (64,)" in msg


def test_pickled_weights_refused_unless_opted_in(tmp_path):
    model = build("llama-tiny")
    save_pretrained(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "tinytune_manifest.json").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled weights.*allow_pickle=True"):
        load_model(tmp_path)
    loaded = load_model(tmp_path, allow_pickle=True)  # torch.load(weights_only=True)
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_missing_directory_contents(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_model(tmp_path)
    save_pretrained(build("llama-tiny"), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(tmp_path)


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
def test_inputs_embeds_equal_input_ids(preset):
    model = build(preset)
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids)
        assert torch.equal(model(inputs_embeds=embeds), model(ids))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(ids, inputs_embeds=embeds)


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen2-tiny", "gpt2-tiny"])
def test_prefix_kv_equals_attending_to_a_real_prefix(preset):
    """Per-layer prefixes taken from a real prefix's cache reproduce running prefix + text."""
    model = build(preset)
    prefix, text = torch.randint(0, 256, (2, 4)), torch.randint(0, 256, (2, 6))
    cache = model.new_cache(2, 4)
    with torch.no_grad():
        model(prefix, cache=cache)
        prefix_kv = [(k[:, :, :4], v[:, :, :4]) for k, v in zip(cache.k, cache.v)]
        positions = torch.arange(4, 10)[None].expand(2, 6)
        got = model(text, position_ids=positions, prefix_kv=prefix_kv)
        want = model(torch.cat((prefix, text), dim=1))[:, 4:]
    assert (got - want).abs().max() <= 1e-5


def test_gradient_checkpointing_gives_lora_grads_with_frozen_base():
    def grads(checkpointing):
        torch.manual_seed(0)
        model = build("llama-tiny")
        tt.lora.apply(model, tt.lora.LoraConfig(rank=4, targets="all-linear"))
        with torch.no_grad():
            for _, layer in tt.lora.lora_layers(model):
                layer.lora_B.normal_(std=0.02)
        model.set_gradient_checkpointing(checkpointing)
        model.train()
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(ids).logsumexp(-1).mean()
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, sum(saved)

    plain, plain_saved = grads(False)
    ckpt, ckpt_saved = grads(True)
    assert plain.keys() == ckpt.keys() and all(g is not None for g in ckpt.values())
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6)
    assert ckpt_saved < plain_saved  # less kept for backward


@pytest.mark.parametrize("preset", ["llama-tiny", "qwen2-tiny", "gpt2-tiny"])
def test_decode_layout_changes_strides_not_values(preset, tmp_path):
    model = build(preset)
    ids = torch.randint(0, 256, (2, 9))
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    with torch.no_grad():
        want = model(ids)
        names = model.set_decode_layout()
        got = model(ids)
    assert "lm_head" in names and any(n.endswith("mlp.up_proj") for n in names)
    assert not model.lm_head.weight.is_contiguous()
    for n, p in model.named_parameters():
        assert p is params[n][0] and torch.equal(p, params[n][1]), n  # same objects, same values
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # fp32, different summation order
    save_pretrained(model, tmp_path)  # writes contiguous tensors
    with torch.no_grad():
        assert (load_model(tmp_path)(ids) - got).abs().max() <= 1e-5
    assert model.set_decode_layout(False) and model.lm_head.weight.is_contiguous()


def test_four_d_mask_is_validated():
    model = build("llama-tiny")
    ids = torch.randint(0, 256, (2, 5))
    with pytest.raises(ValueError, match=r"must be bool of shape \(2, 1, 5, 5\)"):
        model(ids, attention_mask=torch.ones(2, 1, 5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="cannot be combined with a KV cache"):
        model(ids, attention_mask=torch.ones(2, 1, 5, 5, dtype=torch.bool), cache=model.new_cache(2, 8))
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=causal), model(ids), rtol=0, atol=1e-5)
