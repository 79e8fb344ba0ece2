"""The invariants every PEFT method promises (issue 5), checked the same way for all of them on the
tinytune decoder: equal to the base at init, `disabled()` equal to the base after training, merge
equal to unmerged where defined, a bitwise state-dict round trip, only the method's parameters move
in a training step, and applying a method twice is refused."""
import io

import pytest
import torch

import tinytune as tt
from tinytune.train import TrainConfig, fit

# name: (namespace, config); every namespace has apply / state_dict / load_state_dict
METHODS = {
    "lora": (tt.lora, tt.lora.LoraConfig(rank=4, targets="all-linear")),
    "dora": (tt.lora, tt.lora.LoraConfig(rank=4, targets="all-linear", dora=True)),
    "pissa": (tt.lora, tt.lora.LoraConfig(rank=4, targets=["q_proj", "v_proj"], init="pissa")),
    "ia3": (tt.ia3, tt.ia3.IA3Config()),
    "adapter-houlsby": (tt.adapter, tt.adapter.AdapterConfig(bottleneck=8)),
    "adapter-parallel": (tt.adapter, tt.adapter.AdapterConfig(bottleneck=8, placement="parallel")),
    "prefix": (tt.prefix, tt.prefix.PrefixConfig(num_virtual_tokens=4)),
    "prefix-mlp": (tt.prefix, tt.prefix.PrefixConfig(num_virtual_tokens=4, reparam_hidden=16)),
    "prompt": (tt.prompt, tt.prompt.PromptConfig(num_virtual_tokens=4)),
    "freeze-last-block": (tt.freeze, tt.freeze.FreezeConfig(mode="last_blocks", n_blocks=1)),
}
IDS = torch.randint(4, 256, (2, 10), generator=torch.Generator().manual_seed(0))
# fp32, a 2-layer 64-wide model: rounding between mathematically equal paths stays far below this
ATOL = 1e-5


def _data():
    gen = torch.Generator().manual_seed(1)
    out = []
    for i in range(8):
        ids = torch.randint(4, 256, (6 + i % 4,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return out


def _applied(name):
    namespace, cfg = METHODS[name]
    model = tt.models.build("llama-tiny")  # the same seeded weights each call
    torch.manual_seed(2)
    namespace.apply(model, cfg)
    return model, namespace


def _trained(name, steps=2):
    model, namespace = _applied(name)
    fit(model, _data(), TrainConfig(lr=5e-2, steps=steps, batch_size=4, log_every=100), stream=io.StringIO())
    return model.eval(), namespace


# Prefixes and soft prompts add context from the first step: no init makes them a no-op.
CHANGES_THE_INPUT = {"prefix", "prefix-mlp", "prompt"}


@pytest.mark.parametrize("name", sorted(set(METHODS) - CHANGES_THE_INPUT))
def test_equal_to_the_base_at_init(name):
    base = tt.models.build("llama-tiny").eval()(IDS)
    model, _ = _applied(name)
    torch.testing.assert_close(model.eval()(IDS), base, atol=ATOL, rtol=0)


# PiSSA moves the principal part of W into A and B: disabled, the model is the residual (as in PEFT).
@pytest.mark.parametrize("name", sorted(m for m in METHODS if not m.startswith("freeze") and m != "pissa"))
def test_disabled_is_the_base_after_training(name):
    base = tt.models.build("llama-tiny").eval()(IDS)
    model, namespace = _trained(name)
    assert not torch.allclose(model(IDS), base, atol=1e-4)  # training moved it
    with namespace.disabled(model):
        torch.testing.assert_close(model(IDS), base, atol=ATOL, rtol=0)
    assert not torch.allclose(model(IDS), base, atol=1e-4)  # and the method is back on after


@pytest.mark.parametrize("name", ["lora", "dora", "ia3"])
def test_merge_equals_unmerged_and_unmerge_restores(name):
    model, namespace = _trained(name)
    before = model(IDS)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    namespace.merge(model)
    torch.testing.assert_close(model(IDS), before, atol=ATOL, rtol=0)
    namespace.unmerge(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=0, msg=key)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_state_dict_round_trip_is_bitwise(name):
    model, namespace = _trained(name)
    sd = namespace.state_dict(model)
    assert sd, name
    fresh, _ = _applied(name)
    if name == "prefix-mlp":  # the MLP is saved as the prefixes it computes (as PEFT does): fold first
        tt.prefix.fold(fresh)
    namespace.load_state_dict(fresh, sd)
    for key, value in namespace.state_dict(fresh).items():
        assert torch.equal(value, sd[key]), key
    assert torch.equal(fresh.eval()(IDS), model(IDS))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_only_the_method_parameters_move_in_training(name):
    model, _ = _applied(name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, _data(), TrainConfig(lr=5e-2, steps=1, batch_size=8, log_every=100), stream=io.StringIO())
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable, sorted(moved - trainable)
    assert len(trainable) < len(before)  # the base is (at least partly) frozen


@pytest.mark.parametrize("name", sorted(m for m in METHODS if not m.startswith("freeze")))
def test_applying_a_method_twice_is_refused(name):
    model, namespace = _applied(name)
    with pytest.raises(ValueError, match=r"already|twice|has LoRA|again"):
        namespace.apply(model, METHODS[name][1])


@pytest.mark.parametrize("make, message", [
    (lambda: tt.prefix.PrefixConfig(num_virtual_tokens=0), "num_virtual_tokens"),
    (lambda: tt.prompt.PromptConfig(num_virtual_tokens=0), "num_virtual_tokens"),
    (lambda: tt.adapter.AdapterConfig(placement="sideways"), "placement='sideways'.*houlsby"),
    (lambda: tt.adapter.AdapterConfig(bottleneck=0), "bottleneck"),
    (lambda: tt.lora.LoraConfig(rank=0), "rank"),
    (lambda: tt.lora.LoraConfig(init="svd"), "init"),
    (lambda: tt.freeze.FreezeConfig(mode="everything"), "mode"),
])
def test_a_bad_config_names_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("name", ["lora", "dora", "ia3"])
def test_save_pretrained_merges_mergeable_methods(tmp_path, name):
    model, namespace = _trained(name)
    expected = model(IDS)
    tt.save_pretrained(model, tmp_path / "merged")
    loaded, _ = tt.load_pretrained(tmp_path / "merged")
    torch.testing.assert_close(loaded(IDS), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(model(IDS), expected, atol=0, rtol=0)  # the model itself is unchanged
    if name == "ia3":  # an already merged layer is written as it is, not scaled twice
        namespace.merge(model)
        tt.save_pretrained(model, tmp_path / "merged-twice")
        torch.testing.assert_close(tt.load_pretrained(tmp_path / "merged-twice")[0](IDS), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name, message", [("adapter-houlsby", "bottleneck adapters cannot be merged"),
                                           ("prefix", "prefix tuning cannot"), ("prompt", "prompt tuning cannot")])
def test_save_pretrained_refuses_methods_that_do_not_merge(tmp_path, name, message):
    model, _ = _applied(name)
    with pytest.raises(ValueError, match=message + ".*tt.save_adapter"):
        tt.save_pretrained(model, tmp_path / "x")
    assert not (tmp_path / "x" / "model.safetensors").exists()
