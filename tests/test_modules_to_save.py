"""Trained modules that are not adapters (PEFT's `modules_to_save`) and adapter metadata (issue 10, items 5-6).

A classifier's head trained with an adapter is saved with it and reloads bit for bit; a parameter
unfrozen by hand is never dropped silently; every method config takes `modules_to_save`; the files are
PEFT's (`base_model.model.score.weight`, `task_type`, `base_model_name_or_path`), checked against peft and
transformers both ways; a `torch.compile`d model writes the same files as the plain one.
"""
import copy
import io
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tinytune as tt
from tinytune.models import SequenceClassifier, TokenClassifier
from tinytune.peft import adapter, freeze, ia3, modules_to_save, prefix, prompt
from tinytune.train import TrainConfig, fit


def _keys(path) -> list[str]:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return sorted(f.keys())


def _config(path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())


def _cls_data(n, offset=0):
    """The label is the first token (10 or 11); the head reads the last (EOS), so it must look back."""
    gen = torch.Generator().manual_seed(offset)
    out = []
    for i in range(n):
        label = int(torch.randint(0, 2, (1,), generator=gen))
        out.append({"input_ids": [10 + label] + torch.randint(12, 256, (2 + i % 4,), generator=gen).tolist() + [2],
                    "label": label})
    return out


def _predict(clf, examples):
    batch = tt.data.pad_batch(examples, 0)
    with torch.no_grad():
        logits = clf(batch["input_ids"], batch["attention_mask"])
    return logits, tt.data.accuracy(logits.argmax(-1), batch["label"])


# ------------------------------------------------------------------------------ the classification workflow
def test_a_trained_classifier_reloads_with_the_same_accuracy_and_logits(tmp_path):
    train, test = _cls_data(64), _cls_data(32, offset=1)
    torch.manual_seed(1)
    clf = SequenceClassifier(tt.models.build("llama-tiny"), num_labels=2)
    names = tt.lora.apply(clf, tt.lora.LoraConfig(rank=4, alpha=8, targets="all-linear"))
    assert "score" not in names and clf.score.weight.requires_grad  # the head declares itself: trained whole
    cfg = TrainConfig(task="classification", lr=1e-2, steps=30, batch_size=16, log_every=1000)
    fit(clf, train, cfg, stream=io.StringIO())
    logits, accuracy = _predict(clf.eval(), test)
    assert accuracy >= 0.9
    tt.save_adapter(clf, tmp_path)
    assert "base_model.model.score.weight" in _keys(tmp_path)
    config = _config(tmp_path)
    assert (config["modules_to_save"], config["task_type"], config["base_model_name_or_path"]) == (["score"], "SEQ_CLS", None)
    torch.manual_seed(2)  # another head init: only the file can make them agree
    fresh = SequenceClassifier(tt.models.build("llama-tiny"), num_labels=2)
    assert not torch.equal(_predict(fresh, test)[0], logits)
    tt.load_adapter(fresh, tmp_path)
    fresh_logits, fresh_accuracy = _predict(fresh.eval(), test)
    assert fresh_accuracy == accuracy and torch.equal(fresh_logits, logits)
    assert fresh.score.weight.requires_grad  # and it can train on


def test_a_token_classifier_head_with_its_bias_round_trips(tmp_path):
    ner = TokenClassifier(tt.models.build("llama-tiny"), num_labels=3)
    tt.ia3.apply(ner, tt.ia3.IA3Config())
    with torch.no_grad():
        ner.classifier.weight.normal_()
        ner.classifier.bias.normal_()
    tt.save_adapter(ner, tmp_path)
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(_keys(tmp_path))
    assert (_config(tmp_path)["task_type"], _config(tmp_path)["modules_to_save"]) == ("TOKEN_CLS", ["classifier"])
    fresh = TokenClassifier(tt.models.build("llama-tiny"), num_labels=3)
    tt.load_adapter(fresh, tmp_path)
    ids = torch.randint(4, 256, (2, 6))
    assert torch.equal(fresh(ids), ner(ids))


