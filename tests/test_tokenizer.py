"""Tokenizer: tiny tokenizers trained here with `tokenizers`, checked against transformers.AutoTokenizer."""
import json

import pytest
import torch
from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, processors, trainers

from tinytune.models.tokenizer import Tokenizer, load_tokenizer

try:
    from transformers import AutoTokenizer
except ImportError:  # the library itself never needs transformers; only the parity checks do
    AutoTokenizer = None
needs_hf = pytest.mark.skipif(AutoTokenizer is None, reason="transformers is not importable: no parity oracle")

CORPUS = ["Hello world, this is a tiny corpus.", "The quick brown fox jumps over the lazy dog.",
          "Fine-tuning small models is fun!", "Tokenizers split text into pieces; naïve café."] * 3
TEXTS = ["Hello world", "The lazy dog is fun!", "a", "", "pieces of text <s> and </s> inside",
         "café 😀 tiny corpus"]
BATCH = ["Hello world", "The quick brown fox jumps over the lazy dog.", "fun"]
# AddedToken form, as special_tokens_map.json writes it; tokenizer_config.json adds "__type" (see LLAMA_CONFIG)
DICT_TOKEN = {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _llama_backend():
    """A Llama-2 style tokenizer.json: <unk> <s> </s>, then the 256 byte-fallback tokens <0x00>..<0xFF>,
    a Metaspace pre-tokenizer that does not split, and a TemplateProcessing that adds <s>. transformers 5's
    LlamaTokenizer rebuilds exactly this pipeline from the vocabulary, so both classes must agree with it."""
    tok = Backend(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])[3:]
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [t for t, _ in learned]
    spec["model"].update(vocab={t: i for i, t in enumerate(pieces)}, byte_fallback=True, fuse_unk=True)
    spec["added_tokens"] = [{**a, "id": pieces.index(a["content"])} for a in spec["added_tokens"]]
    tok = Backend.from_str(json.dumps(spec))
    # Training split on "▁"; no merge crosses a word start, so the non-splitting Llama form encodes the same.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def _gpt2_backend():
    """Byte-level BPE with one special token and no BOS, as GPT-2 files do."""
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def _write(path, backend, **files):
    """A tokenizer directory: tokenizer.json plus each keyword as <name>.json."""
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    for name, data in files.items():
        (path / f"{name}.json").write_text(json.dumps(data))
    return path


LLAMA_CONFIG = {"tokenizer_class": "LlamaTokenizer", "bos_token": {"__type": "AddedToken", **DICT_TOKEN},
                "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "add_bos_token": True, "add_eos_token": False,
                "padding_side": "right", "model_max_length": 64}
GPT2_CONFIG = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "model_max_length": 32}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {
        "llama": _write(root / "llama", _llama_backend(), tokenizer_config=LLAMA_CONFIG,
                        config={"model_type": "llama"}),
        "gpt2": _write(root / "gpt2", _gpt2_backend(), tokenizer_config=GPT2_CONFIG,
                       generation_config={"bos_token_id": 0, "eos_token_id": [0, 7]}),
    }


@pytest.fixture(params=["llama", "gpt2"])
def pair(request, dirs):
    """(ours, transformers') for one directory, both given eos as pad token (neither config has one)."""
    ours, hf = Tokenizer.from_dir(dirs[request.param]), AutoTokenizer.from_pretrained(dirs[request.param])
    assert ours.pad_token_id is hf.pad_token_id is None
    ours.pad_token_id = ours.eos_token_id
    hf.pad_token = hf.eos_token
    return ours, hf


def _special_ids(tok):
    return [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id]


# ---- parity with transformers -------------------------------------------------------------------------
@needs_hf
def test_special_ids_and_size_match_transformers(pair):
    ours, hf = pair
    assert _special_ids(ours) == _special_ids(hf)
    assert ours.vocab_size == len(hf)


@needs_hf
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(pair, add_special_tokens):
    ours, hf = pair
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens) == hf.encode(text, add_special_tokens=add_special_tokens)


@needs_hf
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("truncation_side", ["left", "right"])
@pytest.mark.parametrize("kwargs", [{"padding": True}, {"padding": True, "truncation": True, "max_length": 5},
                                    {"padding": "max_length", "max_length": 40},
                                    {"padding": "max_length", "truncation": True, "max_length": 4}])
