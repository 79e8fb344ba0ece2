"""Adapter files: PEFT layout, bitwise round trip, strict loading, atomic writes, no pickles,
and interop with Hugging Face `peft` in both directions (skipped only where peft is absent)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import tinytune as tt
from conftest import TinyLM
from tinytune.peft import io as adapter_io


def _trained_lora(targets=("q_proj", "v_proj", "embed_tokens"), **kw):
    model = TinyLM()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets=list(targets), **kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    return model.eval()


def test_files_and_keys_follow_peft_layout(tmp_path):
    model = _trained_lora()
    tt.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                           "tinytune_manifest.json"]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    for field in ("peft_type", "r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora",
                  "fan_in_fan_out", "bias", "task_type"):
        assert field in cfg
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert "base_model.model.embed_tokens.lora_embedding_A" in keys


def test_round_trip_is_bitwise_and_applies_lora_when_absent(tmp_path):
    model = _trained_lora()
    tt.save_adapter(model, tmp_path)
    fresh = TinyLM()
    fresh.load_state_dict({k.replace(".base", ""): v for k, v in model.state_dict().items() if ".lora_" not in k})
    assert tt.load_adapter(fresh, tmp_path) is fresh
    for (k, a), (_, b) in zip(sorted(tt.lora.state_dict(model).items()), sorted(tt.lora.state_dict(fresh).items())):
        assert torch.equal(a, b), k
    ids = torch.randint(0, 32, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(ids), fresh.eval()(ids))


def test_load_into_a_model_that_has_lora_already(tmp_path):
    model = _trained_lora()
    tt.save_adapter(model, tmp_path)
    other = _trained_lora()
    tt.load_adapter(other, tmp_path)
    assert all(torch.equal(tt.lora.state_dict(model)[k], v) for k, v in tt.lora.state_dict(other).items())


def test_strict_load_names_bad_keys(tmp_path):
    model = _trained_lora(targets=["q_proj"])
    tt.save_adapter(model, tmp_path)
    wrong_rank = TinyLM()
    tt.lora.apply(wrong_rank, tt.lora.LoraConfig(rank=2, targets=["q_proj"]))
    # the file's r differs from the adapter already on the model: refused before any copy, naming both
    with pytest.raises(ValueError, match=r"adapter 'default' with rank=2, but .*adapter_config.json has r=4"):
        tt.load_adapter(wrong_rank, tmp_path)
    wrong_shape = TinyLM()  # same r, but the tensors do not fit the model's layer: the key is named
    tt.lora.apply(wrong_shape, tt.lora.LoraConfig(rank=4, alpha=8, targets=["q_proj"]))
    sd = {k: (v[:, :8].contiguous() if k.endswith("lora_A.weight") else v) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    (tmp_path / "tinytune_manifest.json").unlink()
    save_file(sd, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight: file \(4, 8\) vs model \(4, 16\)"):
        tt.load_adapter(wrong_shape, tmp_path)
    more = TinyLM()
    tt.lora.apply(more, tt.lora.LoraConfig(rank=4, alpha=8, targets=["q_proj", "k_proj"]))
    with pytest.raises(ValueError, match=r"missing keys: \[.*k_proj.lora_A.weight"):
        tt.load_adapter(more, tmp_path)


def test_pickles_are_refused(tmp_path):
    model = _trained_lora()
    tt.save_adapter(model, tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    torch.save(tt.lora.state_dict(model), tmp_path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="pickles are never loaded"):
        tt.load_adapter(TinyLM(), tmp_path)


def test_unsupported_config_fields_are_named(tmp_path):
    model = _trained_lora()
    tt.save_adapter(model, tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for field, value in (("use_dora", True), ("peft_type", "IA3")):
        bad = dict(cfg, **{field: value})
        cfg_path.write_text(json.dumps(bad))
        (tmp_path / "tinytune_manifest.json").unlink(missing_ok=True)  # hand-edited on purpose: unchecked
        with pytest.raises(ValueError, match=field):
            tt.load_adapter(TinyLM(), tmp_path)


def test_write_is_atomic_old_files_survive_a_failed_save(tmp_path, monkeypatch):
    model = _trained_lora()
    tt.save_adapter(model, tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()

    def explode(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_io, "save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        tt.save_adapter(_trained_lora(), tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                           "tinytune_manifest.json"]
    assert [p.name for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.")] == []


def test_save_without_adapter_raises(tmp_path):
    with pytest.raises(ValueError, match="TinyLM has no adapter"):
        tt.save_adapter(TinyLM(), tmp_path)


# ------------------------------------------------------------------ every method through the same files


def _perturb(model):
    """Move every trainable parameter off its init, so a round trip that loses them shows."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


