"""Trust: transactional saves, verified loads, resume that validates before it touches anything.

The kill-at-random-instants, full-disk and malicious-pickle tests live in test_fault_injection.py;
this file checks each guarantee of docs/reliability.md directly, one behaviour per test.
"""
import io
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import tinytune as tt
from tinytune import _manifest, _transaction
from tinytune.peft.lora import multi as lora_multi
from tinytune._manifest import IntegrityError, verify
from tinytune._transaction import directory_transaction
from tinytune.train import TrainConfig, fit
from tinytune.train import checkpoint as ckpt

QUIET = io.StringIO


def _model(targets="all-linear", seed=1):
    model = tt.models.build("llama-tiny")
    torch.manual_seed(seed)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets=targets))
    return model


def _data(n=16):
    return [{"input_ids": [(i + k) % 16 for k in range(8)], "labels": [(i + k) % 16 for k in range(8)]}
            for i in range(n)]


def _cfg(out, **kw):
    return TrainConfig(**{**dict(lr=1e-2, steps=4, batch_size=4, log_every=1000, out_dir=out), **kw})


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------ transactions


def test_a_save_keeps_what_it_does_not_own_and_drops_what_it_supersedes(tmp_path):
    out = tmp_path / "adapter"
    tt.save_adapter(_model(), out)
    (out / "README.md").write_text("my notes")
    (out / "extra").mkdir()
    (out / "extra" / "plot.png").write_bytes(b"png")
    (out / "adapter_model.bin").write_bytes(b"an older pickled save")  # superseded by the new weights
    tt.save_adapter(_model(seed=2), out)
    assert (out / "README.md").read_text() == "my notes" and (out / "extra" / "plot.png").read_bytes() == b"png"
    assert not (out / "adapter_model.bin").exists()
    assert set(verify(out, "test")) == {"adapter_config.json", "adapter_model.safetensors"}


def test_save_pretrained_swaps_shard_sets_whole_and_keeps_tokenizer_files(tmp_path):
    model = tt.models.build("llama-tiny")
    tt.save_pretrained(model, tmp_path / "m", max_shard_size=20_000)
    shards = sorted(p.name for p in (tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 2
    (tmp_path / "m" / "tokenizer.json").write_text("{}")  # the user's, not written by this save
    tt.save_pretrained(model, tmp_path / "m")  # one file now: no stale shard may remain
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tinytune_manifest.json",
                     "tokenizer.json"]
    loaded = tt.models.load_model(tmp_path / "m")
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_a_failed_save_leaves_the_old_one_and_no_leftovers(tmp_path):
    out = tmp_path / "a"
    tt.save_adapter(_model(), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError, match="boom"):
        with directory_transaction(out, what="test") as staging:
            (staging / "adapter_model.safetensors").write_bytes(b"half")
            raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_without_an_atomic_exchange_the_two_renames_still_give_a_whole_save(tmp_path, monkeypatch):
    monkeypatch.setattr(_transaction, "_exchange", lambda a, b: False)
    out = tmp_path / "a"
    tt.save_adapter(_model(), out)
    tt.save_adapter(_model(seed=2), out)
    tt.load_adapter(tt.models.build("llama-tiny"), out)
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_a_save_killed_between_two_renames_is_recovered_by_the_next_save(tmp_path):
    out = tmp_path / "a"
    tt.save_adapter(_model(), out)
    dead_pid = 2 ** 22 + 12345  # above pid_max: no such process
    leftover = tmp_path / f".a.tt-old-{dead_pid}-0000beef"
    os.rename(out, leftover)  # the instant between the renames: only the hidden complete copy exists
    with pytest.raises(FileNotFoundError, match=r"interrupted save left a complete copy in .*\.a\.tt-old"):
        tt.load_adapter(tt.models.build("llama-tiny"), out)
    _transaction.remove_leftovers(out)  # what every save of `out` does first
    assert out.is_dir() and not leftover.exists()
    tt.load_adapter(tt.models.build("llama-tiny"), out)


def test_leftovers_of_a_running_save_are_not_touched(tmp_path):
    busy = tmp_path / f".a.tt-new-{os.getppid()}-0000abcd"  # a live process (our parent) owns it
    busy.mkdir()
    tt.save_adapter(_model(), tmp_path / "a")
    assert busy.exists()


def test_saving_over_the_current_directory_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="is the current directory or holds it"):
        tt.save_adapter(_model(), ".")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        (tmp_path / "f").write_text("x")
        tt.save_adapter(_model(), tmp_path / "f")


