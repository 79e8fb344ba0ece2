"""Bad input at the library's boundaries: model forward, generate, tokenizer files, JSONL data files.

Each check has a refused case (the message names the offending value) and an accepted case next to it,
so that a test fails both when the check is missing and when it refuses good input.
"""
import json
import os
import re
import warnings

import pytest
import torch

import tinytune as tt
import tinytune.data as data
from tinytune.cli.demo_data import char_tokenizer
from tinytune.data import records
from tinytune.models import SequenceClassifier, TokenClassifier, Tokenizer


@pytest.fixture(scope="module")
def llama():
    return tt.models.build("llama-tiny")


@pytest.fixture(scope="module")
def gpt2():
    return tt.models.build("gpt2-tiny")


def _ids(*shape, high=256):
    return torch.randint(0, high, shape)


# ---- model forward --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
def test_forward_refuses_non_integer_ids_naming_the_dtype(llama, dtype):
    with pytest.raises(ValueError, match=rf"input_ids must be an integer tensor .* got dtype {dtype}"):
        llama(torch.ones(1, 4, dtype=dtype))
    with pytest.raises(TypeError, match="input_ids must be a tensor of token ids, got list"):
        llama([[1, 2, 3]])
    assert llama(torch.ones(1, 4, dtype=torch.int32)).shape == (1, 4, 256)  # int32 ids are fine


def test_forward_keeps_refusing_1d_ids(llama):
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\), got shape \(4,\)"):
        llama(torch.ones(4, dtype=torch.long))


@pytest.mark.parametrize("bad, where", [(256, (1, 3)), (-1, (0, 2)), (10**6, (0, 0))])
def test_forward_names_an_id_outside_the_vocabulary(llama, bad, where):
    ids = _ids(2, 5)
    ids[where] = bad
    message = rf"input_ids holds id {bad} at \(row {where[0]}, col {where[1]}\), outside the vocabulary \[0, 256\)"
    with pytest.raises(ValueError, match=message + r" of this llama model \(vocab_size=256\)"):
        llama(ids)
    ids[where] = 255  # the last id is in
    assert llama(ids).shape == (2, 5, 256)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_forward_refuses_more_positions_than_the_model_has(name, request):
    model = request.getfixturevalue(name)
    with pytest.raises(ValueError, match=f"sequence length 513 exceeds max_position_embeddings=512 of this {name}"):
        model(_ids(1, 513))
    assert model(_ids(1, 512)).shape == (1, 512, 256)


def test_forward_counts_cached_positions_and_a_failed_call_leaves_the_cache(llama):
    cache = llama.new_cache(1, 520)
    llama(_ids(1, 508), cache=cache)
    message = r"cached \(508\) \+ new tokens \(5\) = 513 exceeds max_position_embeddings=512"
    with pytest.raises(ValueError, match=message):
        llama(_ids(1, 5), cache=cache)
    assert cache.length == 508  # refused before anything ran
    assert llama(_ids(1, 4), cache=cache).shape == (1, 4, 256) and cache.length == 512


def test_forward_checks_given_position_ids(gpt2):
    ids = _ids(1, 3)
    with pytest.raises(ValueError, match=r"position_ids up to 512 \(513 positions\) exceeds max_position_embeddings"):
        gpt2(ids, position_ids=torch.tensor([[0, 1, 512]]))
    with pytest.raises(ValueError, match="position_ids must be >= 0, got -1"):
        gpt2(ids, position_ids=torch.tensor([[-1, 0, 1]]))
    with pytest.raises(ValueError, match=r"position_ids must be \(batch, seq\) = \(1, 3\) or \(1, 3\), got \(3,\)"):
        gpt2(ids, position_ids=torch.arange(3))
    # Packed rows restart their positions: a row may be longer than the table when its positions are not.
    long_row = _ids(1, 600)
    positions = torch.arange(600).remainder(300)[None]
    assert gpt2(long_row, position_ids=positions).shape == (1, 600, 256)


