import torch.nn as nn

import tinytune as tt
from conftest import TinyLM


def test_textbook_example_512x64_rank8():
    layer = nn.Linear(512, 64, bias=False)
    assert tt.count_parameters(layer).total == 32_768
    wrapped = tt.lora.LoRALinear(layer, rank=8, alpha=16)
    pc = tt.count_parameters(wrapped)
    assert pc.trainable == 4_608  # 8 * (512 + 64)
    assert pc.total == 32_768 + 4_608
    assert pc.frozen == 32_768


def test_textbook_example_through_apply():
    model = nn.Sequential(nn.Linear(512, 64, bias=False))
    tt.lora.apply(model, tt.lora.LoraConfig(rank=8, targets=["0"]))
    pc = tt.count_parameters(model)
    assert (pc.trainable, pc.frozen) == (4_608, 32_768)
    assert abs(pc.trainable_fraction - 4_608 / 37_376) < 1e-12


def test_tied_weights_count_once_and_table_lists_top_level_modules():
    model = TinyLM()
    model.lm_head.weight = model.embed_tokens.weight
    pc = tt.count_parameters(model)
    assert pc.total == sum(p.numel() for p in model.parameters())  # parameters() dedupes too
    text = str(pc)
    for name in ("embed_tokens", "layers", "total", "frozen"):
        assert name in text
    assert "lm_head" not in text  # its only parameter is the embedding's


def test_empty_model():
    pc = tt.count_parameters(nn.ReLU())
    assert (pc.total, pc.trainable, pc.trainable_fraction) == (0, 0, 0.0)
