"""The model card save_adapter writes (README.md): front matter, method and hyperparameters, counts,
card_info, the user's own README kept, the manifest leaving it out, loading ignoring it."""
import json
import re

import pytest
import torch

import tinytune as tt
from tinytune._manifest import MANIFEST, verify
from tinytune.peft import model_card
from tinytune.peft.methods import by_peft_type

BASE = "org/llama-tiny"


def _lora():
    model = tt.models.build("llama-tiny")
    torch.manual_seed(0)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets=["q_proj", "v_proj"]))
    return model


def _ia3():
    model = tt.models.build("llama-tiny")
    tt.ia3.apply(model, tt.ia3.IA3Config())
    return model


def _prompt():
    model = tt.models.build("llama-tiny")
    torch.manual_seed(0)
    tt.prompt.apply(model, tt.prompt.PromptConfig(num_virtual_tokens=4))
    return model


BUILDERS = {"LORA": _lora, "IA3": _ia3, "PROMPT_TUNING": _prompt}


def _trained(kind):
    model = BUILDERS[kind]()
    model.name_or_path = BASE
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # as if trained: a round trip of the init proves little
    return model


def _front_matter(text):
    """The front matter as {key: str or list[str]}: `key: value` and `key:` followed by `- item` lines
    (the subset of YAML the card uses; double-quoted scalars are JSON strings)."""
    match = re.match(r"---\n(.*?)\n---\n", text, flags=re.S)
    assert match, "the card must open with YAML front matter"
    out, key = {}, None
    for line in match.group(1).splitlines():
        unquote = lambda v: json.loads(v) if v.startswith('"') else v  # noqa: E731
        if line.startswith("- "):
            out[key].append(unquote(line[2:]))
        else:
            key, _, value = line.partition(": ")
            key = key.rstrip(":")
            out[key] = unquote(value) if value else []
    return out


