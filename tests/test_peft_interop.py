"""Interop with Hugging Face `peft` in both directions: adapters saved by tinytune load in peft on
the same model with the same outputs, and the reverse. Skipped only where peft is not installed
(CI installs it through the `dev` extra)."""
import copy

import pytest
import torch

import tinytune as tt
from conftest import TinyLM
from test_adapter_io import _trained_lora

peft = pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[dev]' installs it)")


def _plain_copy(model_with_lora):
    plain = TinyLM()
    plain.load_state_dict({k.replace(".base", ""): v for k, v in model_with_lora.state_dict().items() if ".lora_" not in k})
    return plain.eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_tinytune_adapter_loads_in_peft(tmp_path, rslora):
    model = _trained_lora(rslora=rslora)
    tt.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(_plain_copy(model), str(tmp_path)).eval()
    ids = torch.randint(0, 32, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids), model(ids), rtol=1e-5, atol=1e-5)  # fp32, different op order


def test_peft_adapter_loads_in_tinytune(tmp_path):
    base = TinyLM().eval()
    reference = copy.deepcopy(base)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "embed_tokens"], use_rslora=True)
    peft_model = peft.get_peft_model(reference, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.3)
    peft_model.save_pretrained(str(tmp_path))
    tt.load_adapter(base, tmp_path)
    ids = torch.randint(0, 32, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(base(ids), peft_model.eval()(ids), rtol=1e-5, atol=1e-5)


def test_round_trip_through_transformers_llama(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    ours = copy.deepcopy(hf)
    tt.lora.apply(ours, tt.lora.LoraConfig(rank=4, alpha=16, targets="all-linear"))
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    tt.save_adapter(ours, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