def test_batch_matches_transformers(pair, padding_side, truncation_side, kwargs):
    ours, hf = pair
    ours.truncation_side = hf.truncation_side = truncation_side
    got = ours.encode_batch(BATCH, padding_side=padding_side, **kwargs)
    want = hf(BATCH, padding_side=padding_side, return_tensors="pt", **kwargs)
    assert got["input_ids"].dtype == got["attention_mask"].dtype == torch.long
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])


@needs_hf
def test_default_padding_side_and_truncation_limit_match(pair):
    ours, hf = pair
    assert ours.padding_side == hf.padding_side == "right"
    long_text = [" ".join(CORPUS)]
    got = ours(long_text, truncation=True)["input_ids"].tolist()
    assert got == hf(long_text, truncation=True)["input_ids"] and len(got[0]) == ours.model_max_length


@needs_hf
@pytest.mark.parametrize("skip", [False, True])
def test_decode_matches_transformers(pair, skip):
    ours, hf = pair
    batch = ours.encode_batch(BATCH, padding_side="left")["input_ids"]
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert ours.decode(torch.tensor(ids, dtype=torch.long), skip) == ours.decode(ids, skip)
    assert ours.batch_decode(batch, skip) == hf.batch_decode(batch, skip_special_tokens=skip)


@needs_hf
def test_call_on_one_string_matches_transformers(pair):
    ours, hf = pair
    assert ours("Hello world", return_tensors=None) == dict(hf("Hello world", return_token_type_ids=False))
    assert ours("Hello world")["input_ids"].shape == (1, len(ours.encode("Hello world")))


@needs_hf
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_save_round_trips_through_auto_tokenizer(dirs, tmp_path, name):
    ours = Tokenizer.from_dir(dirs[name])
    ours.pad_token_id, ours.padding_side = ours.eos_token_id, "left"
    ours.save(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": name}))  # as save_pretrained leaves it
    hf, again = AutoTokenizer.from_pretrained(tmp_path), Tokenizer.from_dir(tmp_path)
    assert _special_ids(hf) == _special_ids(again) == _special_ids(ours)
    assert hf.padding_side == again.padding_side == "left"
    for text in TEXTS:
        assert hf.encode(text) == again.encode(text) == ours.encode(text)
    want = hf(BATCH, padding=True, return_tensors="pt")
    for tok in (ours, again):
        got = tok.encode_batch(BATCH)
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["attention_mask"], want["attention_mask"])


@needs_hf
@pytest.mark.parametrize("with_decoder", [False, True])
def test_special_tokens_map_precedence_matches_transformers(tmp_path, with_decoder):
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": "<unk>"}
    if with_decoder:  # files from transformers >= 4.34: special_tokens_map.json is then ignored
        config["added_tokens_decoder"] = {"0": {"content": "<unk>", "special": True}}
    stm = {"eos_token": "<s>", "pad_token": {**DICT_TOKEN, "content": "</s>"}}
    path = _write(tmp_path, _llama_backend(), tokenizer_config=config, special_tokens_map=stm)
    ours, hf = Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)
    assert _special_ids(ours) == _special_ids(hf)
    assert (ours.eos_token_id, ours.pad_token_id) == ((2, 0) if with_decoder else (1, 2))


# ---- behaviour of our own ----------------------------------------------------------------------------
def test_llama_adds_bos_once_and_gpt2_adds_none(dirs):
    llama, gpt2 = Tokenizer.from_dir(dirs["llama"]), Tokenizer.from_dir(dirs["gpt2"])
    ids = llama.encode("Hello world")
    assert ids[0] == llama.bos_token_id == 1 and ids.count(1) == 1
    assert llama.encode("Hello world", add_special_tokens=False) == ids[1:]
    assert (llama.adds_bos_token, llama.adds_eos_token) == (True, False)
    assert gpt2.bos_token_id == 0 and gpt2.encode("Hello world")[0] != 0
    assert (gpt2.adds_bos_token, gpt2.adds_eos_token) == (False, False)


def test_generation_config_fills_ids_and_lists_every_eos(dirs, tmp_path):
    assert Tokenizer.from_dir(dirs["gpt2"]).eos_token_ids == [0, 7]
    path = _write(tmp_path, _llama_backend(), generation_config={"bos_token_id": 1, "eos_token_id": [2, 5]},
                  config={"pad_token_id": -1, "eos_token_id": 2})
    with pytest.warns(UserWarning, match=r"ignoring pad_token_id \[-1\] in config.json"):
        tok = Tokenizer.from_dir(path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.eos_token_ids) == (1, 2, None, [2, 5])