def test_selective_fine_tuning_keeps_a_head_trainable_and_saves_it(tmp_path):
    clf = SequenceClassifier(tt.models.build("llama-tiny"), num_labels=2)
    freeze.apply(clf, freeze.FreezeConfig(mode="norms"))
    assert clf.score.weight.requires_grad
    with torch.no_grad():
        clf.score.weight.normal_()
    tt.save_adapter(clf, tmp_path)
    assert "score.weight" in _config(tmp_path)["trainable_parameters"]
    fresh = SequenceClassifier(tt.models.build("llama-tiny"), num_labels=2)
    tt.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh.score.weight, clf.score.weight)


# ------------------------------------------------------------------------------ nothing trained is lost
def test_a_parameter_unfrozen_by_hand_is_refused_naming_it_with_the_remedy(tmp_path):
    model = tt.models.build("llama-tiny")
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["q_proj"]))
    model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"parameters \['model.norm.weight'\] .* would silently lose .*"
                                         r"modules_to_save.add\(model, \['model.norm'\]\).* or freeze them"):
        tt.save_adapter(model, tmp_path)
    assert not tmp_path.joinpath("adapter_config.json").exists()  # nothing written
    assert modules_to_save.add(model, ["norm"]) == ["model.norm"]  # the remedy: save it with the adapter
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)
    tt.save_adapter(model, tmp_path)
    assert "base_model.model.model.norm.weight" in _keys(tmp_path)
    fresh = tt.models.build("llama-tiny")
    tt.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh.model.norm.weight, model.model.norm.weight)


def test_other_lora_adapters_and_a_prefix_mlp_are_not_taken_for_stray_parameters(tmp_path):
    model = tt.models.build("llama-tiny")
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["q_proj"]))
    tt.lora.add_adapter(model, "other", tt.lora.LoraConfig(rank=2, targets=["v_proj"]))
    tt.save_adapter(model, tmp_path / "a", adapter="other")  # "default" trains, but is not this file's
    model = tt.models.build("llama-tiny")
    tt.prefix.apply(model, tt.prefix.PrefixConfig(num_virtual_tokens=2, reparam_hidden=8))
    tt.save_adapter(model, tmp_path / "b")  # the MLP trains; the file holds the prefixes it computes


# ------------------------------------------------------------------------------ every method config
def _methods():
    return {
        "lora": lambda m, s: tt.lora.apply(m, tt.lora.LoraConfig(rank=2, targets=["q_proj"], modules_to_save=s)),
        "ia3": lambda m, s: ia3.apply(m, ia3.IA3Config(modules_to_save=s)),
        "adapter": lambda m, s: adapter.apply(m, adapter.AdapterConfig(bottleneck=4, modules_to_save=s)),
        "prompt": lambda m, s: prompt.apply(m, prompt.PromptConfig(num_virtual_tokens=2, modules_to_save=s)),
        "prefix": lambda m, s: prefix.apply(m, prefix.PrefixConfig(num_virtual_tokens=2, modules_to_save=s)),
    }


@pytest.mark.parametrize("method", list(_methods()))
def test_every_method_config_takes_and_round_trips_modules_to_save(method, tmp_path):
    model = tt.models.build("llama-tiny")
    _methods()[method](model, ["norm"])
    assert model.model.norm.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    tt.save_adapter(model, tmp_path)
    prefix_ = "base_model." if method in ("prompt", "prefix") else "base_model.model."  # PEFT's layouts
    assert prefix_ + "model.norm.weight" in _keys(tmp_path)
    assert (_config(tmp_path)["modules_to_save"], _config(tmp_path)["task_type"]) == (["model.norm"], "CAUSAL_LM")
    fresh = tt.models.build("llama-tiny")
    tt.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh.model.norm.weight, model.model.norm.weight) and fresh.model.norm.weight.requires_grad
    assert modules_to_save.marked(fresh) == ("model.norm",)
    ids = torch.randint(4, 256, (1, 5))
    assert torch.equal(fresh(ids), model(ids))


@pytest.mark.parametrize("method", list(_methods()))
def test_a_name_that_matches_nothing_is_refused_and_nothing_changes(method):
    model = tt.models.build("llama-tiny")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"modules_to_save \['scroe'\] matched no module of CausalLM; modules with "
                                         r"parameters that exist: 'model', 'model.embed_tokens'"):
        _methods()[method](model, ["scroe"])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert modules_to_save.marked(model) == () and not tt.lora.is_applied(model) and not ia3.is_applied(model)
    assert not hasattr(model, "prompt_encoder") and not hasattr(model, "prefix_encoder")


