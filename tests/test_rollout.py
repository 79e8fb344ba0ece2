"""tinytune.rlhf.generate_rollouts (layout, log-prob alignment, stop masks, seeds, chunking), eos_penalty, and
tinytune.data.load_prompts (text and chat rows, extra fields kept, bad rows named file:line)."""
import pytest
import torch

import tinytune as tt
from tinytune.data import get_template

from text_fixtures import BOS, bpe_tokenizer, write_jsonl

STOPS = list(range(0, 256, 7))  # ~1 token in 7 stops a row: some rows end early, some run to max_new_tokens
PROMPTS = [[1, 2, 3, 4, 5], [9, 8], [17, 30, 41]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tt.models.build("llama-tiny", seed=0)  # vocab 256, no EOS in the config


@pytest.fixture(scope="module")
def rollout(model):
    return tt.rlhf.generate_rollouts(model, PROMPTS, group_size=4, max_new_tokens=10, stop_token_ids=STOPS, seed=0)


def test_layout_left_padding_groups(rollout):
    r, P = rollout, 5
    assert r.prompt_length == P and r.group_size == 4
    N, width = r.input_ids.shape
    assert N == 12 and r.logprobs.shape == (N, width - P) and r.logprobs.dtype == torch.float32
    assert r.attention_mask.shape == r.completion_mask.shape == (N, width)
    assert r.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for i, prompt in enumerate(PROMPTS):
        for g in range(4):
            row = i * 4 + g
            assert r.input_ids[row, P - len(prompt):P].tolist() == prompt
            assert r.attention_mask[row, :P].tolist() == [0] * (P - len(prompt)) + [1] * len(prompt)
    assert not r.completion_mask[:, :P].any()
    # the four completions of a prompt are different samples
    assert len({tuple(c) for c in tt.rlhf.completions(r)[:4]}) > 1


def test_completion_mask_up_to_first_stop(rollout):
    r, P = rollout, rollout.prompt_length
    T = r.input_ids.shape[1] - P
    assert r.ended.any() and (~r.ended).any()  # both kinds present
    for row in range(r.input_ids.shape[0]):
        gen = r.input_ids[row, P:].tolist()
        first = next((t for t, tok in enumerate(gen) if tok in STOPS), None)
        length = T if first is None else first + 1
        assert bool(r.ended[row]) == (first is not None)
        assert int(r.completion_lengths[row]) == length == int(r.completion_mask[row].sum())
        assert r.completion_mask[row, P:].tolist() == [1] * length + [0] * (T - length)
        assert r.attention_mask[row, P:].tolist() == r.completion_mask[row, P:].tolist()
        assert (r.logprobs[row, length:] == 0).all() and (r.logprobs[row, :length] < 0).all()
        assert tt.rlhf.completions(r)[row] == gen[:length]
        if first is None:
            assert length == 10  # only rows that never stopped run to max_new_tokens


def test_logprobs_aligned_with_a_plain_forward_and_token_logprobs(model, rollout):
    r, P = rollout, rollout.prompt_length
    mask = r.completion_mask[:, P:].bool()
    with torch.no_grad():
        logits = model(r.input_ids, attention_mask=r.attention_mask)  # (N, P+T, V)
        plain = torch.log_softmax(logits.float(), -1)[:, P - 1:-1].gather(-1, r.input_ids[:, P:, None])[..., 0]
        shared = tt.rlhf.token_logprobs(model, r.input_ids, r.attention_mask)[:, P - 1:]
    assert torch.allclose(plain[mask], r.logprobs[mask], atol=1e-5)
    assert torch.allclose(shared * mask, r.logprobs, atol=1e-5)  # the identity PPO's ratio relies on


def test_rollout_tensors_feed_a_training_forward(model, rollout):
    lp = tt.rlhf.token_logprobs(model, rollout.input_ids, rollout.attention_mask)
    lp.sum().backward()  # not inference tensors: autograd may save them
    assert model.lm_head.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_mode_restored_and_global_rng_untouched(model):
    model.train()
    state = torch.get_rng_state()
    tt.rlhf.generate_rollouts(model, PROMPTS, max_new_tokens=3, seed=1)
    assert model.training and torch.equal(state, torch.get_rng_state())
    model.eval()


def test_same_seed_same_rollout_and_chunking(model, rollout):
    kwargs = dict(group_size=4, max_new_tokens=10, stop_token_ids=STOPS)
    again = tt.rlhf.generate_rollouts(model, PROMPTS, seed=0, **kwargs)
    assert torch.equal(again.input_ids, rollout.input_ids) and torch.equal(again.logprobs, rollout.logprobs)
    chunked = [tt.rlhf.generate_rollouts(model, PROMPTS, seed=0, batch_size=5, **kwargs) for _ in range(2)]
    assert torch.equal(chunked[0].input_ids, chunked[1].input_ids)  # chunk c draws with seed + c
    # greedy decoding does not depend on the seed: chunks of any size give the one-batch result
    one = tt.rlhf.generate_rollouts(model, PROMPTS, temperature=0.0, **kwargs)
    for size in (1, 5):
        part = tt.rlhf.generate_rollouts(model, PROMPTS, temperature=0.0, batch_size=size, **kwargs)
        assert torch.equal(part.input_ids, one.input_ids) and torch.equal(part.completion_mask, one.completion_mask)
        assert torch.allclose(part.logprobs, one.logprobs, atol=1e-5) and torch.equal(part.ended, one.ended)


def test_chunks_of_different_widths_assemble_aligned(model):
    # one short prompt alone in the last chunk: its chunk is narrower, and may stop earlier, than the first
    r = tt.rlhf.generate_rollouts(model, [[1, 2, 3, 4, 5, 6], [7]], max_new_tokens=6, stop_token_ids=STOPS,
                                  seed=3, batch_size=1)
    P = r.prompt_length
    assert P == 6 and r.input_ids[1, P - 1].item() == 7 and r.attention_mask[1, :P].tolist() == [0] * 5 + [1]
    shared = tt.rlhf.token_logprobs(model, r.input_ids, r.attention_mask)[:, P - 1:]
    assert torch.allclose(shared * r.completion_mask[:, P:], r.logprobs, atol=1e-5)


def test_default_stop_ids_are_the_config_eos(model):
    r = tt.rlhf.generate_rollouts(model, PROMPTS, max_new_tokens=4, seed=0)  # llama-tiny: no EOS, never ends
    assert not r.ended.any() and r.completion_lengths.tolist() == [4, 4, 4]


def test_eos_penalty(rollout):
    scores = torch.arange(12, dtype=torch.float64)
    out = tt.rlhf.eos_penalty(rollout, scores, 0.5)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.where(rollout.ended, scores, scores - 0.5).float())
    assert torch.equal(tt.rlhf.eos_penalty(rollout, scores.tolist(), 0), scores.float())
    with pytest.raises(ValueError, match="penalty must be a finite number >= 0, got -1"):
        tt.rlhf.eos_penalty(rollout, scores, -1)
    with pytest.raises(ValueError, match=r"one per rollout row, shape \(12,\), got \(3,\)"):
        tt.rlhf.eos_penalty(rollout, [1.0, 2.0, 3.0], 1.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[]), "prompts must be a non-empty list"),
    (dict(prompts="abc"), "prompts must be a non-empty list of token-id lists, got str"),
    (dict(prompts=[[1], []]), r"prompts\[1\] is empty"),
    (dict(prompts=[[1, "a"]]), r"prompts\[0\] must be a list of int token ids"),
    (dict(prompts=[[1, 999]]), r"prompts\[0\] holds token id 999, outside the vocabulary \[0, 256\)"),
    (dict(group_size=0), "group_size must be an int >= 1, got 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1, got 0"),
    (dict(batch_size=0), "batch_size must be an int >= 1 or None, got 0"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(stop_token_ids=[300]), "stop_token_ids must be None, an id or a list of ids in"),
    (dict(pad_token_id=-1), r"pad_token_id must be a token id in \[0, 256\)"),
    (dict(max_new_tokens=600), "exceeds max_position_embeddings=512"),
])
def test_bad_arguments_named(model, kwargs, match):
    args = dict(prompts=[[1, 2]], max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=match):
        tt.rlhf.generate_rollouts(model, **args)


