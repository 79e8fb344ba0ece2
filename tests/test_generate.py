"""generate(): parity with Hugging Face greedy decoding, KV-cache correctness, sampling, EOS, errors."""
import pytest
import torch

from tinytune.models import build, save_pretrained
from tinytune.models.generate import _top_p_filter, generate
from tinytune.models.presets import init_weights

FAMILIES = ["llama-tiny", "qwen2-tiny", "mistral-tiny", "gpt2-tiny"]
PAD = 0


def _model(preset: str):
    # A wider init than the default 0.02 spreads the logits, so greedy choices are not decided by
    # float rounding (near-ties would make the token-for-token comparison with HF flaky).
    torch.manual_seed(1)
    return init_weights(build(preset), std=0.15).eval()


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(tinytune model, the same checkpoint loaded by transformers)."""
    transformers = pytest.importorskip("transformers")
    model = _model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    save_pretrained(model, path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, hf


def _left_padded(lengths, vocab=256, seed=0):
    """(ids, mask) of random prompts of the given lengths, left padded with PAD."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(1, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def _hf_greedy(hf, ids, mask, new, eos=None):
    return hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, eos_token_id=eos,
                       pad_token_id=PAD)


def test_greedy_matches_hf_batch1(pair):
    model, hf = pair
    ids, mask = _left_padded([9])
    ours = generate(model, ids, max_new_tokens=12, eos_token_id=[])
    assert ours.shape == (1, 21)
    assert torch.equal(ours, _hf_greedy(hf, ids, mask, 12))


