"""tt.rlhf.token_logprobs and tinytune.ops.linear_token_logprobs: equal to `log_softmax(logits).gather`
(values, entropies, gradients; padding; chunk sizes that do not divide the rows), gradcheck in float64,
and the logits fallback for other models.

Tolerances: fp32 values within atol 1e-5 (the brief's bound; the fused path sums in another order),
fp32 gradients within atol 1e-5 / rtol 1e-4, fp64 checks by gradcheck's defaults, bf16 autocast
within 1e-4 of the same bf16 logits taken through an fp32 log-softmax.
"""
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tinytune as tt
from tinytune.ops import LinearTokenLogprobsFunction, linear_token_logprobs

ATOL = 1e-5


def _lora_model(seed=0):
    """llama-tiny, LoRA rank 4 on every linear (not the head), B made non-zero so the adapter matters."""
    model = tt.models.build("llama-tiny", seed=seed).eval()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets="all-linear"))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    assert model.chunked_head_weight() is not None  # the chunked path is the one under test
    return model


def _batch(B=3, T=9, vocab=256, seed=0):
    """ids (B, T) and a mask with right padding on row 1 and left padding on row 2."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -3:] = 0
    mask[2, :2] = 0
    return ids, mask


def _naive(model, ids, mask=None):
    """The reference: full logits, fp32 log-softmax, gather; 0 where token t or t + 1 is padding."""
    kwargs = {} if mask is None else {"attention_mask": mask}
    out = model(ids, **kwargs)
    logits = (out if isinstance(out, torch.Tensor) else out.logits)[:, :-1].float()  # (B, T-1, V)
    logp = F.log_softmax(logits, -1)
    lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    if mask is not None:
        keep = mask[:, 1:].bool() & mask[:, :-1].bool()
        lp, ent = lp * keep, ent * keep
    return lp, ent


@pytest.mark.parametrize("chunk_size", [1, 4, 7, None])  # 24 rows per call: 7 does not divide them
@pytest.mark.parametrize("padded", [False, True])
def test_fused_values_and_entropy_match_logits(chunk_size, padded):
    model = _lora_model()
    ids, mask = _batch(B=3, T=8)
    mask = mask if padded else None
    with torch.no_grad():
        lp, ent = tt.rlhf.token_logprobs(model, ids, mask, chunk_size=chunk_size, return_entropy=True)
        want_lp, want_ent = _naive(model, ids, mask)
    assert lp.shape == ent.shape == (3, 7) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, want_lp, atol=ATOL, rtol=0)
    torch.testing.assert_close(ent, want_ent, atol=ATOL, rtol=0)
    if padded:  # padding positions are exactly 0
        assert lp[1, -3:].eq(0).all() and lp[2, :2].eq(0).all() and ent[2, :2].eq(0).all()
    lp_only = tt.rlhf.token_logprobs(model, ids, mask, chunk_size=chunk_size)
    torch.testing.assert_close(lp_only, lp, atol=0, rtol=0)


@pytest.mark.parametrize("train_head", [False, True])
def test_gradients_of_a_weighted_sum_match_logits_path(train_head):
    ids, mask = _batch(B=3, T=8)
    weights = torch.randn(3, 7)
    grads = []
    for fused in (True, False):
        model = _lora_model()
        model.lm_head.weight.requires_grad_(train_head)
        if fused:
            lp, ent = tt.rlhf.token_logprobs(model, ids, mask, chunk_size=5, return_entropy=True)
        else:
            lp, ent = _naive(model, ids, mask)
        ((lp * weights).sum() + 0.3 * ent.sum()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and ("lm_head.weight" in grads[0]) == train_head
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=ATOL, rtol=1e-4, msg=name)


@pytest.mark.parametrize("weight_grad", [True, False])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_gradcheck_float64(weight_grad, with_entropy):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 6, generator=gen, dtype=torch.float64).requires_grad_(weight_grad)
    targets = torch.randint(0, 13, (11,), generator=gen)
    targets[::3] = -100  # ignored rows: output 0, no gradient

    def fn(h, w):
        return LinearTokenLogprobsFunction.apply(h, w, targets, -100, 4, torch.float64, with_entropy)

    assert torch.autograd.gradcheck(fn, (hidden, weight))
    if with_entropy:  # the entropy alone (the log-probs' gradient arrives as None)
        assert torch.autograd.gradcheck(lambda h, w: fn(h, w)[1], (hidden, weight))


def test_ops_matches_plain_gather_with_leading_dims_and_ignored_rows():
    hidden, weight = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(19, 8, dtype=torch.float64)
    targets = torch.randint(0, 19, (2, 5))
    targets[0, 1] = -100
    lp, ent = linear_token_logprobs(hidden, weight, targets, chunk_size=3, return_entropy=True)
    logp = F.log_softmax(hidden @ weight.T, -1)
    want = logp.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1).masked_fill(targets == -100, 0)
    torch.testing.assert_close(lp, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(ent, (-(logp.exp() * logp).sum(-1)).masked_fill(targets == -100, 0),
                               atol=1e-12, rtol=0)


def test_autocast_bf16_matches_bf16_logits():
    hidden, weight = torch.randn(40, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_token_logprobs(hidden, weight, targets, chunk_size=16)
        logits = hidden @ weight.T  # bf16 under autocast
    want = F.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


class _PlainLM(nn.Module):
    """Not a CausalLM: embedding + linear, returning logits (or an HF-like object with .logits)."""

    def __init__(self, vocab=31, d=8, wrap=False):
        super().__init__()
        self.emb, self.head, self.wrap = nn.Embedding(vocab, d), nn.Linear(d, vocab), wrap

    def forward(self, input_ids, attention_mask=None):
        logits = self.head(torch.tanh(self.emb(input_ids)))  # (B, T, V)
        return types.SimpleNamespace(logits=logits) if self.wrap else logits


@pytest.mark.parametrize("wrap", [False, True])
def test_fallback_on_a_module_returning_logits(wrap):
    model = _PlainLM(wrap=wrap)
    ids, mask = _batch(B=3, T=6, vocab=31)
    lp, ent = tt.rlhf.token_logprobs(model, ids, mask, return_entropy=True)
    want_lp, want_ent = _naive(model, ids, mask)
    torch.testing.assert_close(lp, want_lp, atol=ATOL, rtol=0)
    torch.testing.assert_close(ent, want_ent, atol=ATOL, rtol=0)
    lp.sum().backward()
    assert model.head.weight.grad is not None
    no_mask = tt.rlhf.token_logprobs(model, ids)  # called without attention_mask
    torch.testing.assert_close(no_mask, _naive(model, ids)[0], atol=ATOL, rtol=0)


def test_lora_on_the_head_takes_the_logits_path_with_the_same_values():
    model = _lora_model()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["lm_head"]))
    assert model.chunked_head_weight() is None
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(tt.rlhf.token_logprobs(model, ids, mask), _naive(model, ids, mask)[0],
                                   atol=ATOL, rtol=0)


def test_bad_inputs_are_named():
    model = _lora_model()
    ids, mask = _batch()
    with pytest.raises(ValueError, match=r"integer \(B, T\) tensor with T >= 2, got \(9,\)"):
        tt.rlhf.token_logprobs(model, ids[0])
    with pytest.raises(ValueError, match=r"T >= 2, got \(3, 1\)"):
        tt.rlhf.token_logprobs(model, ids[:, :1])
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, T\) = \(3, 9\).*got \(3, 8\)"):
        tt.rlhf.token_logprobs(model, ids, mask[:, 1:])
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1 or None, got 0"):
        tt.rlhf.token_logprobs(model, ids, chunk_size=0)
    with pytest.raises(TypeError, match=r"\(B, T, V\) logits or an object with .logits, got Tensor \(3, 9\)"):
        tt.rlhf.token_logprobs(lambda x, **kw: x.float(), ids)
    with pytest.raises(ValueError, match=r"targets \(4,\)"):
        linear_token_logprobs(torch.randn(5, 4), torch.randn(7, 4), torch.zeros(4, dtype=torch.long))
