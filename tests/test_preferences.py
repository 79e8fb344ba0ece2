"""tinytune.data.load_preferences: pairs, rankings as one group, chat prompts, margins, every bad-row kind."""
import re

import pytest

import tinytune as tt
import tinytune.data as data
from tinytune.data import IGNORE
from tinytune.models import Tokenizer

from text_fixtures import BOS, EOS, PAD, bpe_tokenizer, write_jsonl
CORPUS = ["the cat sat on the mat", "hello world, how are you?", "Paris is the capital of France"]


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer(CORPUS, vocab_size=300)


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_pair_row(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the capital of France?", "chosen": " Paris",
                                               "rejected": " the mat", "id": 7}])
    (ex,) = tt.data.load_preferences(path, tok)
    assert ex["prompt_ids"] == [BOS] + enc(tok, "the capital of France?")
    assert ex["completion_ids"] == [enc(tok, " Paris") + [EOS], enc(tok, " the mat") + [EOS]]
    assert (ex["chosen"], ex["rejected"], ex["margin"], ex["group"]) == ([0], [1], [None], 0)


def test_ranked_row_is_one_group_of_ordered_pairs(tok, tmp_path):
    ranked = [" Paris", " the cat", " hello"]
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "the capital?", "chosen": " a", "rejected": " b"},
                                              {"prompt": "the capital of France?", "ranked": ranked}])
    pairs = data.load_preferences(path, tok)
    assert len(pairs) == 2 and [ex["group"] for ex in pairs] == [0, 1]
    ex = pairs[1]
    assert ex["completion_ids"] == [enc(tok, text) + [EOS] for text in ranked]
    # K = 3 gives K(K-1)/2 = 3 pairs, each better-over-worse: (best, 2nd), (best, worst), (2nd, worst).
    assert list(zip(ex["chosen"], ex["rejected"])) == [(0, 1), (0, 2), (1, 2)]
    assert ex["margin"] == [None] * 3


def test_sequences_share_the_prompt_and_keep_eos(tok, tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "hello world,", "ranked": [" how are you?", " the cat",
                                                                                    " sat on", " mat"]}])
    (ex,) = data.load_preferences(path, tok)
    seqs = data.preference_sequences(ex)
    n = len(ex["prompt_ids"])
    assert len(seqs) == 4 and len(ex["chosen"]) == 6
    for seq, completion in zip(seqs, ex["completion_ids"]):
        assert seq["input_ids"][:n] == ex["prompt_ids"]  # the prompt tokens, identical in every pair
        assert seq["input_ids"][-1] == EOS and seq["labels"][-1] == EOS  # the reward is read at EOS
        assert seq["labels"] == [IGNORE] * n + completion
    batch = data.pad_batch(seqs, pad_token_id=PAD)
    last = batch["attention_mask"].sum(-1) - 1  # the last non-pad token of each row
    assert batch["input_ids"].gather(1, last[:, None]).flatten().tolist() == [EOS] * 4


def test_tokenizer_without_eos(tok, tmp_path):
    no_eos = Tokenizer(tok.backend, bos_token_id=BOS, eos_token_id=None)
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the", "chosen": " cat", "rejected": " mat"}])
    (ex,) = data.load_preferences(path, no_eos)
    assert ex["completion_ids"] == [enc(tok, " cat"), enc(tok, " mat")]


def test_margins(tok, tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "the", "chosen": " cat", "rejected": " mat", "margin": 2},
                                              {"prompt": "the", "chosen": " cat", "rejected": " mat", "margin": 0.5},
                                              {"prompt": "the", "chosen": " cat", "rejected": " mat", "margin": None}])
    assert [ex["margin"] for ex in data.load_preferences(path, tok)] == [[2.0], [0.5], [None]]


