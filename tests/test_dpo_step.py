"""tinytune.rlhf.dpo_step (issue 11, DPO): completion-only log-probs of a preference batch, the reference as
the same model with its adapter disabled, and one DPO step's loss and metrics."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import tinytune as tt
from tinytune.rlhf import (adapters_disabled, completion_lengths, completion_logprobs, dpo_batch_loss,
                           preference_batch, reference_logprobs)

from text_fixtures import PAD, bpe_tokenizer, write_jsonl

CORPUS = ["the cat sat on the mat", "hello world, how are you?", "Paris is the capital of France"]


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer(CORPUS, vocab_size=256)


@pytest.fixture(scope="module")
def examples(tok, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("dpo") / "p.jsonl", [
        {"prompt": "the capital of France?", "chosen": " Paris", "rejected": " the mat"},
        {"prompt": "hello", "ranked": [" world", " how are you?", " cat sat"]}])
    return tt.data.load_preferences(path, tok)


def _base(tok):
    return tt.models.build("llama-tiny", vocab_size=tok.vocab_size, seed=0)  # every token id has a row


def _lora(model):
    tt.lora.apply(model, tt.lora.LoraConfig(rank=4, alpha=8, targets="all-linear"))
    return model


def _naive(model, example):
    """Each completion scored alone (no padding): the sum of log_softmax(logits) over its tokens only."""
    out, p = [], len(example["prompt_ids"])
    for completion in example["completion_ids"]:
        ids = torch.tensor([example["prompt_ids"] + completion])
        logp = F.log_softmax(model(ids).float(), dim=-1)[0]  # (T, V)
        out.append(sum(logp[t - 1, ids[0, t]] for t in range(p, ids.shape[1])))
    return torch.stack(out)


def test_preference_batch_labels_mark_the_completions_only(examples):
    for side in ("right", "left"):
        batch = preference_batch(examples, PAD, padding_side=side)
        rows = [s for e in examples for s in tt.data.preference_sequences(e)]
        for b, row in enumerate(rows):
            real = batch["labels"][b][batch["attention_mask"][b].bool()].tolist()
            assert real == row["labels"]  # -100 on the prompt, the completion's ids on it
            assert (batch["labels"][b][~batch["attention_mask"][b].bool()] == -100).all()  # and on padding


@pytest.mark.parametrize("side", ["right", "left"])
def test_completion_logprobs_equal_a_naive_per_row_sum_over_completion_tokens(tok, examples, side):
    model = _base(tok)
    batch = preference_batch(examples, PAD, padding_side=side)
    with torch.no_grad():
        got = completion_logprobs(model, batch, chunk_size=7)  # several chunks of the fused path
        want = torch.cat([_naive(model, e) for e in examples])
    assert got.shape == (5,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert completion_lengths(batch).tolist() == [len(c) for e in examples for c in e["completion_ids"]]


def test_first_step_loss_is_ln2_when_lora_starts_at_zero(tok, examples):
    model = _lora(_base(tok))
    loss, metrics = dpo_batch_loss(model, preference_batch(examples, PAD), beta=0.1)
    assert abs(loss.item() - math.log(2)) < 1e-6
    assert set(metrics) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                            "logps/chosen", "logps/rejected"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert abs(metrics["rewards/margins"]) < 1e-6 and metrics["logps/chosen"] < 0


def _train(model, batch, steps, ref=None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    history = []
    for _ in range(steps):
        loss, metrics = dpo_batch_loss(model, batch, beta=0.1, ref=ref)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(metrics)
    return history


def test_reference_is_the_frozen_base_even_after_training(tok, examples):
    model = _base(tok)
    frozen = copy.deepcopy(model).requires_grad_(False)
    _lora(model)
    batch = preference_batch(examples, PAD)
    _train(model, batch, steps=3)
    with torch.no_grad():
        want, policy = completion_logprobs(frozen, batch), completion_logprobs(model, batch)
    ref = reference_logprobs(model, batch)
    assert not ref.requires_grad
    torch.testing.assert_close(ref, want, atol=1e-6, rtol=0)
    assert (policy - ref).abs().max() > 1e-3  # the adapter did move the policy away from it


def test_adamw_steps_lower_the_loss_and_raise_the_margin(tok, examples):
    model = _lora(_base(tok))
    batch = preference_batch(examples, PAD)
    ref = reference_logprobs(model, batch)  # precomputed once, as a trainer would
    history = _train(model, batch, steps=8, ref=ref)
    final, _ = dpo_batch_loss(model, batch, ref=ref)
    assert final.item() < history[0]["loss"] - 0.05
    _, metrics = dpo_batch_loss(model, batch, ref=ref)
    assert metrics["rewards/margins"] > history[0]["rewards/margins"] + 0.1
    assert metrics["rewards/accuracies"] == 1.0


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "simpo"])
def test_other_loss_types_run_and_give_gradients(tok, examples, loss_type):
    model = _lora(_base(tok))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    loss, _ = dpo_batch_loss(model, preference_batch(examples, PAD), loss_type=loss_type)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_ia3_is_disabled_too(tok, examples):
    model = _base(tok)
    batch = preference_batch(examples, PAD)
    with torch.no_grad():
        want = completion_logprobs(model, batch)
        tt.ia3.apply(model, tt.ia3.IA3Config())
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.mul_(1.5)
        assert (completion_logprobs(model, batch) - want).abs().max() > 1e-3
        with adapters_disabled(model):
            torch.testing.assert_close(completion_logprobs(model, batch), want, atol=1e-6, rtol=0)


def test_a_model_without_adapter_and_bad_inputs_are_refused(tok, examples):
    model, batch = _base(tok), preference_batch(examples, PAD)
    with pytest.raises(ValueError, match="reference is the base model with the adapter disabled; apply a PEFT"):
        dpo_batch_loss(model, batch)
    with pytest.raises(ValueError, match="apply a PEFT method first"):
        with adapters_disabled(model):
            pass
    _lora(model)
    with pytest.raises(ValueError, match=r"ref must be the \(N,\) = \(5,\).*\(4,\)"):
        dpo_batch_loss(model, batch, ref=torch.zeros(4))
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(ValueError, match="needs 'labels'.*preference_batch"):
        completion_logprobs(model, no_labels)