# ------------------------------------------------------------------------------------------ integrity


def test_new_weights_beside_an_old_config_are_refused(tmp_path):
    tt.save_adapter(_model(), tmp_path / "old")
    tt.save_adapter(_model(seed=2), tmp_path / "new")  # same shapes, other weights: only the hash tells
    os.replace(tmp_path / "new" / "adapter_model.safetensors", tmp_path / "old" / "adapter_model.safetensors")
    with pytest.raises(IntegrityError, match=r"adapter_model.safetensors does not match its SHA-256"):
        tt.load_adapter(tt.models.build("llama-tiny"), tmp_path / "old")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_file_is_named(tmp_path, damage):
    tt.save_adapter(_model(), tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    data = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        file.unlink()
    expected = FileNotFoundError if damage == "delete" else IntegrityError
    with pytest.raises(expected, match="adapter_model.safetensors"):
        tt.load_adapter(tt.models.build("llama-tiny"), tmp_path)


def test_a_damaged_manifest_is_refused(tmp_path):
    tt.save_adapter(_model(), tmp_path)
    manifest = tmp_path / "tinytune_manifest.json"
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(IntegrityError, match=r"tinytune_manifest.json is not valid JSON.*manifest is damaged"):
        tt.load_adapter(tt.models.build("llama-tiny"), tmp_path)
    manifest.write_text(json.dumps({"format": "tinytune-save", "version": 1,
                                    "files": {"../../etc/passwd": {"size": 1, "sha256": "0"}}}))
    with pytest.raises(ValueError, match=r"'\.\./\.\./etc/passwd' leaves"):
        tt.load_adapter(tt.models.build("llama-tiny"), tmp_path)


def test_a_huge_rank_is_refused_before_any_allocation(tmp_path):
    tt.save_adapter(_model(), tmp_path)
    (tmp_path / "tinytune_manifest.json").unlink()  # a hand-edited file, past the integrity check
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(config, r=10**9)))
    fresh = tt.models.build("llama-tiny")
    with pytest.raises(ValueError, match=r"has shape \(\d+, \d+\), but .*adapter_config.json says r=1000000000"):
        tt.load_adapter(fresh, tmp_path)
    assert not tt.lora.list_adapters(fresh)


def test_infinite_alpha_is_refused(tmp_path):
    tt.save_adapter(_model(), tmp_path)
    (tmp_path / "tinytune_manifest.json").unlink()
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(config, lora_alpha=float("inf"))))  # Infinity
    with pytest.raises(ValueError, match=r"adapter_config.json.*'lora_alpha'.*finite"):
        tt.load_adapter(tt.models.build("llama-tiny"), tmp_path)


