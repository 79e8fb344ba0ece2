"""tinytune.data: JSONL loaders, bad-record reports, templates, exact loss masks, collation, packing, metrics."""
import re
import warnings

import jinja2
import pytest
import torch

import tinytune.data as data
from tinytune.data import IGNORE
from tinytune.models import Tokenizer, build

from text_fixtures import BOS, EOS, PAD, bpe_tokenizer, write_jsonl
CORPUS = ["the cat sat on the mat", "hello world, how are you?", "Paris is the capital of France",
          "Barack Obama visited New York City", "I am fine, thanks.", "What is the capital of France?"]


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer(CORPUS, vocab_size=320)


def scored_runs(tok, ids, labels):
    """Decoded text of each maximal run of scored positions (labels must equal ids there)."""
    runs, current = [], []
    for i, label in zip(ids, labels):
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == i
            current.append(i)
    return [tok.decode(r) for r in runs + ([current] if current else [])]


# ---- templates -------------------------------------------------------------------------------------------

# The published chat templates (Hugging Face `chat_template` strings), rendered with jinja2 the way
# transformers renders them (trim_blocks, lstrip_blocks). ChatML: as in the HF chat-templating docs and
# Qwen/OpenHermes; Llama 3: meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json.
CHATML_JINJA = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")
LLAMA3_JINJA = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world, how are you?"},
        {"role": "assistant", "content": "I am fine, thanks."}, {"role": "user", "content": " What is the capital of France? "},
        {"role": "assistant", "content": "Paris"}]


def _jinja(source, messages, gen):
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source).render(messages=messages, add_generation_prompt=gen, bos_token="<|begin_of_text|>")


@pytest.mark.parametrize("gen", [False, True])
def test_chat_templates_match_published_jinja(gen):
    assert data.CHATML.render(CHAT, gen) == _jinja(CHATML_JINJA, CHAT, gen)
    assert data.LLAMA3.render(CHAT, gen) == _jinja(LLAMA3_JINJA, CHAT, gen)


def test_chat_templates_canonical_strings():
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert data.CHATML.render(msgs) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    assert data.LLAMA3.render(msgs[:1], add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_alpaca_renders_the_stanford_prompts():
    # tatsu-lab/stanford_alpaca PROMPT_DICT, verbatim.
    assert data.ALPACA.prompt("Add.", "1 2") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n1 2\n\n### Response:")
    assert data.ALPACA.render("Greet.", "", "Hi") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nGreet.\n\n### Response:Hi")


def test_template_errors_name_the_value():
    with pytest.raises(ValueError, match="unknown template 'vicuna'.*alpaca"):
        data.get_template("vicuna")
    with pytest.raises(ValueError, match="message 0 has role 'bot'"):
        data.CHATML.render([{"role": "bot", "content": "x"}])


# ---- exact masks -------------------------------------------------------------------------------------------

def test_encode_segments_ids_equal_whole_text_encoding(tok):
    # "the c" + "at": BPE merges across the boundary; ids must still be those of the whole text.
    segments = [data.Segment("the c"), data.Segment("at sat", True)]
    ids, labels = data.encode_segments(tok, segments)
    assert ids == [BOS] + tok.encode("the cat sat", add_special_tokens=False)
    assert labels[0] == IGNORE and labels[-1] == ids[-1]


def test_pairs_score_output_and_eos_only(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"input": "What is the capital of France?", "output": "Paris"}])
    (ex,) = data.load_pairs(path, tok, separator="\n")
    prompt = tok.encode("What is the capital of France?\n", add_special_tokens=False)
    answer = tok.encode("Paris", add_special_tokens=False)
    assert ex["input_ids"] == [BOS] + prompt + answer + [EOS]
    assert ex["labels"] == [IGNORE] * (1 + len(prompt)) + answer + [EOS]