def test_token_missing_from_vocab_is_ignored_with_warning(tmp_path):
    path = _write(tmp_path, _llama_backend(), tokenizer_config={"eos_token": "</s>", "pad_token": "<pad>"})
    with pytest.warns(UserWarning, match=r"pad_token '<pad>' from .*tokenizer_config.json is not in the vocab"):
        tok = Tokenizer.from_dir(path)
    assert tok.pad_token_id is None and tok.eos_token_id == 2


def test_flag_that_disagrees_with_post_processor_warns(tmp_path):
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False}
    path = _write(tmp_path, _llama_backend(), tokenizer_config=config)
    with pytest.warns(UserWarning, match="add_bos_token=False, but the post-processor"):
        tok = Tokenizer.from_dir(path)
    assert tok.encode("a")[0] == 1


def test_load_tokenizer_returns_none_without_tokenizer_json(tmp_path, dirs):
    assert load_tokenizer(tmp_path) is None
    assert isinstance(load_tokenizer(dirs["llama"]), Tokenizer)


def test_lists_without_padding_and_max_length_padding(dirs):
    tok = Tokenizer.from_dir(dirs["llama"])
    out = tok.encode_batch(BATCH, padding=False, return_tensors=None)
    assert out["input_ids"] == [tok.encode(t) for t in BATCH]
    assert out["attention_mask"] == [[1] * len(tok.encode(t)) for t in BATCH]
    tok.pad_token_id = 0
    assert tok.encode_batch(["a"], padding="max_length", max_length=6)["attention_mask"].sum() == len(tok.encode("a"))


# ---- errors --------------------------------------------------------------------------------------------
def test_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found: .*nowhere"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="file.txt"):
        Tokenizer.from_dir(tmp_path / "file.txt")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json in .*found tokenizer.model"):
        Tokenizer.from_dir(tmp_path)


def test_unreadable_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"could not read .*tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    _write(tmp_path, _llama_backend())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"could not read .*tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": 2}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json 'eos_token' should be a string .* got 2"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_length": 0}, r"max_length must be an int >= 1, got 0"),
    ({"padding": "max_length"}, "padding='max_length' needs max_length"),
    ({"padding": "longest_first"}, r"padding must be one of .* got 'longest_first'"),
    ({"padding_side": "top"}, "padding_side must be 'left' or 'right', got 'top'"),
    ({"return_tensors": "np"}, "return_tensors must be 'pt' or None, got 'np'"),
    ({"padding": False}, r"rows have lengths \[.*\]: return_tensors='pt' needs padding=True"),
    ({"padding": "max_length", "max_length": 3}, r"texts\[0\] has \d+ tokens, more than max_length=3; pass truncation"),
    ({"truncation": True, "max_length": 1}, "max_length=1 leaves no room for text next to the 1 special"),
])
def test_batch_argument_errors(dirs, kwargs, match):
    tok = Tokenizer.from_dir(dirs["llama"])
    tok.pad_token_id = tok.eos_token_id
    with pytest.raises(ValueError, match=match):
        tok.encode_batch(BATCH, **kwargs)


def test_padding_without_pad_token_suggests_eos(dirs):
    tok = Tokenizer.from_dir(dirs["gpt2"])
    with pytest.raises(ValueError, match=r"pad_token_id is None.*tokenizer.pad_token_id = tokenizer.eos_token_id"):
        tok.encode_batch(BATCH)
    assert tok.encode_batch(["one text needs no pad"])["input_ids"].shape[0] == 1


def test_other_errors(dirs):
    tok = Tokenizer.from_dir(dirs["llama"])
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got int"):
        tok.encode_batch(["a", 3])
    with pytest.raises(TypeError, match="encode expects a str, got list"):
        tok.encode(["a"])
    with pytest.raises(ValueError, match=r"decode got ids outside \[0, \d+\): \[-100\]"):
        tok.decode([1, -100])
    with pytest.raises(ValueError, match=r"decode expects a 1-D tensor, got shape \(1, 2\); use batch_decode"):
        tok.decode(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=r"pad_token_id must be None or an int in \[0, \d+\), got 10000"):
        tok.pad_token_id = 10_000
    tok.model_max_length = None
    with pytest.raises(ValueError, match="truncation=True needs max_length"):
        tok.encode_batch(BATCH, truncation=True)
    with pytest.raises(ValueError, match="truncation_side must be 'left' or 'right', got 'middle'"):
        Tokenizer(tok.backend, truncation_side="middle")
