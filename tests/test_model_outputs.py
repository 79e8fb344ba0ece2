"""The Hugging Face output convention: outputs as dicts with attributes, and `fit` using any model's own loss."""
import io
import math

import pytest
import torch
import torch.nn as nn

from tinytune.models.loss import causal_lm_loss
from tinytune.models.outputs import CausalLMOutput
from tinytune.train import TrainConfig, fit
from tinytune.train import forward as forward_mod


def test_output_reads_as_attributes_keys_and_a_tuple_of_the_set_fields():
    loss, logits = torch.tensor(1.5), torch.zeros(1, 2, 3)
    out = CausalLMOutput(loss=loss)
    assert out.loss is loss and out.logits is None and "logits" not in out and out[0] is loss
    assert CausalLMOutput(loss=loss, logits=logits).to_tuple() == (loss, logits)
    with pytest.raises(TypeError, match=r"no field\(s\) \['hidden'\]"):
        CausalLMOutput(hidden=logits)
    with pytest.raises(AttributeError, match="has no attribute 'past'"):
        _ = out.past


def _data(n=12, vocab=64):
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, vocab, (5 + i % 4,), generator=gen).tolist() for i in range(n)]
    return [{"input_ids": r, "labels": [-100] + r[1:]} for r in rows]


class MeanLossLM(nn.Module):
    """A model that takes labels but averages over its own batch only (no num_items_in_batch)."""

    def __init__(self, vocab=64):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(vocab, 16), nn.Linear(16, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(self.embed(input_ids))
        return logits if labels is None else {"loss": causal_lm_loss(logits, labels), "logits": logits}


def _losses(make, monkeypatch, own: bool):
    if not own:
        monkeypatch.setattr(forward_mod, "loss_kwargs", lambda model: set())
    cfg = TrainConfig(lr=1e-2, steps=3, batch_size=2, grad_accum=2, log_every=1000, pad_token_id=0)
    history = fit(make(), _data(), cfg, eval_data=_data(4), stream=io.StringIO())
    monkeypatch.undo()
    return torch.tensor(history.losses + history.eval_losses)


def test_a_model_averaging_its_own_batch_is_rescaled_to_the_steps_count(monkeypatch):
    assert forward_mod.loss_kwargs(MeanLossLM()) == {"labels"}
    own, plain = _losses(MeanLossLM, monkeypatch, True), _losses(MeanLossLM, monkeypatch, False)
    torch.testing.assert_close(own, plain, rtol=1e-5, atol=0)


def test_a_transformers_model_trains_through_its_own_loss_with_num_items_in_batch(monkeypatch):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)

    def make():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(cfg)

    assert forward_mod.loss_kwargs(make()) == {"labels", "num_items_in_batch"}
    own, plain = _losses(make, monkeypatch, True), _losses(make, monkeypatch, False)
    torch.testing.assert_close(own, plain, rtol=1e-5, atol=0)


def test_a_model_that_takes_labels_but_returns_no_loss_is_named():
    class NoLoss(MeanLossLM):
        def forward(self, input_ids, attention_mask=None, labels=None):
            return self.head(self.embed(input_ids))

    cfg = TrainConfig(lr=1e-2, steps=1, batch_size=2, log_every=1000, pad_token_id=0)
    with pytest.raises(ValueError, match="NoLoss.forward takes labels but returned no scalar loss"):
        fit(NoLoss(), _data(), cfg, stream=io.StringIO())


def test_assigning_a_field_changes_what_every_view_reads():
    out = CausalLMOutput(loss=torch.tensor(1.0))
    out.loss = out.loss + 100  # an auxiliary loss added the transformers way
    assert float(out["loss"]) == float(out[0]) == 101.0
    out.logits = torch.zeros(1)
    assert list(out) == ["loss", "logits"]
    out.logits = None
    assert "logits" not in out and out.logits is None


def test_int32_labels_fractional_counts_and_labels_outside_the_vocabulary():
    tt = pytest.importorskip("tinytune")
    model = tt.models.build("llama-tiny")
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    ref = model(ids, labels=ids).loss
    torch.testing.assert_close(model(ids, labels=ids.int(), return_logits=True).loss, ref, rtol=1e-6, atol=0)
    summed = model(ids, labels=ids, num_items_in_batch=2.5).loss  # divided as given, as transformers does
    torch.testing.assert_close(summed, ref * 10 / 2.5, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match=r"labels hold id 300, outside the vocabulary \[0, 256\)"):
        model(ids, labels=torch.full_like(ids, 300))


def test_a_prompt_scores_the_same_positions_as_the_bare_model_in_forward_fit_and_evaluate():
    """The soft prompt's virtual tokens add no scored position (nor does the caller's first token), so the
    loss is a mean over the count fit computes from the data: the logits path's mean, exactly."""
    tt = pytest.importorskip("tinytune")
    torch.manual_seed(0)
    model = tt.models.build("llama-tiny")
    tt.prompt.apply(model, tt.prompt.PromptConfig(num_virtual_tokens=3))
    ids = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(ids, labels=ids).loss, causal_lm_loss(model(ids), ids), rtol=1e-6, atol=0)
    data = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
    cfg = TrainConfig(lr=1e-9, steps=1, batch_size=4, log_every=1000)
    with torch.no_grad():
        expected = float(causal_lm_loss(model(ids), ids))
    assert tt.train.evaluate(model, data, cfg)["loss"] == pytest.approx(expected, rel=1e-6)
    assert fit(model, data, cfg, stream=io.StringIO()).losses[0] == pytest.approx(expected, rel=1e-6)


def test_accepts_loss_kwargs_false_opts_out_of_num_items_in_batch():
    class OptOut(MeanLossLM):
        accepts_loss_kwargs = False

        def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
            assert "num_items_in_batch" not in kwargs
            return super().forward(input_ids, attention_mask, labels)

    assert forward_mod.loss_kwargs(OptOut()) == {"labels"}
    cfg = TrainConfig(lr=1e-2, steps=2, batch_size=2, grad_accum=2, log_every=1000, pad_token_id=0)
    history = fit(OptOut(), _data(), cfg, stream=io.StringIO())
    assert all(math.isfinite(x) for x in history.losses)