def test_pairs_field_names_configurable(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": "hello", "a": "world"}])
    (ex,) = data.load_pairs(path, tok, input_field="q", output_field="a", add_bos=False)
    assert scored_runs(tok, ex["input_ids"], ex["labels"]) == ["world</s>"]


@pytest.mark.parametrize("name,end", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_multi_turn_chat_scores_assistant_turns_only(tok, tmp_path, name, end):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    if name == "llama3":  # as in Llama 3's own tokenizer, BOS is <|begin_of_text|>, which the template writes
        tok = Tokenizer(tok.backend, bos_token_id=tok.token_to_id("<|begin_of_text|>"), eos_token_id=EOS)
    (ex,) = data.load_chats(path, tok, template=name)
    text_ids = tok.encode(data.get_template(name).render(CHAT), add_special_tokens=False)
    assert ex["input_ids"] == ([BOS] if name == "chatml" else []) + text_ids  # BOS exactly once
    assert scored_runs(tok, ex["input_ids"], ex["labels"]) == [f"I am fine, thanks.{end}", f"Paris{end}"]


def test_instructions_alpaca_and_chatml(tok, tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "Greet.", "input": "", "output": "hello"},
                                              {"instruction": "Name the capital.", "input": "France", "output": "Paris"}])
    alpaca = data.load_instructions(path, tok)
    assert tok.decode(alpaca[0]["input_ids"]) == "<s>" + data.ALPACA.render("Greet.", "", "hello") + "</s>"
    assert [scored_runs(tok, e["input_ids"], e["labels"]) for e in alpaca] == [["hello</s>"], ["Paris</s>"]]
    chatml = data.load_instructions(path, tok, template="chatml")
    assert tok.decode(chatml[1]["input_ids"]) == (
        "<s><|im_start|>user\nName the capital.\n\nFrance<|im_end|>\n<|im_start|>assistant\nParis<|im_end|>\n")
    assert scored_runs(tok, chatml[1]["input_ids"], chatml[1]["labels"]) == ["Paris<|im_end|>"]


# ---- plain text --------------------------------------------------------------------------------------------

def test_text_packs_documents_into_full_rows(tok, tmp_path):
    docs = ["the cat sat on the mat", "hello world", "Paris is the capital of France"]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": d} for d in docs])
    rows = data.load_text(path, tok, max_length=8)
    stream = [t for d in docs for t in [BOS] + tok.encode(d, add_special_tokens=False) + [EOS]]
    assert [t for r in rows for t in r["input_ids"]] == stream
    assert all(len(r["input_ids"]) == 8 for r in rows[:-1]) and 0 < len(rows[-1]["input_ids"]) <= 8
    assert all(r["labels"] == r["input_ids"] for r in rows)
    dropped = data.load_text(path, tok, max_length=8, drop_remainder=True)
    assert len(dropped) == len(stream) // 8


# ---- classification and NER --------------------------------------------------------------------------------

def test_classification_discovers_sorted_labels(tok, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "the cat", "label": "pos"}, {"text": "the mat", "label": "neg"},
                                              {"text": "hello", "label": "neutral"}])
    ds = data.load_classification(path, tok)
    assert ds.label_names == ["neg", "neutral", "pos"]
    assert [e["label"] for e in ds] == [2, 0, 1]
    assert ds[0]["input_ids"] == [BOS] + tok.encode("the cat", add_special_tokens=False) + [EOS]
    given = data.load_classification(path, tok, labels=["pos", "neg", "neutral"])
    assert [e["label"] for e in given] == [0, 1, 2]


