"""tt.generate with LoRA merged once per call (`generation_context`) equals the unmerged path."""
import pytest
import torch

import tinytune as tt
from tinytune.models import build
from tinytune.models.generate import generate
from tinytune.models.presets import init_weights


def _lora_model(dora: bool = False, second: bool = False):
    torch.manual_seed(1)
    model = init_weights(build("llama-tiny"), std=0.15)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, dropout=0.1, targets="all-linear", dora=dora))
    if second:
        tt.lora.add_adapter(model, "b", tt.lora.LoraConfig(rank=2, alpha=4, targets=["q_proj", "o_proj"]))
    with torch.no_grad():
        for _, layer in tt.lora.lora_layers(model):
            for name in layer.adapters:
                layer.adapter_parameters(name)["lora_B"].normal_(0, 0.3)
    return model.eval()


def _ids(rows=3, length=6):
    return torch.randint(2, 200, (rows, length), generator=torch.Generator().manual_seed(0))


def _bases(model):
    return {n: layer.base.weight.detach().clone() for n, layer in tt.lora.lora_layers(model)}


def _run(model, merge, **kw):
    return generate(model, _ids(), max_new_tokens=8, eos_token_id=[], return_logprobs=True, merge_lora=merge, **kw)


def _assert_same(model, **kw):
    before = _bases(model)
    ids_u, lp_u = _run(model, False, **kw)
    ids_m, lp_m = _run(model, True, **kw)
    assert torch.equal(ids_u, ids_m)
    torch.testing.assert_close(lp_m, lp_u, atol=1e-5, rtol=0)
    after = _bases(model)
    assert all(torch.equal(before[n], after[n]) for n in before), "base weights must stay bit-identical"
    assert all(layer._inference_weight is None for _, layer in tt.lora.lora_layers(model)), "cache dropped"


@pytest.mark.parametrize("dora", [False, True])
def test_merged_equals_unmerged_greedy_and_sampled(dora):
    model = _lora_model(dora)
    _assert_same(model)
    _assert_same(model, temperature=1.0, seed=3)


def test_merged_path_is_taken_and_delta_matters():
    model = _lora_model()
    seen = []
    layer = next(layer for _, layer in tt.lora.lora_layers(model))
    hook = layer.register_forward_hook(lambda m, i, o: seen.append(m._inference_weight is not None))
    _run(model, True)
    hook.remove()
    assert seen and all(seen)
    with tt.lora.disabled(model):
        base_ids, _ = _run(model, True)
    assert not torch.equal(base_ids, _run(model, True)[0]), "the random B must change the output"


def test_several_adapters_one_active_and_disabled_context():
    model = _lora_model(second=True)
    _assert_same(model)
    tt.lora.set_adapter(model, "b")
    _assert_same(model)
    with tt.lora.disabled(model):
        _assert_same(model)


def test_adapter_per_row_falls_back():
    model = _lora_model(second=True)
    with tt.lora.adapter_per_row(model, ["default", "b", None]):
        layer = next(layer for _, layer in tt.lora.lora_layers(model))
        assert layer.inference_merge_refusal() is not None
        _assert_same(model)


def test_training_mode_or_grad_falls_back():
    model = _lora_model()
    layer = next(layer for _, layer in tt.lora.lora_layers(model))
    with torch.no_grad():
        assert layer.inference_merge_refusal() is None
        model.train()
        assert "training" in layer.inference_merge_refusal()
        model.eval()
    assert "grad" in layer.inference_merge_refusal()


def test_inference_merged_context_and_bad_argument():
    model = _lora_model()
    x = _ids()
    with torch.no_grad():
        plain = model(x)
        with tt.lora.inference_merged(model):
            merged = model(x)
            assert all(layer._inference_weight is not None for _, layer in tt.lora.lora_layers(model)
                       if isinstance(layer, tt.lora.LoRALinear))
    torch.testing.assert_close(merged, plain, atol=1e-4, rtol=1e-5)
    assert all(layer._inference_weight is None for _, layer in tt.lora.lora_layers(model))
    with pytest.raises(ValueError, match="merge_lora"):
        generate(model, x, max_new_tokens=2, merge_lora="yes")
