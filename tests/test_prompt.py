"""Prompt tuning (tinytune.peft.prompt): outputs on the real positions equal running the base on
[prompt; embeddings], only the prompt trains (through `fit`, with gradient checkpointing too), exact
counts, bitwise state-dict round trips, `disabled()` is the base, KV-cache generation (cached ==
uncached, left padding == one by one), packed == unpacked, every error, and interop with Hugging Face
`peft` (same logits and loss; adapter files both ways; our hooks on a transformers model, generate included).
Tolerances: fp32; 1e-5 where only the op order differs (measured 0.0 against peft); bitwise otherwise."""
import copy
import io
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import tinytune as tt
from conftest import TinyLM
from tinytune.peft import prefix, prompt
from tinytune.train import TrainConfig, evaluate, fit

P = 3


def _model(preset="llama-tiny", n=P, **kw):
    model = tt.models.build(preset)
    prompt.apply(model, prompt.PromptConfig(num_virtual_tokens=n, **kw))
    return model


def _data(n=16):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        start = int(torch.randint(0, 16, (1,), generator=g))
        ids = [(start + k) % 16 for k in range(6 + i % 5)]
        out.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return out


def _cfg(**kw):
    return TrainConfig(**{"lr": 1e-2, "steps": 3, "batch_size": 4, "log_every": 1000, **kw})


def _left_padded(lengths, vocab=256):
    width = max(lengths)
    ids, mask = torch.zeros(len(lengths), width, dtype=torch.long), torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(1, vocab, (n,))
        mask[row, width - n:] = 1
    return ids, mask


def _greedy(model, ids, new):
    """Greedy decoding without a cache: the whole sequence through the model each step."""
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat((ids, model(ids)[:, -1].argmax(-1)[:, None]), dim=1)
    return ids


class EmbedsLM(nn.Module):
    """A user's own module taking inputs_embeds: embedding, one masked causal attention, head."""

    def __init__(self, vocab=32, d=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.qkv, self.head = nn.Linear(d, 3 * d), nn.Linear(d, vocab)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        T = h.shape[1]
        allowed = torch.ones(T, T, dtype=torch.bool).tril()[None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, :].bool() | torch.eye(T, dtype=torch.bool)
        return self.head(h + F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))


# ---------------------------------------------------------------------------------------- maths


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
def test_real_positions_equal_the_base_on_prompt_then_embeddings(preset):
    model = _model(preset)
    ids, mask = _left_padded([7, 4])
    E = prompt.soft_prompt(model).embedding
    with torch.no_grad():
        got = model(ids, attention_mask=mask)
        hidden = model(ids, attention_mask=mask, return_hidden=True)
        with prompt.disabled(model):
            full = torch.cat((E[None].expand(2, -1, -1), model.model.embed_tokens(ids)), dim=1)
            want = model(inputs_embeds=full, attention_mask=torch.cat((torch.ones(2, P, dtype=torch.long), mask), 1))
    assert got.shape == (2, 7, 256) and hidden.shape == (2, 7, 64)
    assert torch.equal(got, want[:, P:])
    torch.testing.assert_close(model.lm_head(hidden), got, rtol=1e-5, atol=1e-5)
    with prompt.disabled(model), torch.no_grad():
        assert (got - model(ids, attention_mask=mask)).abs().max() > 1e-3  # the prompt changes the output


def test_any_module_with_inputs_embeds():
    torch.manual_seed(0)
    model = EmbedsLM()
    ids, mask = _left_padded([6, 3], vocab=32)
    assert prompt.apply(model, prompt.PromptConfig(num_virtual_tokens=2)) == ["prompt_encoder"]
    with torch.no_grad():
        got = model(ids, attention_mask=mask)
        with prompt.disabled(model):
            E = prompt.soft_prompt(model).embedding[None].expand(2, -1, -1)
            want = model(inputs_embeds=torch.cat((E, model.embed(ids)), 1),
                         attention_mask=torch.cat((torch.ones(2, 2, dtype=torch.long), mask), 1))[:, 2:]
    assert torch.equal(got, want)
    history = fit(model, [{"input_ids": [i % 32 for i in range(j, j + 8)], "labels": [-100] + list(range(j + 1, j + 8))}
                          for j in range(8)], _cfg(), stream=io.StringIO())
    assert len(history.losses) == 3 and all(x == x for x in history.losses)


