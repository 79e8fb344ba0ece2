"""Classification heads (tinytune.models.heads) and the classification / token-classification losses of fit."""
import io

import pytest
import torch
import torch.nn.functional as F

import tinytune as tt
import tinytune.train
from tinytune.models import SequenceClassifier, TokenClassifier, hidden_states
from tinytune.train import TrainConfig, fit
from tinytune.train.losses import classification_loss, token_classification_loss


def _decoder():
    return tt.models.build("llama-tiny")


def _padded(side: str):
    """Three rows of 7, 5 and 3 real tokens, padded on `side` with pad id 0."""
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (7, 5, 3)]
    ids, mask = torch.zeros(3, 7, dtype=torch.long), torch.zeros(3, 7, dtype=torch.long)
    for i, row in enumerate(rows):
        where = slice(0, len(row)) if side == "right" else slice(7 - len(row), 7)
        ids[i, where], mask[i, where] = torch.tensor(row), 1
    return rows, ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_hidden_states_mirror_forward_exactly(side):
    decoder = _decoder()
    _, ids, mask = _padded(side)
    for m in (mask, None):
        assert torch.equal(decoder.lm_head(hidden_states(decoder, ids, m)), decoder(ids, attention_mask=m))


def test_hidden_states_mirror_forward_with_learned_positions_and_lora():
    decoder = tt.models.build("gpt2-tiny")
    tt.lora.apply(decoder, tt.lora.LoraConfig(rank=2, targets="all-linear", init="gaussian"))
    _, ids, mask = _padded("left")
    assert torch.equal(decoder.lm_head(hidden_states(decoder, ids, mask)), decoder(ids, attention_mask=mask))


def test_shapes_and_hf_parameter_names():
    ids = torch.randint(0, 256, (2, 5))
    seq, tok = SequenceClassifier(_decoder(), 3), TokenClassifier(_decoder(), 4)
    assert seq(ids).shape == (2, 3) and tok(ids).shape == (2, 5, 4)
    names = dict(seq.named_parameters())
    assert "score.weight" in names and "model.layers.0.self_attn.q_proj.weight" in names
    assert not any(n.startswith("lm_head") for n in names)  # the LM head is not part of the classifier
    assert "classifier.bias" in dict(tok.named_parameters())


@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_classifier_reads_each_rows_last_real_token(side):
    clf = SequenceClassifier(_decoder(), 3)
    rows, ids, mask = _padded(side)
    logits = clf(ids, attention_mask=mask)
    for i, row in enumerate(rows):  # each row alone, unpadded: its last position
        alone = clf.score(hidden_states(clf.decoder, torch.tensor([row]))[:, -1])
        torch.testing.assert_close(logits[i], alone[0], atol=1e-5, rtol=1e-5)


def test_left_and_right_padding_agree():
    clf = SequenceClassifier(_decoder(), 2)
    (_, r_ids, r_mask), (_, l_ids, l_mask) = _padded("right"), _padded("left")
    torch.testing.assert_close(clf(r_ids, r_mask), clf(l_ids, l_mask), atol=1e-5, rtol=1e-5)


def test_head_errors_name_the_value():
    with pytest.raises(ValueError, match="num_labels must be an int >= 1, got 0"):
        SequenceClassifier(_decoder(), 0)
    with pytest.raises(TypeError, match="expects a tinytune.models.CausalLM, got Linear"):
        TokenClassifier(torch.nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match=r"attention_mask must be \(batch, seq\) = \(2, 5\)"):
        SequenceClassifier(_decoder(), 2)(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 1, 5, 5).bool())


def test_lora_on_a_head_trains_adapters_and_the_head():
    clf = SequenceClassifier(_decoder(), 2)
    names = tt.lora.apply(clf, tt.lora.LoraConfig(rank=2, targets="all-linear"))
    assert "score" not in names and clf.score.weight.requires_grad  # the head declares itself: trained whole
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and all("lora" in n or n == "score.weight" for n in trainable)
    assert tt.count_parameters(clf).trainable == sum(p.numel() for p in clf.parameters() if p.requires_grad)