METHODS = {  # peft_type written: how to apply the method to a fresh llama-tiny
    "IA3": lambda m: tt.ia3.apply(m, tt.ia3.IA3Config()),
    "BOTTLENECK_ADAPTER": lambda m: tt.adapter.apply(m, tt.adapter.AdapterConfig(bottleneck=8, placement="houlsby")),
    "FREEZE": lambda m: tt.freeze.bitfit(m) if any(n.endswith("bias") for n, _ in m.named_parameters())
    else tt.freeze.last_blocks(m, 1),
    "LORA": lambda m: tt.lora.apply(m, tt.lora.LoraConfig(rank=4, targets="all-linear", dora=True)),
    "PROMPT_TUNING": lambda m: tt.prompt.apply(m, tt.prompt.PromptConfig(num_virtual_tokens=3)),
    "PREFIX_TUNING": lambda m: tt.prefix.apply(m, tt.prefix.PrefixConfig(num_virtual_tokens=3)),
}


@pytest.mark.parametrize("peft_type", sorted(METHODS))
def test_every_method_round_trips_through_adapter_files(tmp_path, peft_type):
    ids = torch.randint(0, 256, (2, 9))
    model = tt.models.build("llama-tiny")
    METHODS[peft_type](model)
    _perturb(model)
    expected = model(ids)
    tt.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["peft_type"] == peft_type
    fresh = tt.load_adapter(tt.models.build("llama-tiny"), tmp_path / "a")  # the method is applied from the config
    assert torch.equal(fresh(ids), expected)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}


def test_save_adapter_refuses_two_methods_and_full_fine_tuning(tmp_path):
    model = tt.models.build("llama-tiny")
    with pytest.raises(ValueError, match="every parameter is trainable .*tt.save_pretrained"):
        tt.save_adapter(model, tmp_path / "full")
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["q_proj"]))
    tt.ia3.apply(model, tt.ia3.IA3Config(targets=["v_proj"], feedforward=[]))
    with pytest.raises(ValueError, match=r"several methods \['LORA', 'IA3'\]"):
        tt.save_adapter(model, tmp_path / "two")


def test_load_adapter_names_an_unknown_peft_type(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LOHA"}))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"peft_type='LOHA'; this loader reads \['LORA', 'IA3', 'BOTTLENECK_ADAPTER', 'PROMPT_TUNING'"):
        tt.load_adapter(tt.models.build("llama-tiny"), tmp_path)


def test_adapter_files_get_the_usual_permissions(tmp_path):
    """The atomic write goes through mkstemp (mode 0600); the files must end up as open() would make them."""
    model = tt.models.build("llama-tiny")
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2))
    umask = os.umask(0o022)
    try:
        tt.save_adapter(model, tmp_path)
    finally:
        os.umask(umask)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.parametrize("peft_type", sorted(METHODS) + ["PISSA"])
def test_a_failed_load_leaves_the_model_as_it_was(tmp_path, peft_type):
    apply = METHODS.get(peft_type) or (lambda m: tt.lora.apply(m, tt.lora.LoraConfig(rank=2, init="pissa",
                                                                                       targets=["q_proj", "v_proj"])))
    model = tt.models.build("llama-tiny")
    apply(model)
    tt.save_adapter(model, tmp_path / "a")
    weights = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    first = sorted(weights)[0]
    weights[first] = torch.zeros(1)  # a mis-shaped tensor: loading must fail on it
    (tmp_path / "a" / "tinytune_manifest.json").unlink()  # hand-made damage, past the integrity check
    save_file(weights, str(tmp_path / "a" / "adapter_model.safetensors"))
    fresh, ids = tt.models.build("llama-tiny"), torch.randint(0, 256, (1, 6))
    keys, expected = list(fresh.state_dict()), fresh(ids)
    with pytest.raises(ValueError, match="shape"):
        tt.load_adapter(fresh, tmp_path / "a")
    assert list(fresh.state_dict()) == keys and all(p.requires_grad for p in fresh.parameters())
    assert torch.equal(fresh(ids), expected)  # no hook, wrapper or rewritten base weight is left behind
    assert not hasattr(fresh, "num_virtual_tokens") or not fresh.num_virtual_tokens