def test_packed_rows_score_like_unpacked_ones():
    model, data = _model(), _data(10)
    with torch.no_grad():
        prompt.soft_prompt(model).embedding.mul_(0.05)
    packed = tt.data.pack_examples(data, max_length=40)
    assert len(packed) < len(data)
    cfg = _cfg()
    assert evaluate(model, packed, cfg)["loss"] == pytest.approx(evaluate(model, data, cfg)["loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fit_moves_only_the_prompt(checkpointing):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = fit(model, _data(), _cfg(grad_checkpointing=checkpointing), stream=io.StringIO())
    assert len(history.losses) == 3 and all(x == x for x in history.losses)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"prompt_encoder.embedding"}


def test_gradient_checkpointing_gives_the_same_prompt_gradient():
    def grad(checkpointing):
        torch.manual_seed(0)  # the same prompt both times
        model = _model()
        model.set_gradient_checkpointing(checkpointing)
        model.train()
        model(torch.arange(12)[None] % 7).logsumexp(-1).mean().backward()
        return prompt.soft_prompt(model).embedding.grad

    plain, ckpt = grad(False), grad(True)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-7)


def test_counts_are_p_times_d():
    base = tt.count_parameters(tt.models.build("llama-tiny")).total
    model = _model(n=5)
    pc = tt.count_parameters(model)
    assert (pc.trainable, pc.total) == (5 * 64, base + 5 * 64)


def test_bf16_base_keeps_an_fp32_prompt():
    model = tt.models.build("llama-tiny", dtype=torch.bfloat16)
    prompt.apply(model, prompt.PromptConfig(num_virtual_tokens=2))
    assert prompt.soft_prompt(model).embedding.dtype == torch.float32
    assert model(torch.randint(0, 256, (1, 4))).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------- init


class CharTokenizer:
    def encode(self, text):
        return [ord(c) % 256 for c in text]


@pytest.mark.parametrize("n,want", [(7, [97, 98, 99, 97, 98, 99, 97]), (2, [97, 98])])
def test_text_init_repeats_or_cuts_the_text_as_peft(n, want):
    model = tt.models.build("llama-tiny")
    cfg = prompt.PromptConfig(num_virtual_tokens=n, init_text="abc")
    assert cfg.init == "text"
    prompt.apply(model, cfg, tokenizer=CharTokenizer())
    assert torch.equal(prompt.soft_prompt(model).embedding, model.model.embed_tokens.weight[want])


def test_vocab_and_random_inits():
    model = _model(n=6, init="vocab")
    rows = model.model.embed_tokens.weight
    for row in prompt.soft_prompt(model).embedding:
        assert (rows == row).all(-1).any()
    E = prompt.soft_prompt(_model(n=64)).embedding  # random: N(0, 1), as PEFT's nn.Embedding
    assert 0.8 < float(E.detach().std()) < 1.2


# ---------------------------------------------------------------------------------------- state


def test_state_dict_round_trip_is_bitwise():
    a, b = _model(), _model()
    with torch.no_grad():
        prompt.soft_prompt(a).embedding.normal_()
    sd = prompt.state_dict(a)
    assert list(sd) == ["prompt_embeddings"] and sd["prompt_embeddings"].shape == (P, 64)
    assert prompt.load_state_dict(b, sd) == ([], [])
    assert torch.equal(prompt.soft_prompt(b).embedding, sd["prompt_embeddings"])
    ids = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


def test_disabled_is_the_base_bit_for_bit():
    base = tt.models.build("llama-tiny")
    ids, mask = _left_padded([6, 3])
    with torch.no_grad():
        want = base(ids, attention_mask=mask)
    gen_want = tt.generate(base, ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
    model = _model()
    with prompt.disabled(model), torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask), want)
        assert torch.equal(tt.generate(model, ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[]), gen_want)
    with torch.no_grad():
        assert not torch.equal(model(ids, attention_mask=mask), want)


# ---------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-tiny"])
def test_cached_generation_equals_uncached(preset):
    model = _model(preset)
    ids = torch.randint(0, 256, (2, 5))
    assert torch.equal(tt.generate(model, ids, max_new_tokens=6, eos_token_id=[]), _greedy(model, ids, 6))