def test_ner_aligns_tags_to_first_subtoken(tok, tmp_path):
    words, tags = ["Barack", "Obama", "visited", "Zqxw"], ["B-PER", "I-PER", "O", "B-LOC"]
    path = write_jsonl(tmp_path / "n.jsonl", [{"tokens": words, "tags": tags}])
    (ex,) = data.load_ner(path, tok, tags=["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    pieces = [tok.encode(w if i == 0 else " " + w, add_special_tokens=False) for i, w in enumerate(words)]
    assert len(pieces[3]) > 1  # an unseen word splits into several sub-tokens
    assert ex["input_ids"] == [BOS] + [t for p in pieces for t in p]
    expected = [IGNORE]
    for p, tag_id in zip(pieces, [1, 2, 0, 3]):
        expected += [tag_id] + [IGNORE] * (len(p) - 1)
    assert ex["labels"] == expected
    pred, gold = data.word_predictions(ex["labels"], ex["labels"], ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    assert gold == tags and data.entity_scores([pred], [gold]).f1 == 1.0


# ---- bad records -------------------------------------------------------------------------------------------

def _bad_classification_file(tmp_path):
    return write_jsonl(tmp_path / "bad.jsonl", [
        {"text": "the cat", "label": "pos"},          # 1 ok
        "{not json",                                  # 2
        {"label": "pos"},                             # 3 missing text
        {"text": "   ", "label": "neg"},              # 4 empty text
        {"text": "the mat", "label": "meh"},          # 5 unknown label
        {"text": "the cat sat on the mat " * 5, "label": "neg"},  # 6 too long
        {"text": "hello", "label": "neg"},            # 7 ok
    ])


def test_bad_records_raise_with_file_and_line(tok, tmp_path):
    path = _bad_classification_file(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not valid JSON")):
        data.load_classification(path, tok, labels=["neg", "pos"], max_length=10)


def test_bad_records_skipped_are_all_reported(tok, tmp_path):
    path = _bad_classification_file(tmp_path)
    with pytest.warns(UserWarning, match="skipped 5 bad records"):
        ds = data.load_classification(path, tok, labels=["neg", "pos"], max_length=10, on_error="skip")
    assert len(ds) == 2
    assert [(b.path, b.line) for b in ds.bad_records] == [(str(path), n) for n in (2, 3, 4, 5, 6)]
    reasons = [b.reason for b in ds.bad_records]
    assert "missing field 'text'" in reasons[1] and "empty" in reasons[2]
    assert "unknown label 'meh'" in reasons[3] and "more than max_length=10" in reasons[4]
    assert f"{path}:5: unknown label" in ds.report()


def test_truncate_instead_of_reject(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"input": "the cat sat on the mat", "output": "hello world"}])
    with pytest.raises(ValueError, match=r"p.jsonl:1: \d+ tokens, more than max_length=6"):
        data.load_pairs(path, tok, max_length=6)
    with pytest.warns(UserWarning):  # everything scored was cut off: a bad record, not a silent no-op
        assert len(data.load_pairs(path, tok, max_length=6, truncate=True, on_error="skip")) == 0
    (ex,) = data.load_pairs(path, tok, max_length=12, truncate=True)
    assert len(ex["input_ids"]) == 12 == len(ex["labels"])


def test_chat_and_ner_bad_records(tok, tmp_path):
    chats = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]},
                                               {"messages": [{"role": "robot", "content": "hi"}]},
                                               {"messages": []}])
    with pytest.warns(UserWarning):
        ds = data.load_chats(chats, tok, on_error="skip")
    assert [b.reason.split(":")[0] for b in ds.bad_records] == [
        "no assistant message", "message 0 has role 'robot'; roles", "field 'messages' is empty"]
    ner = write_jsonl(tmp_path / "n.jsonl", [{"tokens": ["a", "b"], "tags": ["O"]},
                                             {"tokens": ["a"], "tags": ["X-PER"]}])
    with pytest.warns(UserWarning):
        ds = data.load_ner(ner, tok, tags=["O", "B-PER"], on_error="skip")
    assert ["2 tokens but 1 tags" in ds.bad_records[0].reason, "not BIO" in ds.bad_records[1].reason] == [True, True]


def test_on_error_value_is_checked(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"input": "a", "output": "b"}, ""])  # a blank line is no record
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped: no warning
        assert data.load_pairs(path, tok, on_error="skip").bad_records == []
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        data.load_pairs(tmp_path / "missing.jsonl", tok)
    with pytest.raises(ValueError, match="on_error must be one of"):
        data.load_pairs(path, tok, on_error="ignore")


# ---- metrics -----------------------------------------------------------------------------------------------

def test_accuracy_and_macro_f1_by_hand():
    gold = [0, 0, 1, 1, 2]
    pred = [0, 1, 1, 1, 0]
    assert data.accuracy(pred, gold) == 3 / 5
    # class 0: tp1 fp1 fn1 -> 1/2; class 1: tp2 fp1 fn0 -> 4/5; class 2: tp0 -> 0.
    assert data.macro_f1(pred, gold) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    # a class absent from the targets but predicted counts (F1 0); a listed class absent from both counts 0 too.
    assert data.macro_f1([0, 3], [0, 0]) == pytest.approx((2 / 3 + 0) / 2)
    assert data.macro_f1([0, 0], [0, 0], labels=[0, 1]) == pytest.approx(0.5)
    assert data.accuracy(torch.tensor([1, 2]), torch.tensor([1, 1])) == 0.5