@pytest.mark.parametrize("name,end", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_chat_prompt_through_template(tok, tmp_path, name, end):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the capital of France?"}]
    chosen = [{"role": "assistant", "content": "Paris"}]  # the conversational form of a completion
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": messages, "chosen": chosen, "rejected": "the mat"}])
    if name == "llama3":  # Llama 3's BOS is <|begin_of_text|>, which the template writes
        tok = Tokenizer(tok.backend, bos_token_id=tok.token_to_id("<|begin_of_text|>"), eos_token_id=EOS)
    (ex,) = data.load_preferences(path, tok, template=name if name == "llama3" else None)  # None: chatml
    template = data.get_template(name)
    rendered = template.render(messages, add_generation_prompt=True)
    assert ex["prompt_ids"] == ([BOS] if name == "chatml" else []) + enc(tok, rendered)
    assert [tok.decode(c) for c in ex["completion_ids"]] == [f"Paris{end}", f"the mat{end}"]


def test_text_prompt_with_instruction_and_chat_templates(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Name the capital.", "chosen": "Paris", "rejected": "mat"}])
    (alpaca,) = data.load_preferences(path, tok, template="alpaca")
    assert alpaca["prompt_ids"] == [BOS] + enc(tok, data.ALPACA.prompt("Name the capital."))
    assert alpaca["completion_ids"][0] == enc(tok, "Paris") + [EOS]
    (chatml,) = data.load_preferences(path, tok, template="chatml")
    user = [{"role": "user", "content": "Name the capital."}]
    assert chatml["prompt_ids"] == [BOS] + enc(tok, data.CHATML.render(user, add_generation_prompt=True))


def test_max_length_is_reported_not_truncated(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the", "chosen": " cat", "rejected": " hello world, how"}])
    (ex,) = data.load_preferences(path, tok)
    longest = len(ex["prompt_ids"]) + len(ex["completion_ids"][1])
    assert len(data.load_preferences(path, tok, max_length=longest)) == 1
    with pytest.raises(ValueError, match=rf"p\.jsonl:1: .*longest completion \('rejected', .*= {longest} tokens, "
                                         rf"more than max_length={longest - 1}"):
        data.load_preferences(path, tok, max_length=longest - 1)


P, C, R = "the capital?", " Paris", " mat"
BAD_ROWS = [
    ({"chosen": C, "rejected": R}, "missing field 'prompt'"),
    ({"prompt": 3, "chosen": C, "rejected": R}, "'prompt' should be a string or a list of chat messages, got int"),
    ({"prompt": "  ", "chosen": C, "rejected": R}, "field 'prompt' is empty"),
    ({"prompt": P}, "need 'chosen' and 'rejected', or 'ranked'"),
    ({"prompt": P, "chosen": C}, "missing field 'rejected'"),
    ({"prompt": P, "chosen": 5, "rejected": R}, "field 'chosen' should be a string, got int"),
    ({"prompt": P, "chosen": C, "rejected": ""}, "field 'rejected' is empty"),
    ({"prompt": P, "chosen": C, "rejected": C}, r"'chosen' and 'rejected' are the same completion \(a tie"),
    ({"prompt": P, "chosen": C, "rejected": R, "ranked": [C, R]}, "both 'ranked' and 'chosen' and 'rejected'"),
    ({"prompt": P, "ranked": [C]}, "a ranking needs at least 2"),
    ({"prompt": P, "ranked": []}, "field 'ranked' is empty"),
    ({"prompt": P, "ranked": C}, "field 'ranked' should be a list, got str"),
    ({"prompt": P, "ranked": [C, R, C]}, r"ranked\[0\] and ranked\[2\] are the same completion"),
    ({"prompt": P, "ranked": [C, " "]}, r"ranked\[1\] is empty"),
    ({"prompt": P, "ranked": [C, R], "margin": 1.0}, "'margin' .* is for pairs only"),
    ({"prompt": P, "chosen": C, "rejected": R, "margin": "big"}, "'margin' should be a number, got str"),
    ({"prompt": P, "chosen": C, "rejected": R, "margin": True}, "'margin' should be a number, got bool"),
    ({"prompt": P, "chosen": C, "rejected": R, "margin": -1}, "finite number >= 0, got -1"),
    ('{"prompt": "a", "chosen": " b", "rejected": " c", "margin": NaN}', "finite number >= 0, got nan"),
    ('{"prompt": "a", "chosen": " b", "rejected": " c", "margin": Infinity}', "finite number >= 0, got inf"),
    ({"prompt": [], "chosen": C, "rejected": R}, "empty list of messages"),
    ({"prompt": [{"role": "user"}], "chosen": C, "rejected": R}, "message 0 has no 'content'"),
    ({"prompt": [{"role": "user", "content": " "}], "chosen": C, "rejected": R}, r"message 0 \(user\) has empty"),
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "chosen": C,
      "rejected": R}, "ends with an assistant message"),
    ({"prompt": P, "chosen": [{"role": "user", "content": "x"}], "rejected": R},
     "field 'chosen' should be an assistant message, got role 'user'"),
    ({"prompt": P, "chosen": [], "rejected": R}, "one assistant message, got a list of 0"),
    ("{oops", "not valid JSON"),
]


@pytest.mark.parametrize("row,reason", BAD_ROWS, ids=[re.sub(r"\W+", "_", r)[:40] for _, r in BAD_ROWS])
def test_bad_rows_raise_with_file_line_or_are_skipped(tok, tmp_path, row, reason):
    good = {"prompt": P, "chosen": C, "rejected": R}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", row, good])  # the bad row is on line 3
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{reason}"):
        data.load_preferences(path, tok)
    with pytest.warns(UserWarning, match="skipped 1 bad records"):
        kept = data.load_preferences(path, tok, on_error="skip")
    assert len(kept) == 2 and [ex["group"] for ex in kept] == [0, 1]
    (bad,) = kept.bad_records
    assert (bad.path, bad.line) == (str(path), 3) and re.search(reason, bad.reason)


def test_tie_after_tokenization_and_chat_prompt_needs_chat_template(tok, tmp_path):
    # Llama 3 strips contents, so "Paris" and "Paris " are the same completion there.
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "hi", "chosen": "Paris", "rejected": "Paris "}])
    assert len(data.load_preferences(path, tok)) == 1
    with pytest.raises(ValueError, match="t.jsonl:1: 'chosen' and 'rejected' are the same completion"):
        data.load_preferences(path, tok, template="llama3")
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a",
                                               "rejected": "b"}])
    with pytest.raises(ValueError, match="c.jsonl:1: .*needs a chat template .*got 'alpaca'"):
        data.load_preferences(path, tok, template="alpaca")


@pytest.mark.parametrize("kwargs,match", [({"max_length": 0}, "max_length must be a positive int or None"),
                                          ({"on_error": "ignore"}, "on_error must be one of"),
                                          ({"template": "vicuna"}, "unknown template 'vicuna'")])
def test_bad_arguments(tok, tmp_path, kwargs, match):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": P, "chosen": C, "rejected": R}])
    with pytest.raises(ValueError, match=match):
        data.load_preferences(path, tok, **kwargs)