def test_left_padded_batch_equals_one_by_one():
    model = _model()
    ids, mask = _left_padded([7, 3, 5])
    batch = tt.generate(model, ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[])
    for row in range(3):
        alone = ids[row][mask[row].bool()][None]  # (1, n): the row without its padding
        one = tt.generate(model, alone, max_new_tokens=5, eos_token_id=[])
        assert torch.equal(batch[row, 7 - alone.shape[1]:], one[0])


def test_learned_positions_count_the_virtual_tokens():
    model = tt.models.build("gpt2-tiny", max_position_embeddings=12)
    prompt.apply(model, prompt.PromptConfig(num_virtual_tokens=4))
    with pytest.raises(ValueError, match="4 virtual tokens = 13 exceeds max_position_embeddings=12"):
        tt.generate(model, torch.ones(1, 5, dtype=torch.long), max_new_tokens=4)


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens must be an integer >= 1"),
    (dict(num_virtual_tokens=2.0), "num_virtual_tokens must be an integer >= 1"),
    (dict(init="zeros"), r"init='zeros' is not one of \('random', 'vocab', 'text'\)"),
    (dict(init="text"), "init='text' needs a non-empty init_text"),
    (dict(init="vocab", init_text="hi"), "init_text is given but init='vocab'"),
])
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prompt.PromptConfig(**kwargs)


def test_apply_errors():
    model = _model()
    with pytest.raises(ValueError, match="already has prompt tuning applied"):
        prompt.apply(model, prompt.PromptConfig())
    with pytest.raises(ValueError, match="already has prompt tuning applied"):
        prefix.apply(model, prefix.PrefixConfig())
    with pytest.raises(TypeError, match="TinyLM.forward has no 'input_ids', 'inputs_embeds'"):
        prompt.apply(TinyLM(), prompt.PromptConfig())
    with pytest.raises(TypeError, match="expects a prompt.PromptConfig, got PrefixConfig"):
        prompt.apply(tt.models.build("llama-tiny"), prefix.PrefixConfig())
    with pytest.raises(ValueError, match="init='text' needs the tokenizer"):
        prompt.apply(tt.models.build("llama-tiny"), prompt.PromptConfig(init_text="hello"))
    with pytest.raises(ValueError, match="token id 299, beyond the vocabulary"):
        prompt.apply(tt.models.build("llama-tiny"), prompt.PromptConfig(init_text="\u012b"),
                     tokenizer=CharTokenizerWide())
    for call in (prompt.state_dict, lambda m: prompt.disabled(m).__enter__()):
        with pytest.raises(ValueError, match="has no soft prompt; call prompt.apply"):
            call(tt.models.build("llama-tiny"))


class CharTokenizerWide:
    def encode(self, text):
        return [ord(c) for c in text]


def test_load_state_dict_errors_name_the_keys():
    model = _model()
    good = prompt.state_dict(_model())
    with pytest.raises(ValueError, match=r"mis-shaped 'prompt_embeddings': given \(4, 64\), model \(3, 64\)"):
        prompt.load_state_dict(model, {"prompt_embeddings": torch.zeros(4, 64)})
    with pytest.raises(ValueError, match=r"missing keys: \['prompt_embeddings'\]"):
        prompt.load_state_dict(model, {})
    with pytest.raises(ValueError, match=r"unexpected keys: \['extra'\]"):
        prompt.load_state_dict(model, {**good, "extra": torch.zeros(1)})
    assert prompt.load_state_dict(model, {**good, "extra": torch.zeros(1)}, strict=False) == ([], ["extra"])


def test_a_float_four_d_mask_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="boolean 4-D"):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.zeros(1, 1, 4, 4))


# ---------------------------------------------------------------------------------------- PEFT format