def test_loading_into_a_model_with_other_lora_hyperparameters_is_refused(tmp_path):
    tt.save_adapter(_model(), tmp_path)
    target = tt.models.build("llama-tiny")
    tt.lora.apply(target, tt.lora.LoraConfig(rank=4, alpha=16, targets="all-linear"))
    before = _snapshot(target)
    with pytest.raises(ValueError, match=r"alpha=16.0, but .* has lora_alpha=8.0"):
        tt.load_adapter(target, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    tt.load_adapter(target, tmp_path, adapter_name="second")  # beside it, under its own alpha: fine
    assert lora_multi.adapter_spec(target, "second").alpha == 8.0


def test_shard_index_entries_stay_inside_the_directory(tmp_path):
    tt.save_pretrained(tt.models.build("llama-tiny"), tmp_path / "m", max_shard_size=50_000)
    index_file = tmp_path / "m" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    (tmp_path / "m" / "tinytune_manifest.json").unlink()
    first = next(iter(index["weight_map"]))
    for bad in ("../outside.safetensors", str(tmp_path / "abs.safetensors")):
        index["weight_map"][first] = bad
        index_file.write_text(json.dumps(index))
        with pytest.raises(ValueError, match="leaves|absolute path"):
            tt.load_pretrained(tmp_path / "m")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    os.symlink(tmp_path / "outside.safetensors", tmp_path / "m" / "link.safetensors")
    index["weight_map"][first] = "link.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="'link.safetensors' resolves to .*outside"):
        tt.load_pretrained(tmp_path / "m")


def test_hub_cache_snapshots_may_link_into_their_blobs(tmp_path):
    repo = tmp_path / "models--org--tiny"
    tt.save_pretrained(tt.models.build("llama-tiny"), tmp_path / "plain")
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for file in (tmp_path / "plain").iterdir():
        if file.name == "tinytune_manifest.json":
            continue
        blob = repo / "blobs" / f"blob-{file.name}"
        os.replace(file, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    tt.load_pretrained(snapshot)


# ------------------------------------------------------------------------------------------ resume


def _trained_run(tmp_path, **kw):
    model = _model()
    fit(model, _data(), _cfg(tmp_path, save_every=1, **kw), stream=QUIET())
    return model


@pytest.mark.parametrize("problem", ["data size", "head shape", "other targets", "seed", "optimizer moments",
                                     "manifest step"])
def test_a_refused_resume_changes_nothing(tmp_path, problem):
    _trained_run(tmp_path)
    model, data = _model(), _data()
    if problem == "data size":
        data = _data(12)
    elif problem == "other targets":
        model = _model(targets=["q_proj", "v_proj"])
    elif problem == "head shape":  # a trainable tensor of another size (as a head with other num_labels)
        module = model.get_submodule("model.layers.1.mlp.down_proj")
        module._parameters["lora_B"] = torch.nn.Parameter(torch.zeros(63, 4))
    latest = tmp_path / "checkpoints" / "step-0000004"
    if problem == "optimizer moments":  # consistent bytes (manifest rewritten), wrong content
        tensors = load_file(str(latest / "state.safetensors"))
        key = next(k for k in tensors if k.endswith("exp_avg"))
        tensors[key] = torch.zeros(3)
        save_file(tensors, str(latest / "state.safetensors"))
    if problem == "manifest step":
        manifest = json.loads((latest / "manifest.json").read_text())
        (latest / "manifest.json").write_text(json.dumps(dict(manifest, step=3)))
    if problem in ("optimizer moments", "manifest step"):
        _manifest.write_manifest(latest, ["manifest.json", "state.json", "state.safetensors",
                                             "trainable.safetensors"])
    cfg = _cfg(tmp_path, resume=True, steps=6, seed=1 if problem == "seed" else 0)
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    before = _snapshot(model)
    with pytest.raises(ValueError, match={"data size": "trained on 16 examples, train_data has 12",
                                          "other targets": r"unexpected \[.*mlp",
                                          "head shape": r"'model.layers.1.mlp.down_proj.lora_B' has shape \(64, 4\), the model's has \(63, 4\)", "seed": "seed=0, this run has seed=1",
                                          "optimizer moments": r"exp_avg of parameter \d+ has shape \(3,\)",
                                          "manifest step": "disagrees with the manifest's 3"}[problem]):
        fit(model, data, cfg, stream=QUIET())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # bit-identical
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files


def test_resume_falls_back_from_a_damaged_latest_checkpoint(tmp_path):
    _trained_run(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-0000002", "step-0000003", "step-0000004"]  # keep_checkpoints=3
    state = tmp_path / "checkpoints" / "step-0000004" / "state.json"
    state.write_bytes(state.read_bytes()[:-10])
    with pytest.warns(RuntimeWarning, match=r"skipped 1 damaged checkpoint.*step-0000003.*step-0000004: .*state.json"):
        history = fit(_model(), _data(), _cfg(tmp_path, resume=True, steps=5), stream=QUIET())
    assert history.step == 5 and len(history.losses) == 5
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]  # each step once: step 4 was redone, not repeated


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    _trained_run(tmp_path, keep_checkpoints=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000004"]
    weights = tmp_path / "checkpoints" / "step-0000004" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(IntegrityError, match="every checkpoint under .* is damaged"):
        fit(_model(), _data(), _cfg(tmp_path, resume=True), stream=QUIET())
    with pytest.raises(IntegrityError, match="trainable.safetensors has 100 bytes"):
        ckpt.find_checkpoint(tmp_path / "checkpoints" / "step-0000004")  # named explicitly: no fallback


def test_old_format_checkpoints_are_refused_by_name(tmp_path):
    step = tmp_path / "checkpoints" / "step-0000002"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text(json.dumps({"format_version": 1, "step": 2, "files": []}))
    with pytest.raises(IntegrityError, match="format_version=1.*no longer read"):
        ckpt.find_checkpoint(tmp_path)


def test_a_fresh_run_never_overwrites_another_runs_checkpoints(tmp_path):
    _trained_run(tmp_path)
    files = {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"already holds checkpoints of a run \(step-0000004, ...\).*resume=True"):
        fit(_model(), _data(), _cfg(tmp_path), stream=QUIET())
    assert {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()} == files


def test_a_checkpoint_file_linking_outside_is_refused(tmp_path):
    _trained_run(tmp_path / "run")
    latest = tmp_path / "run" / "checkpoints" / "step-0000004"
    os.replace(latest / "state.json", tmp_path / "state.json")
    os.symlink(tmp_path / "state.json", latest / "state.json")  # same bytes: only containment can refuse
    with pytest.raises(ValueError, match=r"'state.json' resolves to .* outside"):
        ckpt.read_checkpoint(latest, _model(), torch.optim.AdamW(_model().parameters()))


def test_files_above_the_hash_limit_are_checked_by_size_and_header(tmp_path, monkeypatch):
    monkeypatch.setattr(_manifest, "FULL_HASH_MAX_BYTES", 1000)  # stands in for a multi-GB shard
    tt.save_adapter(_model(), tmp_path)
    entry = json.loads((tmp_path / "tinytune_manifest.json").read_text())["files"]["adapter_model.safetensors"]
    assert entry["size"] > 1000 and "sha256" not in entry and "header_sha256" in entry
    file = tmp_path / "adapter_model.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 1  # in the tensor data: not seen above the limit (documented), the load goes on
    file.write_bytes(bytes(data))
    tt.load_adapter(tt.models.build("llama-tiny"), tmp_path)
    data[20] ^= 1  # in the header (names, shapes, offsets): caught
    file.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="adapter_model.safetensors does not match"):
        tt.load_adapter(tt.models.build("llama-tiny"), tmp_path)


def test_a_checkpoint_without_its_integrity_manifest_is_skipped(tmp_path):
    _trained_run(tmp_path)
    (tmp_path / "checkpoints" / "step-0000004" / "tinytune_manifest.json").unlink()
    with pytest.warns(RuntimeWarning, match=r"step-0000004: .*has no tinytune_manifest.json"):
        assert ckpt.find_checkpoint(tmp_path).name == "step-0000003"


# ------------------------------------------------------------------------------------------ review findings


def test_saves_of_other_kinds_into_one_directory_keep_each_other(tmp_path):
    tok = __import__("tinytune.cli.demo_data", fromlist=["char_tokenizer"]).char_tokenizer()
    model = tt.models.build("llama-tiny")
    tt.save_pretrained(model, tmp_path / "m")
    tok.save(tmp_path / "m")  # the usual HF sequence: the model, then its tokenizer beside it
    tt.save_adapter(_model(), tmp_path / "m")  # and even an adapter
    listed = set(verify(tmp_path / "m", "test"))  # the model's entries were carried over, still checked
    assert {"config.json", "model.safetensors", "tokenizer.json", "adapter_model.safetensors"} <= listed
    loaded, tokenizer = tt.load_pretrained(tmp_path / "m")
    assert tokenizer is not None and tt.lora.list_adapters(tt.load_adapter(tt.models.build("llama-tiny"),
                                                                          tmp_path / "m"))


def test_files_that_only_look_like_a_saves_own_are_kept(tmp_path):
    tt.save_pretrained(tt.models.build("llama-tiny"), tmp_path / "m")
    for name in ("model_ema.safetensors", "model-merged-fp16.safetensors", "adapter_model.safetensors.bak"):
        (tmp_path / "m" / name).write_bytes(b"mine")
    tt.save_pretrained(tt.models.build("llama-tiny"), tmp_path / "m")
    tt.save_adapter(_model(), tmp_path / "m")
    for name in ("model_ema.safetensors", "model-merged-fp16.safetensors", "adapter_model.safetensors.bak"):
        assert (tmp_path / "m" / name).read_bytes() == b"mine", name


def test_a_symlinked_save_path_stays_a_link(tmp_path):
    (tmp_path / "run3").mkdir()
    os.symlink(tmp_path / "run3", tmp_path / "latest")
    tt.save_adapter(_model(), tmp_path / "latest")
    tt.save_adapter(_model(seed=2), tmp_path / "latest")
    assert (tmp_path / "latest").is_symlink() and (tmp_path / "run3" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "run3"]


def test_cleanup_touches_only_its_own_staging_names(tmp_path):
    mine = tmp_path / ".ad.tt-notes"  # a user's hidden folder that merely starts like a leftover
    mine.mkdir()
    other = tmp_path / f".x.tt-y.tt-new-{os.getppid()}-0000abcd"  # a live save of the path "x.tt-y"
    other.mkdir()
    tt.save_adapter(_model(), tmp_path / "ad")
    tt.save_adapter(_model(), tmp_path / "x")
    assert mine.is_dir() and other.is_dir()


def test_a_load_never_mixes_two_saves_that_race_it(tmp_path, monkeypatch):
    tt.save_adapter(_model(), tmp_path / "a")
    real, calls = _manifest._manifest_bytes, []

    def racing(directory):  # another process swaps a new save in while the first read is under way
        calls.append(1)
        if len(calls) == 2:
            tt.save_adapter(_model(seed=2), tmp_path / "a")
        return real(directory)

    monkeypatch.setattr(_manifest, "_manifest_bytes", racing)
    loaded = tt.load_adapter(tt.models.build("llama-tiny"), tmp_path / "a")
    assert len(calls) == 4  # read once, saw the manifest change, read again
    expected = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert all(torch.equal(expected[f"base_model.model.{k}" if not k.startswith("base_model") else k], v)
               for k, v in tt.lora.state_dict(loaded).items())


def test_damaged_step_directories_block_a_fresh_start_and_are_never_pruned_by_one(tmp_path):
    _trained_run(tmp_path)
    for step in (tmp_path / "checkpoints").iterdir():
        (step / "manifest.json").unlink()
    with pytest.raises(IntegrityError, match="every checkpoint under .* is damaged"):
        fit(_model(), _data(), _cfg(tmp_path, resume=True), stream=QUIET())
    with pytest.raises(ValueError, match="already holds checkpoints"):
        fit(_model(), _data(), _cfg(tmp_path), stream=QUIET())
    assert len(list((tmp_path / "checkpoints").iterdir())) == 3


def test_a_resume_whose_random_state_cannot_be_restored_changes_nothing(tmp_path):
    _trained_run(tmp_path)
    latest = tmp_path / "checkpoints" / "step-0000004"
    structure = json.loads((latest / "state.json").read_text())
    structure["loop"]["rng"]["python"] = [3, [1, 2, 3], None]  # another Python's state vector
    structure["loop"]["rng_per_rank"] = [structure["loop"]["rng"]]
    (latest / "state.json").write_text(json.dumps(structure))
    _manifest.write_manifest(latest, ["manifest.json", "state.json", "state.safetensors", "trainable.safetensors"])
    model = _model()
    before, files = _snapshot(model), {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="random-number state .* cannot be restored here"):
        fit(model, _data(), _cfg(tmp_path, resume=True, steps=6), stream=QUIET())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files


def test_state_keys_holding_slashes_keep_their_own_tensors():
    from tinytune.train import state_codec
    state = {"x/y": torch.zeros(2), "x": {"y": torch.ones(2)}, "k": {0: torch.full((1,), 3.0)}, "k/0": torch.ones(1)}
    structure, tensors = state_codec.encode(state)
    back = state_codec.decode(json.loads(json.dumps(structure)), tensors, "test")
    assert torch.equal(back["x/y"], state["x/y"]) and torch.equal(back["x"]["y"], state["x"]["y"])
    assert torch.equal(back["k"][0], state["k"][0]) and torch.equal(back["k/0"], state["k/0"])