def test_lora_never_goes_inside_a_module_to_save():
    model = tt.models.build("llama-tiny")
    names = tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["q_proj", "v_proj"],
                                                   modules_to_save=["layers.1"]))
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert all(p.requires_grad for p in model.model.layers[1].parameters())
    clf = SequenceClassifier(tt.models.build("llama-tiny"), num_labels=2)
    assert "score" not in tt.lora.apply(clf, tt.lora.LoraConfig(rank=2, targets=["q_proj", "score"]))  # as PEFT


def test_a_bad_modules_to_save_value_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"LoraConfig.modules_to_save must be None or a list of module names, got "
                                         r"'score' \(str\): write \['score'\]"):
        tt.lora.LoraConfig(modules_to_save="score")
    with pytest.raises(ValueError, match=r"IA3Config.modules_to_save must be a list of strings"):
        ia3.IA3Config(modules_to_save=[""])


def test_a_mis_shaped_head_in_the_file_is_refused_and_the_model_is_unchanged(tmp_path):
    clf = SequenceClassifier(tt.models.build("llama-tiny"), num_labels=3)
    tt.lora.apply(clf, tt.lora.LoraConfig(rank=2, targets=["q_proj"]))
    tt.save_adapter(clf, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["base_model.model.score.weight"] = torch.zeros(2, 64)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "tinytune_manifest.json").unlink(missing_ok=True)  # edited on purpose: no recorded hash
    fresh = SequenceClassifier(tt.models.build("llama-tiny"), num_labels=3)
    weight, flags = fresh.score.weight.detach().clone(), {n: p.requires_grad for n, p in fresh.named_parameters()}
    with pytest.raises(ValueError, match=r"modules_to_save \['score'\] in .*adapter_model.safetensors do not fit the "
                                         r"model; mis-shaped keys: \['base_model.model.score.weight: file \(2, 64\) "
                                         r"vs model \(3, 64\)'\]"):
        tt.load_adapter(fresh, tmp_path)
    assert torch.equal(fresh.score.weight, weight) and not tt.lora.is_applied(fresh)
    assert {n: p.requires_grad for n, p in fresh.named_parameters()} == flags
    assert modules_to_save.marked(fresh) == ()


def test_a_missing_head_tensor_is_refused_naming_the_key(tmp_path):
    clf = SequenceClassifier(tt.models.build("llama-tiny"), num_labels=3)
    tt.lora.apply(clf, tt.lora.LoraConfig(rank=2, targets=["q_proj"]))
    tt.save_adapter(clf, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    del tensors["base_model.model.score.weight"]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "tinytune_manifest.json").unlink(missing_ok=True)
    fresh = SequenceClassifier(tt.models.build("llama-tiny"), num_labels=3)
    with pytest.raises(ValueError, match=r"missing keys: \['base_model.model.score.weight'\]"):
        tt.load_adapter(fresh, tmp_path)
    assert not tt.lora.is_applied(fresh)


# ------------------------------------------------------------------------------ torch.compile
def test_a_compiled_model_writes_the_same_files_and_loads_them(tmp_path):
    model = tt.models.build("llama-tiny")
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets="all-linear", modules_to_save=["norm"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    compiled = torch.compile(model, backend="eager")  # an OptimizedModule: its keys carry `_orig_mod.`
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    tt.save_adapter(compiled, tmp_path / "compiled")
    tt.save_adapter(model, tmp_path / "plain")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "compiled" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    fresh = torch.compile(tt.models.build("llama-tiny"), backend="eager")
    assert tt.load_adapter(fresh, tmp_path / "compiled") is fresh
    ids = torch.randint(4, 256, (1, 6))
    assert torch.equal(fresh._orig_mod(ids), model(ids))


# ------------------------------------------------------------------------------ PEFT and transformers
try:
    import peft
    import transformers
except ImportError:  # the tests above need neither
    peft = transformers = None
needs_peft = pytest.mark.skipif(peft is None, reason="peft / transformers not installed (pip install -e '.[dev]')")


def _hf_config(**kw):
    return transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, **kw)


def _randomise(params, std=0.2):
    with torch.no_grad():
        for p in params:
            p.normal_(std=std)