def test_peft_config_round_trip_and_errors():
    model = _model(n=4)
    d = prompt.peft_config_dict(model)
    assert {k: d[k] for k in ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_layers",
                              "num_attention_heads", "num_transformer_submodules", "prompt_tuning_init")} == {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "token_dim": 64,
        "num_layers": 2, "num_attention_heads": 4, "num_transformer_submodules": 1, "prompt_tuning_init": "RANDOM"}
    assert prompt.config_from_peft(json.loads(json.dumps(d))) == prompt.PromptConfig(num_virtual_tokens=4)
    for bad, match in [({"peft_type": "LORA"}, "expected 'PROMPT_TUNING'"),
                       ({"r": 8}, r"unknown PROMPT_TUNING config fields \['r'\]"),
                       ({"task_type": "SEQ_2_SEQ_LM"}, "task_type='SEQ_2_SEQ_LM'"),
                       ({"num_transformer_submodules": 2}, "num_transformer_submodules=2"),
                       ({"prompt_tuning_init": "ZEROS"}, "prompt_tuning_init='ZEROS'")]:
        with pytest.raises(ValueError, match=match):
            prompt.config_from_peft({**d, **bad})


# ---------------------------------------------------------------------------------------- interop with peft


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(path)
    return hf, path


def _peft_prompt(hf, peft, n=4):
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
    return peft.get_peft_model(copy.deepcopy(hf), cfg).eval()


def test_logits_and_loss_match_peft(hf_checkpoint):
    peft = pytest.importorskip("peft")
    hf, path = hf_checkpoint
    theirs = _peft_prompt(hf, peft)
    ours, _ = tt.load_pretrained(path)
    prompt.apply(ours, prompt.PromptConfig(num_virtual_tokens=4))
    on_hf = copy.deepcopy(hf)  # our hooks on the transformers model itself
    prompt.apply(on_hf, prompt.PromptConfig(num_virtual_tokens=4))
    sd = peft.get_peft_model_state_dict(theirs)
    prompt.load_state_dict(ours, sd)
    prompt.load_state_dict(on_hf, sd)
    ids = torch.randint(0, 96, (2, 7))
    labels = ids.clone()
    labels[:, :2] = -100
    with torch.no_grad():
        want = theirs(input_ids=ids, labels=labels)
        got_hf = on_hf(input_ids=ids, labels=labels)
        torch.testing.assert_close(ours(ids), want.logits[:, 4:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_hf.logits, want.logits[:, 4:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_hf.loss, want.loss, rtol=1e-6, atol=1e-6)
        assert (want.logits[:, 4:] - hf(ids).logits).abs().max() > 1e-3  # the prompt matters
        # peft's own generate disagrees with its forward under transformers 5.x: compare uncached greedy
        greedy_theirs = _greedy(lambda x: theirs(input_ids=x).logits, ids, 5)
    assert torch.equal(tt.generate(ours, ids, max_new_tokens=5, eos_token_id=[]), greedy_theirs)
    assert torch.equal(on_hf.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None,
                                      pad_token_id=0), greedy_theirs)


def test_hf_generate_with_our_prompt_handles_left_padding(hf_checkpoint):
    hf, _ = hf_checkpoint
    model = copy.deepcopy(hf)
    prompt.apply(model, prompt.PromptConfig(num_virtual_tokens=3))
    ids, mask = _left_padded([6, 3], vocab=96)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    for row in range(2):
        alone = ids[row][mask[row].bool()][None]
        one = model.generate(alone, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(batch[row, 6 - alone.shape[1]:], one[0])


def test_adapter_files_load_both_ways(hf_checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    hf, path = hf_checkpoint
    ours, _ = tt.load_pretrained(path)
    prompt.apply(ours, prompt.PromptConfig(num_virtual_tokens=4, init="vocab"))
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "adapter_config.json").write_text(json.dumps(prompt.peft_config_dict(ours)))
    tensors = {k: v.contiguous() for k, v in prompt.state_dict(ours).items()}
    save_file(tensors, str(tmp_path / "ours" / "adapter_model.safetensors"))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ours")).eval()
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits[:, 4:], ours(ids), rtol=1e-5, atol=1e-5)

    theirs = _peft_prompt(hf, peft)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    fresh, _ = tt.load_pretrained(path)
    prompt.apply(fresh, prompt.config_from_peft(json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())))
    prompt.load_state_dict(fresh, load_file(str(tmp_path / "theirs" / "adapter_model.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), theirs(input_ids=ids).logits[:, 4:], rtol=1e-5, atol=1e-5)
