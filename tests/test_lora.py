"""LoRA invariants on arbitrary nn.Module trees (tolerances stated next to each check)."""
import copy

import pytest
import torch
import torch.nn as nn

import tinytune as tt
from conftest import TinyLM


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def _randomise_b(model):
    with torch.no_grad():
        for _, layer in tt.lora.lora_layers(model):
            for name, p in layer.named_parameters(recurse=False):
                if name.endswith("B"):
                    p.normal_(std=0.5)


CASES = [
    ("mlp", lambda: nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 6)), ["0", "2"], lambda: torch.randn(5, 12)),
    ("encoder-ff", lambda: nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), ["linear1", "linear2"], lambda: torch.randn(2, 7, 16)),
    ("cnn-head", SmallCNN, ["head"], lambda: torch.randn(2, 3, 8, 8)),
    ("custom-tree", TinyLM, ["q_proj", "v_proj", "embed_tokens"], lambda: torch.randint(0, 32, (2, 9))),
    ("all-linear", TinyLM, "all-linear", lambda: torch.randint(0, 32, (2, 9))),
]


@pytest.mark.parametrize("kind,make,targets,make_input", CASES, ids=[c[0] for c in CASES])
def test_equal_to_base_at_init_and_only_adapters_train(kind, make, targets, make_input):
    model = make()
    base = copy.deepcopy(model)
    x = make_input()
    names = tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets=targets))
    assert names
    model.eval(); base.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-6)  # B = 0: same computation
    model.train()
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(trainable, lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def test_encoder_layer_fast_path_does_not_skip_the_adapter():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    tt.lora.apply(layer, tt.lora.LoraConfig(rank=2, targets=["linear1", "linear2"]))
    _randomise_b(layer)
    with torch.no_grad():
        active = layer(x)
        with tt.lora.disabled(layer):
            plain = layer(x)
    assert (active - plain).abs().max() > 1e-3  # the adapter is seen under no_grad in eval mode


def _merge_setup(dtype=torch.float32):
    model = TinyLM().to(dtype)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets="all-linear"))
    _randomise_b(model)
    return model.eval(), torch.randint(0, 32, (3, 11))


def test_merge_equals_unmerged_and_merge_twice_is_once():
    model, ids = _merge_setup()
    with torch.no_grad():
        ref = model(ids)
        tt.lora.merge(model)
        merged = model(ids)
        weights_once = [p.clone() for p in model.parameters()]
        tt.lora.merge(model)
        twice = [p.clone() for p in model.parameters()]
    scale = ref.abs().max()
    assert (merged - ref).abs().max() <= 1e-5 * scale  # fp32: relative to the output scale
    assert all(torch.equal(a, b) for a, b in zip(weights_once, twice))


def test_unmerge_restores_base_weights():
    model, ids = _merge_setup()
    before = {n: p.clone() for n, p in model.named_parameters() if ".base." in n}
    tt.lora.merge(model)
    tt.lora.unmerge(model)
    tt.lora.unmerge(model)  # safe twice
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)  # fp32 rounding of w + d - d


def test_disabled_is_bit_for_bit_base():
    model, ids = _merge_setup()
    plain = TinyLM().eval()  # the same base weights in plain modules
    plain.load_state_dict({k.replace(".base", ""): v for k, v in model.state_dict().items() if ".lora_" not in k})
    with torch.no_grad(), tt.lora.disabled(model):
        assert torch.equal(model(ids), plain(ids))
    with torch.no_grad():
        assert not torch.equal(model(ids), plain(ids))  # enabled again after the block


def test_disabled_refuses_a_merged_model():
    model, _ = _merge_setup()
    tt.lora.merge(model)
    with pytest.raises(RuntimeError, match="merged into"):
        with tt.lora.disabled(model):
            pass