def test_greedy_matches_hf_left_padded(pair):
    # HF 5.x generate derives position_ids from the attention mask for every family that accepts
    # them (GPT-2 included), so left-padded batches are compared for all four.
    model, hf = pair
    ids, mask = _left_padded([9, 4, 6])
    ours = generate(model, ids, max_new_tokens=10, attention_mask=mask, eos_token_id=[], pad_token_id=PAD)
    assert torch.equal(ours, _hf_greedy(hf, ids, mask, 10))
    # With an EOS that row 1 produces mid-way: rows stop separately and are padded after.
    eos = int(ours[1, 9 + 3])
    ours = generate(model, ids, max_new_tokens=10, attention_mask=mask, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(ours, _hf_greedy(hf, ids, mask, 10, eos=eos))


def _stepwise_logits(model, ids, mask, prompt_len):
    """Logits of positions prompt_len-1 .. S-2 through the KV cache, one token at a time."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    out = [model(ids[:, :prompt_len], attention_mask=mask[:, :prompt_len], cache=cache, logits_to_keep=1)]
    for t in range(prompt_len, ids.shape[1] - 1):
        out.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, logits_to_keep=1))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("preset", FAMILIES)
def test_cached_decode_logits_equal_full_forward(preset):
    model = _model(preset)
    # 70 tokens: past mistral-tiny's sliding window of 64, so the windowed decode mask is exercised.
    ids, mask = _left_padded([40, 33])
    out = generate(model, ids, max_new_tokens=30, attention_mask=mask, eos_token_id=[])
    full_mask = torch.cat((mask, torch.ones(2, 30, dtype=torch.long)), dim=1)
    with torch.no_grad():
        full = model(out, attention_mask=full_mask)[:, 39:-1]
        stepwise = _stepwise_logits(model, out, full_mask, 40)
    real = full_mask[:, 39:-1].bool()
    torch.testing.assert_close(stepwise[real], full[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("padded", [False, True])
def test_logprobs_equal_full_forward_log_softmax(padded):
    model = _model("llama-tiny")
    ids, mask = _left_padded([8, 5] if padded else [8, 8])
    out, logprobs = generate(model, ids, max_new_tokens=9, temperature=0.8, top_k=20, top_p=0.9, seed=3,
                             attention_mask=mask, eos_token_id=[], return_logprobs=True)
    assert logprobs.shape == (2, 9) and logprobs.dtype == torch.float32
    full_mask = torch.cat((mask, torch.ones(2, 9, dtype=torch.long)), dim=1)
    with torch.no_grad():
        expected = torch.log_softmax(model(out, attention_mask=full_mask)[:, 7:-1].float(), dim=-1)
    expected = expected.gather(-1, out[:, 8:, None])[..., 0]
    torch.testing.assert_close(logprobs, expected, atol=1e-4, rtol=1e-4)


def test_seeded_sampling_reproducible_and_seed_dependent():
    model = _model("qwen2-tiny")
    ids, _ = _left_padded([6, 6])
    state = torch.random.get_rng_state()
    a = generate(model, ids, max_new_tokens=16, temperature=1.0, seed=7)
    b = generate(model, ids, max_new_tokens=16, temperature=1.0, seed=7)
    c = generate(model, ids, max_new_tokens=16, temperature=1.0, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(torch.random.get_rng_state(), state), "a seeded run must not touch the global RNG"
    torch.manual_seed(5)
    d = generate(model, ids, max_new_tokens=16, temperature=1.0)
    torch.manual_seed(5)
    assert torch.equal(d, generate(model, ids, max_new_tokens=16, temperature=1.0))


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = _model("mistral-tiny")
    ids, mask = _left_padded([7, 3])
    greedy = generate(model, ids, max_new_tokens=10, attention_mask=mask)
    assert torch.equal(generate(model, ids, max_new_tokens=10, attention_mask=mask, temperature=1.3, top_k=1,
                                seed=0), greedy)
    assert torch.equal(generate(model, ids, max_new_tokens=10, attention_mask=mask, temperature=1.3, top_p=1e-6,
                                seed=0), greedy)


def test_top_p_keeps_the_nucleus():
    scores = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    kept = _top_p_filter(scores, 0.8).isfinite()
    assert kept.tolist() == [[True, False, True, False]]  # 0.5 + 0.3 reaches 0.8
    assert _top_p_filter(scores, 0.81).isfinite().tolist() == [[True, False, True, True]]


def test_eos_stops_each_row_and_pads_after():
    model = _model("gpt2-tiny")
    ids, _ = _left_padded([5, 5], seed=3)
    free = generate(model, ids, max_new_tokens=12, eos_token_id=[])
    eos = int(free[0, 5 + 2])  # row 0's third new token
    # The prompt is chosen so that only row 0 hits this EOS, and first at its third token.
    assert eos not in free[1, 5:].tolist() + free[0, 5:7].tolist()
    out, logprobs = generate(model, ids, max_new_tokens=12, eos_token_id=[eos, 255], pad_token_id=99,
                             return_logprobs=True)
    assert torch.equal(out[0, :8], free[0, :8])
    assert out[0, 8:].tolist() == [99] * 9
    assert torch.equal(out[1], free[1])
    assert (logprobs[0, 3:] == 0).all() and (logprobs[0, :3] < 0).all() and (logprobs[1] < 0).all()
    # Every row finished: generation stops early, so the result is shorter.
    single = generate(model, ids[:1], max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(single, free[:1, :8])


def test_default_eos_and_pad_come_from_config():
    model = _model("llama-tiny")
    ids, _ = _left_padded([5, 5], seed=4)
    free = generate(model, ids, max_new_tokens=8, eos_token_id=[])
    model.config.eos_token_id = int(free[0, 6])
    try:
        out = generate(model, ids, max_new_tokens=8)
    finally:
        model.config.eos_token_id = None
    assert out[0, 6] == free[0, 6] and out.shape[1] >= 7
    assert (out[0, 7:] == free[0, 6]).all()  # no pad id configured: padded with the first EOS id


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(top_k=0), "top_k must be >= 1 or None, got 0"),
    (dict(attention_mask=torch.ones(2, 3, dtype=torch.long)), r"attention_mask shape \(2, 3\) does not match"),
])
def test_argument_errors(kwargs, match):
    model = _model("llama-tiny")
    with pytest.raises(ValueError, match=match):
        generate(model, torch.ones(2, 4, dtype=torch.long), **kwargs)


def test_input_and_length_errors():
    with pytest.raises(ValueError, match=r"input_ids must be a 2-D \(batch, seq\) tensor, got \(4,\)"):
        generate(_model("llama-tiny"), torch.ones(4, dtype=torch.long))
    gpt2 = _model("gpt2-tiny")
    with pytest.raises(ValueError, match="= 520 exceeds max_position_embeddings=512 of this gpt2 model"):
        generate(gpt2, torch.ones(1, 500, dtype=torch.long), max_new_tokens=20)