@pytest.fixture
def seq_cls(tmp_path):
    """(an HF LlamaForSequenceClassification, a function building tinytune's SequenceClassifier with the same
    weights): the body goes through an HF causal-LM checkpoint and `tt.load_pretrained` (tinytune has no
    seq-cls checkpoint loader), the head is copied."""
    torch.manual_seed(0)
    hf = transformers.LlamaForSequenceClassification(_hf_config(num_labels=3)).eval()
    causal = transformers.LlamaForCausalLM(_hf_config())
    causal.model.load_state_dict(hf.model.state_dict())
    causal.save_pretrained(tmp_path / "base")

    def ours():
        decoder, _ = tt.load_pretrained(tmp_path / "base")
        clf = SequenceClassifier(decoder, num_labels=3)
        with torch.no_grad():
            clf.score.weight.copy_(hf.score.weight)
        return clf.eval()

    return hf, ours


IDS = torch.tensor([[5, 9, 17, 33, 2, 41, 7], [12, 3, 60, 8, 21, 9, 14]])  # no pad id (0): the last token is read


@needs_peft
def test_a_peft_seq_cls_adapter_with_its_head_loads_in_tinytune(seq_cls, tmp_path):
    hf, ours = seq_cls
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    _randomise([p for n, p in peft_model.named_parameters() if "modules_to_save" in n])  # a trained head
    peft_model.save_pretrained(str(tmp_path / "peft"))
    assert _config(tmp_path / "peft")["modules_to_save"] == ["classifier", "score"]  # PEFT's task defaults
    assert "base_model.model.score.weight" in _keys(tmp_path / "peft")
    clf = ours()
    tt.load_adapter(clf, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(clf(IDS), peft_model(IDS).logits, rtol=1e-5, atol=1e-5)  # fp32, op order


@needs_peft
def test_a_tinytune_classifier_adapter_loads_in_peft(seq_cls, tmp_path):
    hf, ours = seq_cls
    clf = ours()
    tt.lora.apply(clf, tt.lora.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    _randomise([p for p in clf.parameters() if p.requires_grad])
    tt.save_adapter(clf, tmp_path / "ours")
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ours")).eval()
    assert type(peft_model).__name__ == "PeftModelForSequenceClassification"  # from our task_type
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, clf(IDS), rtol=1e-5, atol=1e-5)


@needs_peft
def test_auto_peft_model_loads_a_tinytune_adapter_of_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(_hf_config()).save_pretrained(tmp_path / "base")
    model, _ = tt.load_pretrained(tmp_path / "base")
    assert model.name_or_path == str(tmp_path / "base") and tt.models.build("llama-tiny").name_or_path is None
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets="all-linear"))
    _randomise([p for p in model.parameters() if p.requires_grad], std=0.1)
    tt.save_adapter(model, tmp_path / "adapter")
    config = _config(tmp_path / "adapter")
    assert (config["base_model_name_or_path"], config["task_type"]) == (str(tmp_path / "base"), "CAUSAL_LM")
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(auto(IDS).logits, model(IDS), rtol=1e-5, atol=1e-5)


@needs_peft
def test_a_prompt_tuned_classifier_moves_both_ways_with_its_head(seq_cls, tmp_path):
    """Prompt learning keys the head as `base_model.score.weight` (PEFT's PeftModel wraps the model itself)."""
    hf, ours = seq_cls
    clf = ours()
    tt.prompt.apply(clf.decoder, tt.prompt.PromptConfig(num_virtual_tokens=3))
    clf = SequenceClassifier(clf.decoder, num_labels=3)  # the head is built after the method (see heads.py)
    _randomise([p for p in clf.parameters() if p.requires_grad], std=0.3)
    tt.save_adapter(clf, tmp_path / "ours")
    assert _keys(tmp_path / "ours") == ["base_model.score.weight", "prompt_embeddings"]
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(IDS).logits, clf.eval()(IDS), rtol=1e-5, atol=1e-5)
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    _randomise([p for p in theirs.parameters() if p.requires_grad], std=0.3)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    decoder = ours().decoder
    tt.prompt.apply(decoder, tt.prompt.PromptConfig(num_virtual_tokens=3))  # a head's prompt sits on its decoder
    clf = SequenceClassifier(decoder, num_labels=3)
    tt.load_adapter(clf, tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(clf.eval()(IDS), theirs.eval()(IDS).logits, rtol=1e-5, atol=1e-5)