def test_bio_spans_and_entity_scores_by_hand():
    assert data.bio_spans(["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]) == {
        ("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 6)}
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG"]]  # PER span cut short: wrong
    scores = data.entity_scores(pred, gold)
    # gold 3 entities, pred 3 entities, 2 exact matches.
    assert (scores.precision, scores.recall, scores.f1) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert scores.per_type["PER"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert scores.per_type["LOC"]["f1"] == 1.0
    with pytest.raises(ValueError, match="sentence 0: 1 predicted tags but 2"):
        data.entity_scores([["O"]], [["O", "O"]])


# ---- collation ---------------------------------------------------------------------------------------------

def test_pad_batch_pads_ids_labels_mask():
    batch = data.pad_batch([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "label": 1},
                            {"input_ids": [8], "labels": [8], "label": 0}], pad_token_id=PAD, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["label"].tolist() == [1, 0]
    left = data.Collator(PAD, padding_side="left")([{"input_ids": [5, 6]}, {"input_ids": [8]}])
    assert left["input_ids"].tolist() == [[5, 6], [0, 8]] and left["attention_mask"].tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ValueError, match="example 1: 'labels' has 2 entries but input_ids has 1"):
        data.pad_batch([{"input_ids": [1], "labels": [1]}, {"input_ids": [1], "labels": [1, 2]}], PAD)


def test_length_grouped_sampler():
    lengths = [int(x) for x in torch.randint(1, 200, (300,))]
    sampler = data.LengthGroupedSampler(lengths, batch_size=8, seed=3, group_factor=10)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 38
    assert sorted(i for b in batches for i in b) == list(range(300))
    assert batches == list(data.LengthGroupedSampler(lengths, batch_size=8, seed=3, group_factor=10))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 40  # random batches of 8 from U(1, 200) spread ~150
    sampler.set_epoch(1)
    assert list(sampler) != batches
    dropped = data.LengthGroupedSampler(lengths, batch_size=8, seed=3, group_factor=10, drop_last=True)
    assert len(dropped) == len(list(dropped)) == 37 and all(len(b) == 8 for b in dropped)


def test_pack_examples_positions_segments_labels():
    examples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]},
                {"input_ids": [6, 7, 8, 9], "labels": [6, 7, 8, 9]}]
    rows = data.pack_examples(examples, max_length=6)
    assert rows[0] == {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5],
                       "position_ids": [0, 1, 2, 0, 1], "segment_ids": [1, 1, 1, 2, 2]}
    assert rows[1]["position_ids"] == [0, 1, 2, 3] and rows[1]["segment_ids"] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="example 0 has 3 tokens, more than max_length=2"):
        data.pack_examples(examples, max_length=2)


def test_segment_mask_matches_naive_loop():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 2, 3, 3, 0, 0]])
    mask = data.segment_mask(seg)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    for b in range(2):
        for q in range(6):
            for k in range(6):
                assert bool(mask[b, 0, q, k]) == (k <= q and int(seg[b, q]) == int(seg[b, k]))


def _logits_with_mask(model, ids, position_ids, mask):
    """The decoder's forward with the 4-D block-diagonal mask of packed examples."""
    return model(ids, attention_mask=mask, position_ids=position_ids)


@torch.no_grad()
def test_packed_logits_equal_unpacked():
    model = build("llama-tiny")
    gen = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(3, 256, (n,), generator=gen).tolist(), "labels": [0] * n}
                for n in (5, 3, 7, 4)]
    batch = data.pad_batch(data.pack_examples(examples, max_length=16), PAD)
    logits = _logits_with_mask(model, batch["input_ids"], batch["position_ids"], data.segment_mask(batch["segment_ids"]))
    found = 0
    for row in range(logits.shape[0]):
        for segment in batch["segment_ids"][row].unique().tolist():
            if segment == 0:
                continue
            where = batch["segment_ids"][row] == segment
            alone = model(batch["input_ids"][row][where][None])[0]
            torch.testing.assert_close(logits[row][where], alone, atol=1e-5, rtol=1e-5)
            found += 1
    assert found == len(examples)
    # without the mask the later examples would see the earlier ones
    plain = model(batch["input_ids"][:1])[0]
    assert not torch.allclose(plain[batch["segment_ids"][0] == 2], logits[0][batch["segment_ids"][0] == 2], atol=1e-3)