def test_forward_checks_the_attention_mask_shape(llama):
    ids = _ids(2, 5)
    with pytest.raises(ValueError, match=r"attention_mask must be \(batch, cached \+ new tokens\) = \(2, 5\) .* got "
                                         r"shape \(2, 4\)"):
        llama(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"got shape \(5,\)"):
        llama(ids, attention_mask=torch.ones(5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0
    assert llama(ids, attention_mask=mask).shape == (2, 5, 256)


def test_forward_checks_inputs_embeds_shape(llama):
    with pytest.raises(ValueError, match=r"inputs_embeds must be \(batch, seq, hidden\), got \(4, 64\)"):
        llama(inputs_embeds=torch.zeros(4, 64))
    assert llama(inputs_embeds=torch.zeros(1, 4, 64)).shape == (1, 4, 256)


def test_value_checks_are_skipped_while_compiling(llama):
    compiled = torch.compile(llama, fullgraph=True, backend="eager")  # fullgraph: a graph break would raise
    ids = _ids(2, 5)
    assert torch.equal(compiled(ids), llama(ids))
    with pytest.raises(ValueError, match="got dtype torch.float32"):  # type checks still run (no host read)
        torch.compile(llama, backend="eager")(ids.float())


@pytest.mark.parametrize("head", [SequenceClassifier, TokenClassifier])
def test_heads_refuse_bad_ids(llama, head):
    clf = head(llama, num_labels=3)
    with pytest.raises(ValueError, match="got dtype torch.float32"):
        clf(torch.ones(1, 4))
    ids = _ids(1, 4)
    ids[0, 1] = 300
    with pytest.raises(ValueError, match=r"input_ids holds id 300 at \(row 0, col 1\)"):
        clf(ids)
    with pytest.raises(ValueError, match=r"attention_mask must be \(batch, seq\) = \(1, 4\) like input_ids, got list"):
        clf(_ids(1, 4), attention_mask=[[1, 1, 1, 1]])
    assert clf(_ids(1, 4)).shape[-1] == 3


# ---- generate -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=float("nan")), "temperature must be >= 0 \\(0 = greedy\\) and finite, got nan"),
    (dict(temperature=float("inf")), "temperature must be .* finite, got inf"),
    (dict(temperature="0.5"), "temperature must be .* got '0.5'"),
    (dict(top_p=float("nan")), r"top_p must be in \(0, 1\], got nan"),
    (dict(top_p="0.9"), r"top_p must be in \(0, 1\], got '0.9'"),
    (dict(top_k=2.5), r"top_k must be an int >= 1 or None, got 2.5 \(float\)"),
    (dict(top_k=True), r"top_k must be an int >= 1 or None, got True \(bool\)"),
    (dict(max_new_tokens=3.0), r"max_new_tokens must be an int >= 1, got 3.0 \(float\)"),
    (dict(max_new_tokens="3"), r"max_new_tokens must be an int >= 1, got '3' \(str\)"),
    (dict(max_new_tokens=True), r"max_new_tokens must be an int >= 1, got True \(bool\)"),
    (dict(seed="7"), r"seed must be an int .* or None, got '7' \(str\)"),
    (dict(seed=1.5), r"seed must be an int .* got 1.5 \(float\)"),
    (dict(eos_token_id="2"), r"eos_token_id must be an int, a list of ints, or None, got '2'"),
    (dict(eos_token_id=[2, 2.0]), r"eos_token_id must be an int, a list of ints, or None, got \[2, 2.0\]"),
    (dict(pad_token_id=256), r"pad_token_id must be a token id in \[0, 256\) .* got 256"),
    (dict(attention_mask=[[1, 1, 1, 1]]), r"attention_mask shape list does not match input_ids shape \(1, 4\)"),
])
def test_generate_names_a_bad_argument(llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tt.generate(llama, torch.ones(1, 4, dtype=torch.long), **kwargs)


def test_generate_accepts_the_good_values_next_to_the_bad(llama):
    ids = torch.ones(1, 4, dtype=torch.long)
    out = tt.generate(llama, ids, max_new_tokens=2, temperature=0.7, top_k=5, top_p=0.9, seed=7, eos_token_id=[2],
                      pad_token_id=0)
    assert out.shape == (1, 6)
    assert tt.generate(llama, ids.int(), max_new_tokens=1, seed=None).shape == (1, 5)


def test_generate_refuses_float_ids_and_ids_outside_the_vocabulary(llama):
    with pytest.raises(ValueError, match="input_ids must be an integer tensor .* got dtype torch.float32"):
        tt.generate(llama, torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"input_ids holds id 999 at \(row 0, col 3\)"):
        tt.generate(llama, torch.tensor([[1, 2, 3, 999]]))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generate_length_limit_for_rope_and_learned_positions(name, request):
    model = request.getfixturevalue(name)
    with pytest.raises(ValueError, match=rf"prompt \(510\) \+ max_new_tokens \(3\) = 513 exceeds "
                                         rf"max_position_embeddings=512 of this {name} model"):
        tt.generate(model, torch.ones(1, 510, dtype=torch.long), max_new_tokens=3)
    assert tt.generate(model, torch.ones(1, 510, dtype=torch.long), max_new_tokens=2, eos_token_id=[]).shape == (1, 512)


# ---- tokenizer files ------------------------------------------------------------------------------------

@pytest.fixture()
def tok_dir(tmp_path):
    char_tokenizer().save(tmp_path / "tok")
    return tmp_path / "tok"


def test_truncated_tokenizer_json_names_the_file(tok_dir):
    assert Tokenizer.from_dir(tok_dir).vocab_size == 100
    text = (tok_dir / "tokenizer.json").read_text()
    (tok_dir / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"could not read .*tok/tokenizer.json as a `tokenizers` file: EOF"):
        Tokenizer.from_dir(tok_dir)
    (tok_dir / "tokenizer.json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ValueError, match=r"could not read .*tok/tokenizer.json"):
        Tokenizer.from_dir(tok_dir)


@pytest.mark.parametrize("edit, match", [
    (lambda text: text[:25], r"could not read .*tok/tokenizer_config.json: Unterminated string"),
    (lambda text: "[1, 2]", r"tok/tokenizer_config.json should hold a json object, got list"),
    (lambda text: json.dumps({**json.loads(text), "model_max_length": "big"}),
     r"tok/tokenizer_config.json: model_max_length must be a number >= 1 or null, got 'big'"),
    (lambda text: json.dumps({**json.loads(text), "model_max_length": -5}), r"model_max_length .* got -5"),
    (lambda text: json.dumps({**json.loads(text), "padding_side": 3}),
     r"tok/tokenizer_config.json: padding_side must be 'left' or 'right', got 3"),
])
def test_bad_tokenizer_config_names_the_file(tok_dir, edit, match):
    config = tok_dir / "tokenizer_config.json"
    config.write_text(edit(config.read_text()))
    with pytest.raises(ValueError, match=match):
        Tokenizer.from_dir(tok_dir)


def test_tokenizer_config_model_max_length_accepted_forms(tok_dir):
    config = tok_dir / "tokenizer_config.json"
    for value, expected in ((1024, 1024), (int(1e30), None), (None, None)):
        config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": value}))
        assert Tokenizer.from_dir(tok_dir).model_max_length == expected


# ---- JSONL data files -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _write(path, lines: list) -> str:
    """Lines are dicts (dumped as JSON) or bytes / str written as they are."""
    raw = b"".join((line if isinstance(line, bytes) else
                    (line if isinstance(line, str) else json.dumps(line)).encode()) + b"\n" for line in lines)
    path.write_bytes(raw)
    return str(path)


def _skipped(load, path, *args, **kwargs):
    with pytest.warns(UserWarning, match="bad records"):
        return load(path, *args, on_error="skip", **kwargs)


GOOD_PAIR = {"input": "abc", "output": "cba"}


def test_invalid_utf8_is_a_bad_record_not_a_crash(tok, tmp_path):
    path = _write(tmp_path / "p.jsonl", [GOOD_PAIR, b'{"input": "ab\xff", "output": "x"}', GOOD_PAIR])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not valid UTF-8 (byte 0xff at column 14)")):
        data.load_pairs(path, tok)
    ds = _skipped(data.load_pairs, path, tok)
    assert len(ds) == 2 and [(b.line, b.reason.split(" (")[0]) for b in ds.bad_records] == [(2, "not valid UTF-8")]


def test_a_byte_order_mark_and_crlf_line_ends_are_fine(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_PAIR).encode() + b"\r\n" + json.dumps(GOOD_PAIR).encode())
    assert len(data.load_pairs(path, tok)) == 2


def test_over_long_lines_are_bad_records(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(records, "MAX_LINE_BYTES", 64)
    monkeypatch.setattr(records, "_CHUNK", 16)  # pass over the long line in several reads
    long = {"input": "a" * 200, "output": "b"}
    exact = {"input": "a" * (64 - len(json.dumps({"input": "", "output": "b"}))), "output": "b"}  # 64 bytes
    assert len(json.dumps(exact)) == 64
    path = _write(tmp_path / "p.jsonl", [GOOD_PAIR, long, exact, GOOD_PAIR])
    size = len(json.dumps(long))
    with pytest.raises(ValueError, match=rf"p.jsonl:2: line is {size} bytes long, more than the 64 bytes allowed"):
        data.load_pairs(path, tok)
    ds = _skipped(data.load_pairs, path, tok)
    assert len(ds) == 3 and [b.line for b in ds.bad_records] == [2]
    no_newline = tmp_path / "last.jsonl"  # an over-long last line without a newline
    no_newline.write_bytes((json.dumps(GOOD_PAIR) + "\n" + json.dumps(long)).encode())
    assert [b.reason for b in _skipped(data.load_pairs, no_newline, tok).bad_records] == [
        f"line is {size} bytes long, more than the 64 bytes allowed (records.MAX_LINE_BYTES)"]


def test_the_line_limit_is_a_documented_module_constant():
    assert records.MAX_LINE_BYTES == 16 * 2**20 and "MAX_LINE_BYTES" in records.__doc__


@pytest.mark.parametrize("line, reason", [
    ("[1, 2]", "expected a JSON object, got list"),
    ('"text"', "expected a JSON object, got str"),
    ("null", "expected a JSON object, got NoneType"),
    ("1" * 5000, "not valid JSON (ValueError: "),  # Python refuses to convert so many digits
    ("[" * 100000 + "]" * 100000, "not valid JSON (RecursionError: "),
])
def test_lines_that_are_not_objects(tok, tmp_path, line, reason):
    path = _write(tmp_path / "t.jsonl", [{"text": "abc"}, line])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: {reason}")):
        data.load_text(path, tok, max_length=8)
    assert len(_skipped(data.load_text, path, tok, max_length=8).bad_records) == 1


def _reasons(ds) -> list[str]:
    return [f"{b.line}: {b.reason}" for b in ds.bad_records]


def test_wrong_field_types_in_text_pairs_and_instructions(tok, tmp_path):
    text = _write(tmp_path / "t.jsonl", [{"text": "abc"}, {"text": 5}, {"text": ["a"]}])
    assert _reasons(_skipped(data.load_text, text, tok, max_length=8)) == [
        "2: field 'text' should be a string, got int", "3: field 'text' should be a string, got list"]
    pairs = _write(tmp_path / "p.jsonl", [GOOD_PAIR, {"input": 1.5, "output": "x"}, {"input": "x", "output": None}])
    assert _reasons(_skipped(data.load_pairs, pairs, tok)) == [
        "2: field 'input' should be a string, got float", "3: field 'output' should be a string, got NoneType"]
    rows = [{"instruction": "do", "output": "ok"}, {"instruction": "do", "input": 3, "output": "ok"},
            {"instruction": {"a": 1}, "output": "ok"}]
    instructions = _write(tmp_path / "i.jsonl", rows)
    assert _reasons(_skipped(data.load_instructions, instructions, tok)) == [
        "2: field 'input' should be a string, got int", "3: field 'instruction' should be a string, got dict"]


def test_bad_chat_messages(tok, tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    rows = [good, {"messages": ["hi"]}, {"messages": [{"content": "hi"}]}, {"messages": [{"role": "user"}]},
            {"messages": [{"role": 1, "content": "hi"}]}, {"messages": [{"role": ["user"], "content": "hi"}]},
            {"messages": [{"role": "user", "content": 7}]}, {"messages": "hi"}]
    ds = _skipped(data.load_chats, _write(tmp_path / "c.jsonl", rows), tok)
    assert len(ds) == 1 and _reasons(ds) == [
        "2: message 0 should be an object, got str",
        "3: message 0 has no 'role' (keys: ['content'])",
        "4: message 0 has no 'content' (keys: ['role'])",
        "5: message 0 should have a string 'role', got int 1",
        "6: message 0 should have a string 'role', got list ['user']",
        "7: message 0 (user) should have a string 'content', got int",
        "8: field 'messages' should be a list, got str"]


def test_bad_classification_labels(tok, tmp_path):
    rows = [{"text": "abc", "label": "pos"}, {"text": "abc", "label": ["pos"]}, {"text": "abc", "label": {"a": 1}},
            {"text": "abc", "label": 1.0}, {"text": "abc", "label": True}, {"text": 3, "label": "pos"}]
    path = _write(tmp_path / "c.jsonl", rows)
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: field 'label' should be a string or an integer, got "
                                                   "list ['pos']")):
        data.load_classification(path, tok, labels=["neg", "pos"])
    ds = _skipped(data.load_classification, path, tok, labels=["neg", "pos"])
    assert len(ds) == 1 and _reasons(ds) == [
        "2: field 'label' should be a string or an integer, got list ['pos']",
        "3: field 'label' should be a string or an integer, got dict {'a': 1}",
        "4: field 'label' should be a string or an integer, got float 1.0",
        "5: field 'label' should be a string or an integer, got bool True",
        "6: field 'text' should be a string, got int"]
    with pytest.raises(ValueError, match=r"labels must be strings or ints, got \[\['neg'\], 'pos'\]"):
        data.load_classification(path, tok, labels=[["neg"], "pos"])
    ints = _write(tmp_path / "i.jsonl", [{"text": "abc", "label": 1}, {"text": "abd", "label": 0}])
    assert [ex["label"] for ex in data.load_classification(ints, tok)] == [1, 0]


def test_bad_ner_records(tok, tmp_path):
    rows = [{"tokens": ["ab", "cd"], "tags": ["B-PER", "O"]}, {"tokens": ["ab", 5], "tags": ["O", "O"]},
            {"tokens": ["ab"], "tags": [["O"]]}, {"tokens": "ab", "tags": ["O"]}, {"tokens": ["ab"], "tags": [None]}]
    ds = _skipped(data.load_ner, _write(tmp_path / "n.jsonl", rows), tok, tags=["O", "B-PER"])
    assert len(ds) == 1 and _reasons(ds) == [
        "2: field 'tokens' should be a list of strings, item 1 is int 5",
        "3: field 'tags' should be a list of strings, item 0 is list ['O']",
        "4: field 'tokens' should be a list, got str",
        "5: field 'tags' should be a list of strings, item 0 is NoneType None"]


LOADERS = [
    (data.load_text, dict(max_length=8)), (data.load_pairs, {}), (data.load_instructions, {}), (data.load_chats, {}),
    (data.load_classification, dict(labels=["a"])), (data.load_ner, dict(tags=["O"])),
]


@pytest.mark.parametrize("load, kwargs", LOADERS, ids=[f.__name__ for f, _ in LOADERS])
def test_every_loader_names_a_path_it_cannot_read(tok, tmp_path, load, kwargs):
    with pytest.raises(FileNotFoundError, match=re.escape(f"JSONL file not found: {tmp_path / 'nope.jsonl'}")):
        load(tmp_path / "nope.jsonl", tok, **kwargs)
    with pytest.raises(IsADirectoryError, match=re.escape(f"expected a JSONL file, got a directory: {tmp_path}")):
        load(tmp_path, tok, **kwargs)
    # Each loader also skips an invalid UTF-8 line like any other bad record.
    path = _write(tmp_path / "bad.jsonl", [b"\xc3\x28"])
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: not valid UTF-8")):
        load(path, tok, **kwargs)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_named(tok, tmp_path):
    path = _write(tmp_path / "p.jsonl", [GOOD_PAIR])
    os.chmod(path, 0)
    try:
        with pytest.raises(PermissionError, match=re.escape(f"cannot read JSONL file {path}: permission denied")):
            data.load_pairs(path, tok)
    finally:
        os.chmod(path, 0o600)


def test_discover_labels_reads_the_same_way(tmp_path):
    path = _write(tmp_path / "c.jsonl", [{"label": "b"}, b"\xff", "[1]", {"label": "a"}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.discover_labels(path, "label") == ["a", "b"]


def test_a_prompt_tuned_model_names_a_bad_token_id():
    model = tt.models.build("llama-tiny")
    tt.prompt.apply(model, tt.prompt.PromptConfig(num_virtual_tokens=3))
    with pytest.raises(ValueError, match=r"id 256 at \(0, 2\), outside the vocabulary \[0, 256\)"):
        model(torch.tensor([[1, 2, 256]]))
    with pytest.raises(ValueError, match="int64 or int32 tensor"):
        model(torch.tensor([[1.0, 2.0]]))
    assert model(torch.tensor([[1, 2, 255]])).shape == (1, 3, 256)


def test_layers_built_by_hand_refuse_non_finite_or_ill_typed_hyperparameters():
    for alpha in (float("inf"), float("nan"), "16"):
        with pytest.raises(ValueError, match="LoRA alpha must be a finite number > 0"):
            tt.lora.LoRALinear(torch.nn.Linear(4, 4), 2, alpha)
    with pytest.raises(ValueError, match=r"LoRA dropout must be in \[0, 1\)"):
        tt.lora.LoRALinear(torch.nn.Linear(4, 4), 2, 4.0, dropout="0.1")
    assert tt.lora.LoRALinear(torch.nn.Linear(4, 4), 2, 4).scaling == 2.0