def test_merge_and_unload_gives_plain_modules_with_same_output():
    model, ids = _merge_setup()
    with torch.no_grad():
        ref = model(ids)
        out = tt.lora.merge_and_unload(model)
        assert out is model
        assert not list(tt.lora.lora_layers(model))
        assert type(model.layers[0]["self_attn"].q_proj) is nn.Linear
        assert (model(ids) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_bf16_base_keeps_fp32_adapters_and_documented_merge_rounding():
    model, ids = _merge_setup(torch.bfloat16)
    layer = model.layers[0]["self_attn"].q_proj
    assert layer.base.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        ref = model(ids)
        assert ref.dtype == torch.bfloat16
        tt.lora.merge(model)
        merged = model(ids)
    # bf16 keeps 8 significant bits: merging rounds each weight to ~2^-8 relative (docs/lora.md)
    assert (merged.float() - ref.float()).abs().max() <= 0.05 * ref.float().abs().max()


def test_weights_are_shared_not_copied():
    lin = nn.Linear(8, 4)
    layer = tt.lora.LoRALinear(lin, rank=2, alpha=4)
    assert layer.base is lin and layer.weight is lin.weight and layer.bias is lin.bias
    assert not lin.weight.requires_grad


@pytest.mark.parametrize("rslora,expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scaling(rslora, expected):
    layer = tt.lora.LoRALinear(nn.Linear(8, 4), rank=4, alpha=16, rslora=rslora)
    assert layer.scaling == expected
    assert tt.lora.LoraConfig(rank=4, alpha=16, rslora=rslora).scaling == expected


def test_inits():
    torch.manual_seed(0)
    k = tt.lora.LoRALinear(nn.Linear(256, 64), rank=16, alpha=16, init="kaiming")
    g = tt.lora.LoRALinear(nn.Linear(256, 64), rank=16, alpha=16, init="gaussian")
    assert torch.count_nonzero(k.lora_B) == 0 and torch.count_nonzero(g.lora_B) == 0
    bound = 1 / 256 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 256, as nn.Linear
    assert k.lora_A.abs().max() <= bound
    assert abs(g.lora_A.std().item() - 1 / 16) < 0.01


def test_dropout_only_in_training_and_adapter_grads_flow():
    layer = tt.lora.LoRALinear(nn.Linear(32, 8), rank=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    assert layer.base.weight.grad is None


def test_embedding_lora_matches_merged_weight():
    emb = nn.Embedding(20, 6, padding_idx=0)
    layer = tt.lora.LoRAEmbedding(emb, rank=3, alpha=6)
    ids = torch.randint(0, 20, (2, 5))
    assert torch.equal(layer(ids), emb(ids))
    with torch.no_grad():
        layer.lora_embedding_B.normal_()
    expected = torch.nn.functional.embedding(ids, emb.weight + layer.delta_weight())
    torch.testing.assert_close(layer(ids), expected, rtol=1e-5, atol=1e-6)


def test_train_bias_makes_adapted_biases_trainable():
    model = TinyLM()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["q_proj"], train_bias=True))
    q = model.layers[0]["self_attn"].q_proj
    assert q.base.bias.requires_grad and not q.base.weight.requires_grad
    assert not model.layers[0]["self_attn"].k_proj.bias.requires_grad
    assert any(k.endswith("q_proj.bias") for k in tt.lora.state_dict(model))


def test_autocast_bf16_forward_backward():
    model = TinyLM()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, targets="all-linear"))
    ids = torch.randint(0, 32, (2, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    lora_b = model.layers[0]["self_attn"].q_proj.lora_B
    assert lora_b.grad is not None and lora_b.grad.dtype == torch.float32


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_merge_refuses_a_weight_tied_to_another_module(target, tmp_path):
    """Merging LoRA into a tied lm_head / embedding would change the other module too (merged != unmerged)."""
    model = tt.models.build("qwen2-tiny").eval()  # tie_word_embeddings=True
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, targets=[target]))
    before = model.model.embed_tokens.weight.detach().clone()
    for merge in (tt.lora.merge, tt.lora.merge_and_unload, lambda m: tt.save_pretrained(m, tmp_path)):
        with pytest.raises(ValueError, match="tied"):
            merge(model)
    assert torch.equal(model.model.embed_tokens.weight, before)