# ---- load_prompts

CORPUS = ["the cat sat on the mat", "hello world, how are you?", "what is 2 + 3? 5"]


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer(CORPUS, vocab_size=300)


def test_text_and_chat_prompts_keep_other_fields(tok, tmp_path):
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2 + 3?"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "what is 2 + 3?", "answer": "5", "id": 1},
                                              {"prompt": chat, "answer": 5}])
    text, conv = tt.data.load_prompts(path, tok)
    assert text == {"prompt_ids": [BOS] + tok.encode("what is 2 + 3?", add_special_tokens=False),
                    "prompt": "what is 2 + 3?", "answer": "5", "id": 1}
    chatml = get_template("chatml")
    rendered = "".join(s.text for s in chatml.segments(chat, add_generation_prompt=True))
    assert conv["prompt_ids"] == tok.encode(rendered)  # with the generation prompt, as load_preferences does
    assert conv["prompt"] == chat and conv["answer"] == 5
    # the same rendering as a preference prompt: one place renders prompts
    pref = write_jsonl(tmp_path / "q.jsonl", [{"prompt": chat, "chosen": "5", "rejected": "6"}])
    assert tt.data.load_preferences(pref, tok)[0]["prompt_ids"] == conv["prompt_ids"]
    (wrapped,) = tt.data.load_prompts(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "hi"}]), tok, template="alpaca")
    assert wrapped["prompt_ids"] == tok.encode(get_template("alpaca").prompt("hi"))


def test_bad_prompt_rows_named_file_line(tok, tmp_path):
    rows = [{"prompt": "ok"}, {"prompt": "  "}, {"prompt": 3}, {"text": "x"}, {"prompt": []},
            {"prompt": [{"role": "assistant", "content": "hi"}]}, "not json", {"prompt": "ok", "prompt_ids": [1]},
            {"prompt": "the cat sat on the mat " * 5}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=rf"{path}:2: field 'prompt' is empty"):
        tt.data.load_prompts(path, tok)
    with pytest.warns(UserWarning):
        got = tt.data.load_prompts(path, tok, max_length=12, on_error="skip")
    assert [ex["prompt"] for ex in got] == ["ok"]
    reasons = {bad.line: bad.reason for bad in got.bad_records}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert "should be a string or a list of chat messages, got int" in reasons[3]
    assert "missing field 'prompt'" in reasons[4] and "empty list of messages" in reasons[5]
    assert "ends with an assistant message" in reasons[6] and "'prompt_ids' is reserved" in reasons[8]
    assert "more than max_length=12 (prompts are not truncated)" in reasons[9]


def test_load_prompts_bad_arguments(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    with pytest.raises(ValueError, match="max_length must be a positive int or None, got 0"):
        tt.data.load_prompts(path, tok, max_length=0)
    with pytest.raises(ValueError, match="on_error must be one of"):
        tt.data.load_prompts(path, tok, on_error="ignore")
    with pytest.raises(ValueError, match="chat template"):
        tt.data.load_prompts(write_jsonl(tmp_path / "c.jsonl", [{"prompt": [{"role": "user", "content": "a"}]}]),
                             tok, template="alpaca")
