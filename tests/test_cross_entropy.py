"""tinytune.ops.linear_cross_entropy: equal to the plain loss (values, gradients, autocast), gradcheck, and
its use by `fit` (same losses as the logits path; fallback for a LoRA head)."""
import io

import pytest
import torch
import torch.nn.functional as F

import tinytune as tt
from tinytune.ops import LinearCrossEntropyFunction, linear_cross_entropy
from tinytune.train import TrainConfig, fit
from tinytune.train import forward as forward_mod
from tinytune.models import transformer as transformer_mod
from tinytune.train.losses import causal_lm_loss, causal_lm_loss_from_hidden


def _inputs(n=11, d=6, v=13, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=dtype)
    weight = torch.randn(v, d, generator=gen, dtype=dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::3] = -100  # some rows not scored
    return hidden, weight, labels


@pytest.mark.parametrize("weight_grad", [True, False])
def test_gradcheck_float64(weight_grad):
    hidden, weight, labels = _inputs()
    hidden.requires_grad_(True)
    weight.requires_grad_(weight_grad)
    fn = lambda h, w: LinearCrossEntropyFunction.apply(h, w, labels, -100, 4, torch.float64)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))


@pytest.mark.parametrize("weight_grad", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_plain_cross_entropy(weight_grad, reduction):
    hidden, weight, labels = _inputs(n=3 * 7, d=5, v=17)
    hidden, labels = hidden.reshape(3, 7, 5), labels.reshape(3, 7)  # leading dims are flattened
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_(weight_grad)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_(weight_grad)
    got = linear_cross_entropy(h1, w1, labels, reduction=reduction, chunk_size=4)
    want = F.cross_entropy((h2 @ w2.T).reshape(-1, 17), labels.reshape(-1), reduction=reduction)
    torch.testing.assert_close(got, want)
    got.backward()
    want.backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    if weight_grad:
        torch.testing.assert_close(w1.grad, w2.grad)
    else:
        assert w1.grad is None


def test_autocast_bf16_matches_plain_loss_under_autocast():
    hidden, weight, labels = _inputs(n=64, d=16, v=50, dtype=torch.float32)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h1, weight, labels, chunk_size=16)
        want = F.cross_entropy((h2 @ weight.T).float(), labels)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # same bf16 logits, fp32 log-softmax
    got.backward()
    want.backward()
    assert h1.grad.dtype == torch.float32
    torch.testing.assert_close(h1.grad, h2.grad, rtol=2e-2, atol=2e-3)  # bf16 rounding of (softmax - onehot)


def test_errors_name_the_value():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match="reduction must be one of .* got 'none'"):
        linear_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1, got 0"):
        linear_cross_entropy(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match=r"labels \(10,\)"):
        linear_cross_entropy(hidden, weight, labels[:10])


def test_causal_lm_loss_from_hidden_equals_the_logits_path():
    model = tt.models.build("llama-tiny")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100
    hidden = model(ids, return_hidden=True)
    torch.testing.assert_close(model.lm_head(hidden), model(ids))
    got = causal_lm_loss_from_hidden(hidden, model.chunked_head_weight(), labels, 7)
    torch.testing.assert_close(got, causal_lm_loss(model(ids), labels, 7))


def test_chunked_head_only_for_a_plain_linear_head():
    model = tt.models.build("llama-tiny")
    assert model.chunked_head_weight() is model.lm_head.weight
    handle = model.lm_head.register_forward_hook(lambda *a: None)
    assert model.chunked_head_weight() is None  # a hooked head: the logits path runs the hook
    handle.remove()
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["lm_head"]))
    assert model.chunked_head_weight() is None  # a LoRA head: the logits path


def test_forward_with_labels_equals_the_logits_loss_and_holds_no_logits():
    model = tt.models.build("llama-tiny")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(ids, labels=labels)
    assert out.logits is None and list(out) == ["loss"] and out[0] is out.loss and out["loss"] is out.loss
    torch.testing.assert_close(out.loss, causal_lm_loss(model(ids), labels), rtol=1e-6, atol=0)
    summed = model(ids, labels=labels, num_items_in_batch=40).loss  # sum / the step's count
    torch.testing.assert_close(summed, causal_lm_loss(model(ids), labels, 40), rtol=1e-6, atol=0)
    both = model(ids, labels=labels, return_logits=True)
    torch.testing.assert_close(both.logits, model(ids))
    torch.testing.assert_close(both.loss, out.loss, rtol=1e-6, atol=0)
    tt.lora.apply(model, tt.lora.LoraConfig(rank=2, targets=["lm_head"]))  # logits path inside forward
    torch.testing.assert_close(model(ids, labels=labels).loss, causal_lm_loss(model(ids), labels), rtol=1e-6, atol=0)


def test_forward_with_bad_labels_is_refused():
    model = tt.models.build("llama-tiny")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"shape \(batch, seq\) = \(2, 9\).*\(2, 3\)"):
        model(ids, labels=ids[:, :3])
    with pytest.raises(ValueError, match="int64/int32.*torch.float32"):
        model(ids, labels=ids.float())
    with pytest.raises(ValueError, match="logits_to_keep or return_hidden"):
        model(ids, labels=ids, logits_to_keep=1)
    with pytest.raises(ValueError, match="num_items_in_batch must be a positive"):
        model(ids, labels=ids, num_items_in_batch=0)


def _data(n=16):
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(0, 256, (6 + i % 5,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return out


METHODS = {
    "lora": lambda m: tt.lora.apply(m, tt.lora.LoraConfig(rank=4, alpha=8, targets="all-linear")),
    "prompt": lambda m: tt.prompt.apply(m, tt.prompt.PromptConfig(num_virtual_tokens=3)),
    "prefix": lambda m: tt.prefix.apply(m, tt.prefix.PrefixConfig(num_virtual_tokens=3)),
}


def _fit_losses(monkeypatch, fused: bool, method="lora", **cfg):
    if not fused:  # force the old path: logits + causal_lm_loss (as for a model whose forward takes no labels)
        monkeypatch.setattr(forward_mod, "loss_kwargs", lambda model: set())
    model = tt.models.build("llama-tiny")
    torch.manual_seed(1)
    METHODS[method](model)
    if fused:  # the model computes its own chunked loss (soft prompts and prefixes keep it)
        assert forward_mod.loss_kwargs(model) == {"labels", "num_items_in_batch"}
        assert model.chunked_head_weight() is not None
    cfg = TrainConfig(**{**dict(lr=1e-2, steps=4, batch_size=4, log_every=1000), **cfg})
    history = fit(model, _data(), cfg, eval_data=_data(6), stream=io.StringIO())
    monkeypatch.undo()
    return history.losses + history.eval_losses


@pytest.mark.parametrize("cfg", [{}, {"grad_accum": 2, "batch_size": 2}, {"method": "prompt"}, {"method": "prefix"}])
def test_fit_losses_equal_the_logits_path(monkeypatch, cfg):
    fused, plain = _fit_losses(monkeypatch, True, **cfg), _fit_losses(monkeypatch, False, **cfg)
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=1e-5, atol=0)


def test_fit_uses_the_chunked_loss_for_a_plain_head(monkeypatch):
    calls = []
    real = transformer_mod.causal_lm_loss_from_hidden
    monkeypatch.setattr(transformer_mod, "causal_lm_loss_from_hidden", lambda *a: calls.append(1) or real(*a))
    _fit_losses(monkeypatch, True, steps=1)
    assert calls