def test_losses_match_manual_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits, label = torch.randn(4, 3, generator=gen), torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(classification_loss(logits, label), F.cross_entropy(logits, label))
    torch.testing.assert_close(classification_loss(logits, label, 8), F.cross_entropy(logits, label) / 2)
    tok_logits = torch.randn(2, 5, 4, generator=gen)
    labels = torch.tensor([[1, -100, 3, 0, -100], [2, 2, -100, -100, -100]])
    keep = labels != -100
    manual = F.cross_entropy(tok_logits[keep], labels[keep])  # no shift: position i scores label i
    torch.testing.assert_close(token_classification_loss(tok_logits, labels), manual)


def _cls_data(n=32):
    """The label is told by the first token (10 or 11); the head reads the last (EOS), so must look back."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        label = int(torch.randint(0, 2, (1,), generator=gen))
        ids = [10 + label] + torch.randint(12, 256, (2 + i % 4,), generator=gen).tolist() + [2]
        out.append({"input_ids": ids, "label": label})
    return out


def _lora_head(cls, num_labels):
    torch.manual_seed(1)  # the head and LoRA init draw from the global generator
    head = cls(_decoder(), num_labels)
    tt.lora.apply(head, tt.lora.LoraConfig(rank=4, alpha=8, targets="all-linear"))
    getattr(head, "score" if cls is SequenceClassifier else "classifier").requires_grad_(True)
    return head


def _cfg(**kw):
    return TrainConfig(**{"lr": 1e-2, "steps": 2, "batch_size": 8, "log_every": 1000, "shuffle": False, **kw})


def test_classification_loss_in_fit_and_evaluate():
    data = _cls_data(8)
    clf = _lora_head(SequenceClassifier, 2)
    cfg = _cfg(task="classification")
    batch = tt.data.pad_batch(data, 0)
    with torch.no_grad():
        expected = F.cross_entropy(clf(batch["input_ids"], batch["attention_mask"]), batch["label"])
    assert tt.train.evaluate(clf, data, cfg)["loss"] == pytest.approx(float(expected), rel=1e-5)
    history = fit(clf, data, cfg, stream=io.StringIO())
    assert history.losses[0] == pytest.approx(float(expected), rel=1e-5)


def test_token_classification_loss_in_fit_has_no_shift():
    tok = _lora_head(TokenClassifier, 3)
    data = [{"input_ids": [5, 6, 7, 8], "labels": [0, -100, 2, 1]}, {"input_ids": [9, 10], "labels": [1, 1]}]
    batch = tt.data.pad_batch(data, 0)
    with torch.no_grad():
        logits = tok(batch["input_ids"], batch["attention_mask"])
    keep = batch["labels"] != -100
    expected = F.cross_entropy(logits[keep], batch["labels"][keep])
    cfg = _cfg(task="token_classification", steps=1)
    assert tt.train.evaluate(tok, data, cfg)["loss"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("task", ["classification", "token_classification"])
def test_grad_accumulation_is_the_same_step(task):
    if task == "classification":
        data, make = _cls_data(8), lambda: _lora_head(SequenceClassifier, 2)
    else:  # unequal scored counts per micro-batch: the mean is over the whole step's scored tokens
        data = [{"input_ids": list(range(3, 3 + n)), "labels": [i % 3 if i % 2 == 0 else -100 for i in range(n)]}
                for n in (2, 7, 3, 6, 4, 5, 8, 2)]
        make = lambda: _lora_head(TokenClassifier, 3)  # noqa: E731
    one, two = make(), make()
    h1 = fit(one, data, _cfg(task=task, batch_size=8, grad_accum=1), stream=io.StringIO())
    h2 = fit(two, data, _cfg(task=task, batch_size=4, grad_accum=2), stream=io.StringIO())
    assert h1.losses == pytest.approx(h2.losses, rel=1e-5)
    for (n, a), b in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=n)


def test_fit_errors_name_the_task():
    with pytest.raises(ValueError, match=r"TrainConfig.task='regression' is not one of"):
        TrainConfig(task="regression")
    clf = _lora_head(SequenceClassifier, 2)
    with pytest.raises(ValueError, match=r"train_data\[0\] must be a dict with 'input_ids' and 'label'"):
        fit(clf, [{"input_ids": [1, 2], "labels": [1, 2]}], _cfg(task="classification"))
    with pytest.raises(ValueError, match=r"train_data\[0\]: 'label' must be a class id"):
        fit(clf, [{"input_ids": [1, 2], "label": "pos"}], _cfg(task="classification"))
    with pytest.raises(ValueError, match=r"must return logits of shape \(batch, num_labels\)"):
        fit(_lora_head(TokenClassifier, 2), _cls_data(4), _cfg(task="classification"))


def test_short_fit_learns_a_classification_task():
    train, test = _cls_data(64), _cls_data(96)[64:]
    clf = _lora_head(SequenceClassifier, 2)

    def acc(examples):
        batch = tt.data.pad_batch(examples, 0)
        with torch.no_grad():
            pred = clf(batch["input_ids"], batch["attention_mask"]).argmax(-1)
        return tt.data.accuracy(pred, batch["label"])

    before = acc(test)
    fit(clf, train, _cfg(task="classification", steps=40, batch_size=16, shuffle=True), stream=io.StringIO())
    assert acc(test) >= 0.9 > before


def test_a_soft_prompt_on_the_decoder_acts_on_the_classifier_and_trains_with_it(tmp_path):
    """Heads run the decoder's own forward, so methods hooking it (prompt, prefix tuning) are not skipped,
    and a head built after the method registers its module, so `fit` and `save_adapter` see it."""
    ids = torch.randint(4, 256, (2, 7))
    reference = SequenceClassifier(tt.models.build("llama-tiny"), num_labels=3)
    before = reference(ids)
    decoder = tt.models.build("llama-tiny")
    tt.prompt.apply(decoder, tt.prompt.PromptConfig(num_virtual_tokens=4))
    clf = SequenceClassifier(decoder, num_labels=3)
    clf.score.load_state_dict(reference.score.state_dict())  # the same head as the reference
    assert not torch.allclose(clf(ids), before, atol=1e-4)
    with tt.prompt.disabled(decoder):
        torch.testing.assert_close(clf(ids), before, atol=1e-5, rtol=0)
    prompt = decoder.prompt_encoder.embedding.detach().clone()
    data = [{"input_ids": [5 + k, 6, 7], "label": k % 3} for k in range(6)]
    fit(clf, data, TrainConfig(task="classification", lr=1e-2, steps=2, batch_size=3, log_every=100),
        stream=io.StringIO())
    assert not torch.equal(decoder.prompt_encoder.embedding, prompt)  # the prompt trained with the head


def test_a_method_applied_after_the_head_is_refused_with_the_reason():
    decoder = tt.models.build("llama-tiny")
    clf = TokenClassifier(decoder, num_labels=2)
    tt.prefix.apply(decoder, tt.prefix.PrefixConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="prefix_encoder after this head was built.*before building the head"):
        clf(torch.randint(4, 256, (1, 5)))


def test_heads_compute_their_loss_from_labels_as_transformers_heads_do():
    _, ids, mask = _padded("right")
    clf = SequenceClassifier(_decoder(), 3, label_names=["neg", "neu", "pos"])
    label = torch.tensor([0, 2, 1])
    out = clf(ids, mask, labels=label)
    torch.testing.assert_close(out.logits, clf(ids, mask))
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, label), rtol=1e-6, atol=0)
    assert float(clf(ids, mask, labels=label, num_items_in_batch=6).loss) == pytest.approx(float(out.loss) / 2, rel=1e-6)
    tagger = TokenClassifier(_decoder(), 4)
    tags = torch.randint(0, 4, (3, 7), generator=torch.Generator().manual_seed(3)).masked_fill(mask == 0, -100)
    out = tagger(ids, mask, labels=tags)
    expected = F.cross_entropy(out.logits.reshape(-1, 4), tags.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)
    assert out[0] is out.loss and out["logits"] is out.logits


def test_head_labels_and_label_names_are_checked():
    _, ids, mask = _padded("right")
    clf = SequenceClassifier(_decoder(), 2)
    with pytest.raises(ValueError, match=r"labels hold ids outside \[0, 2\) \(min 0, max 5\)"):
        clf(ids, mask, labels=torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match=r"labels must be an int64/int32 tensor of shape \(3,\)"):
        clf(ids, mask, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="label_names must be 2 distinct non-empty strings"):
        SequenceClassifier(_decoder(), 2, label_names=["a", "a"])
    tagger = TokenClassifier(_decoder(), 3, label_names=["O", "B-PER", "I-PER"])
    assert tagger.label_names == ("O", "B-PER", "I-PER")
    with pytest.raises(ValueError, match="-100 marks an unscored position"):
        tagger(ids, mask, labels=torch.full((3, 7), 3))