def _card(path):
    return (path / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_card_names_base_method_task_and_trainable_count(tmp_path, kind):
    model = _trained(kind)
    tt.save_adapter(model, tmp_path / "a")
    text = _card(tmp_path / "a")
    meta = _front_matter(text)
    assert meta["base_model"] == BASE
    assert meta["library_name"] == "peft"  # these three load with PEFT as they are
    assert "tinytune" in meta["tags"] and f"base_model:adapter:{BASE}" in meta["tags"]
    assert kind.lower().replace("_", "-") in meta["tags"]
    assert meta["pipeline_tag"] == "text-generation"
    assert f"`{kind}`" in text and "`CAUSAL_LM`" in text
    count = tt.count_parameters(model)
    assert f"**Trainable parameters:** {count.trainable:,} " in text and f"of {count.total:,})" in text
    try:
        import yaml
    except ImportError:
        return
    assert yaml.safe_load(text.split("---\n")[1]) == meta  # our small parser agrees with a real one


def test_lora_card_lists_rank_alpha_and_targets(tmp_path):
    tt.save_adapter(_trained("LORA"), tmp_path / "a")
    text = _card(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert "| r | `4` |" in text and "| lora_alpha | `8.0` |" in text
    assert f"| target_modules | `{json.dumps(config['target_modules'])}` |" in text
    assert "model.layers.1.self_attn.v_proj" in text


def test_card_info_datasets_metrics_training_and_description_appear(tmp_path):
    info = {"datasets": ["tatsu-lab/alpaca", "my data.jsonl"], "metrics": {"eval_loss": 1.2345678901, "acc": 1},
            "training": {"lr": 0.0002, "steps": 10, "schedule": "cosine"}, "description": "Answers politely."}
    tt.save_adapter(_trained("LORA"), tmp_path / "a", card_info=info)
    text = _card(tmp_path / "a")
    assert _front_matter(text)["datasets"] == info["datasets"]
    assert "- `tatsu-lab/alpaca`" in text and "- `my data.jsonl`" in text
    assert "| eval_loss | 1.2345678901 |" in text and "| acc | 1 |" in text  # exact, not rounded
    assert "| lr | `0.0002` |" in text and '| schedule | `"cosine"` |' in text
    assert "Answers politely." in text
    plain = tmp_path / "b"
    tt.save_adapter(_trained("LORA"), plain)
    assert "datasets" not in _front_matter(_card(plain)) and "## Evaluation" not in _card(plain)
    assert "Not recorded." in _card(plain)


@pytest.mark.parametrize("info, match", [
    ({"dataset": ["x"]}, r"unknown key 'dataset'.*'datasets', 'metrics', 'training', 'description'"),
    ({"metrics": {"loss": "low"}}, r"card_info\['metrics'\]\['loss'\] = 'low'"),
    ({"datasets": "alpaca"}, r"card_info\['datasets'\] must be a list"),
    ({"training": {"lr": object}}, r"card_info\['training'\]\['lr'\]"),
    ({"description": 3}, r"card_info\['description'\] must be a str"),
    (["datasets"], r"card_info must be a dict"),
])
def test_bad_card_info_is_refused_before_anything_is_written(tmp_path, info, match):
    with pytest.raises(ValueError, match=match):
        tt.save_adapter(_trained("LORA"), tmp_path / "new" / "a", card_info=info)
    assert not (tmp_path / "new").exists()  # not even the parent directory
    tt.save_adapter(_trained("LORA"), tmp_path / "old")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    with pytest.raises(ValueError, match=match):
        tt.save_adapter(_trained("IA3"), tmp_path / "old", card_info=info)
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before


def test_a_users_readme_is_kept_and_tinytunes_own_is_rewritten(tmp_path):
    out = tmp_path / "a"
    out.mkdir()
    (out / "README.md").write_text("# My adapter\nhand-written\n")
    tt.save_adapter(_trained("LORA"), out, card_info={"datasets": ["d"]})
    assert _card(out) == "# My adapter\nhand-written\n"
    assert (out / "adapter_config.json").is_file()

    own = tmp_path / "own"
    tt.save_adapter(_trained("LORA"), own)
    assert model_card.is_tinytune_card(_card(own))
    tt.save_adapter(_trained("IA3"), own, card_info={"datasets": ["d"]})  # an unedited card of ours: replaced
    assert "`IA3`" in _card(own) and "- `d`" in _card(own)

    edited = _card(own).replace("## Model details", "My notes.\n\n## Model details")  # marker kept, text edited
    (own / "README.md").write_text(edited)
    assert not model_card.is_tinytune_card(edited)
    tt.save_adapter(_trained("LORA"), own)
    assert _card(own) == edited and json.loads((own / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_the_card_is_part_of_the_transaction_and_outside_the_manifest(tmp_path, monkeypatch):
    out = tmp_path / "a"
    tt.save_adapter(_trained("LORA"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {"README.md", "adapter_config.json", "adapter_model.safetensors", MANIFEST}
    assert set(verify(out, "test")) == {"adapter_config.json", "adapter_model.safetensors"}  # deliberately

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_card, "render", explode)  # the card fails after the adapter files are staged
    with pytest.raises(OSError, match="disk full"):
        tt.save_adapter(_trained("IA3"), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old save, whole: no mix
    monkeypatch.undo()
    (out / "README.md").write_text("edited by hand")
    assert set(verify(out, "test")) == {"adapter_config.json", "adapter_model.safetensors"}  # no false alarm


def test_two_saves_write_the_same_card(tmp_path):
    for name in ("a", "b"):
        tt.save_adapter(_trained("LORA"), tmp_path / name, card_info={"metrics": {"loss": 0.5}})
    assert _card(tmp_path / "a") == _card(tmp_path / "b")  # no dates: reruns compare equal


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_load_adapter_ignores_the_card_and_round_trips_bitwise(tmp_path, kind):
    model = _trained(kind)
    tt.save_adapter(model, tmp_path / "a", card_info={"description": "x"})
    (tmp_path / "a" / "README.md").write_text("---\nnot: [valid yaml\n---\nanything")  # never read on load
    method = by_peft_type(kind)
    fresh = tt.load_adapter(tt.models.build("llama-tiny"), tmp_path / "a")
    ours, theirs = method.state_dict(model), method.state_dict(fresh)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key  # bitwise (tolerance 0)


def test_a_card_without_base_model_says_so_and_tinytune_only_types_name_tinytune(tmp_path):
    model = tt.models.build("llama-tiny")
    tt.adapter.apply(model, tt.adapter.AdapterConfig(bottleneck=4, placement="pfeiffer"))
    tt.save_adapter(model, tmp_path / "a")
    text = _card(tmp_path / "a")
    meta = _front_matter(text)
    assert "base_model" not in meta and meta["library_name"] == "tinytune"  # PEFT cannot load this type
    assert "**Base model:** not recorded" in text and "`BOTTLENECK_ADAPTER`" in text
    assert f"**Trainable parameters:** {tt.count_parameters(model).trainable:,} " in text
