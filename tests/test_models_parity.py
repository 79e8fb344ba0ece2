"""Parity with `transformers` on tiny random checkpoints (no download): logits through the real
loader, with and without left padding, single-file and sharded, and the save round trip.
Tolerance: fp32, max abs diff <= 1e-4 on logits."""
import json

import pytest
import torch

import tinytune as tt
from tinytune.models import load_model, save_pretrained

transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle (pip install -e '.[dev]')")

SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0}

FAMILIES = {
    "llama-gqa-llama3-rope": lambda: transformers.LlamaConfig(**SMALL, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE),
    "llama-tied-mha-bias": lambda: transformers.LlamaConfig(**SMALL, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "qwen2-qkv-bias": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2),
    "qwen2-tied": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=1, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=6),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64),
    "gpt2-untied": lambda: transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                   tie_word_embeddings=False),
}


def _hf_model(name):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[name]())
    with torch.no_grad():  # HF inits some biases/norms to constants; randomise so every weight is checked
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _batch(left_pad: bool):
    ids = torch.randint(0, 96, (3, 12))
    mask = torch.ones_like(ids)
    if left_pad:
        mask[0, :4] = 0
        mask[2, :1] = 0
    return ids, mask


def _hf_logits(hf, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
def test_logits_match_transformers(name, shard, tmp_path):
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if shard else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    ours = load_model(tmp_path)
    for left_pad in (False, True):
        ids, mask = _batch(left_pad)
        with torch.no_grad():
            got = ours(ids, attention_mask=mask)
        want = _hf_logits(hf, ids, mask)
        real = mask.bool()  # logits at padding positions are not defined by either library
        assert (got[real] - want[real]).abs().max() <= 1e-4, (name, left_pad)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_saved_checkpoint_loads_in_transformers(name, tmp_path):
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    save_pretrained(ours, tmp_path / "ours", max_shard_size=30_000)
    assert (tmp_path / "ours" / "model.safetensors.index.json").exists()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids, mask = _batch(left_pad=False)
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max() <= 1e-5


def test_save_merges_lora_without_changing_the_model(tmp_path):
    model = tt.models.build("llama-tiny")
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, targets="all-linear"))
    with torch.no_grad():
        for _, layer in tt.lora.lora_layers(model):
            layer.lora_B.normal_(std=0.05)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        want = model(ids)
    save_pretrained(model, tmp_path)
    assert list(tt.lora.lora_layers(model)) and not any(l.merged for _, l in tt.lora.lora_layers(model))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (hf(ids).logits - want).abs().max() <= 1e-4


def test_loader_dtype_and_config_round_trip(tmp_path):
    hf = _hf_model("llama-gqa-llama3-rope")
    hf.save_pretrained(tmp_path)
    model, tokenizer = tt.models.load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert tokenizer is None
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    cfg = model.config
    assert (cfg.num_kv_heads, cfg.rope_scaling["rope_type"], cfg.rope_theta) == (2, "llama3", 500000.0)
    save_pretrained(model, tmp_path / "again")
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert written["dtype"] == "bfloat16" and written["num_key_value_heads"] == 2
