"""Classification heads on the decoder body: one label per text, or one label per token.

    clf = SequenceClassifier(tt.models.build("llama-tiny"), num_labels=2)
    tt.lora.apply(clf, tt.lora.LoraConfig(targets="all-linear"))   # LoRA on the body; `score` trains whole
    logits = clf(input_ids, attention_mask=mask)                    # (B, num_labels)

Each head declares itself to the PEFT methods (`peft_modules_to_save`, `peft_task_type`): applying any
method keeps the new head trainable, and `tt.save_adapter` saves it with the adapter as PEFT's
`modules_to_save` (`base_model.model.score.weight`) under task_type "SEQ_CLS" / "TOKEN_CLS".

A head registers the decoder's body as `model` and its own linear as `score` (sequence) or
`classifier` (tokens), so parameter names are Hugging Face's `LlamaForSequenceClassification` ones
(`model.layers.0.self_attn.q_proj...`, `score.weight`). The decoder's `lm_head` is not registered:
it is neither run, moved, counted nor saved with the head.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .loss import classification_loss, token_classification_loss
from .outputs import SequenceClassifierOutput, TokenClassifierOutput
from .transformer import CausalLM, check_token_ids


def hidden_states(decoder: CausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """The final-norm hidden states of `decoder`: what `decoder.lm_head` would turn into logits.

    `decoder(ids, attention_mask=mask, return_hidden=True)`, so that
    `decoder.lm_head(hidden_states(decoder, ids, mask)) == decoder(ids, attention_mask=mask)` exactly, and
    methods that hook the decoder's forward (prompt and prefix tuning) apply to classification heads too.

    Args:
        decoder: a `CausalLM` (LoRA or other adapters applied to it are run as usual).
        input_ids: (B, T) token ids.
        attention_mask: (B, T), 1 for real tokens and 0 for padding (left or right); None: all real.

    Returns:
        (B, T, hidden_size) hidden states in the compute dtype.

    Raises:
        ValueError: input_ids not a 2-D integer tensor, an attention_mask that is not (B, T); and, from the
            decoder's forward, ids outside the vocabulary or more tokens than its positions.
    """
    check_token_ids(input_ids)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or tuple(attention_mask.shape) != tuple(input_ids.shape)):
        raise ValueError(f"attention_mask must be (batch, seq) = {tuple(input_ids.shape)} like input_ids, got "
                         f"{_shape(attention_mask)} (4-D masks of packed rows are not supported by heads)")
    # Through the decoder's own forward, so hooks on it (soft prompts, prefixes) act here too.
    return decoder(input_ids, attention_mask=attention_mask, return_hidden=True)


def _shape(value) -> tuple | str:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def last_token_index(attention_mask: torch.Tensor | None, batch: int, seq: int, device) -> torch.Tensor:
    """(B,) index of each row's last real token: works for right and left padding alike.

    With no mask every row is full and the index is `seq - 1`. A row with no real token gets `seq - 1`.
    """
    if attention_mask is None:
        return torch.full((batch,), seq - 1, dtype=torch.long, device=device)
    # The last 1 of a row is the first 1 of the reversed row; argmax finds the first maximum.
    from_end = attention_mask.flip(-1).to(torch.int8).argmax(-1)  # (B,)
    return seq - 1 - from_end


def _new_linear(decoder: CausalLM, num_labels: int, bias: bool, what: str) -> nn.Linear:
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"{what}: num_labels must be an int >= 1, got {num_labels!r}")
    ref = decoder.model.embed_tokens.weight
    layer = nn.Linear(decoder.config.hidden_size, num_labels, bias=bias, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():  # HF's init for these heads: N(0, initializer_range=0.02), bias 0
        layer.weight.normal_(0.0, 0.02)
        if bias:
            layer.bias.zero_()
    return layer


# Modules prompt / prefix tuning attach to a decoder; a head registers them so that they train with it.
_METHOD_MODULES = ("prompt_encoder", "prefix_encoder")


class _DecoderHead(nn.Module):
    """What both heads share: the decoder body registered as `model`, mode and checkpointing passed on."""

    def __init__(self, decoder: CausalLM, what: str):
        super().__init__()
        if not isinstance(decoder, CausalLM):
            raise TypeError(f"{what} expects a tinytune.models.CausalLM, got {type(decoder).__name__}")
        self.config = decoder.config
        self.model = decoder.model
        # A list hides the decoder from module registration (no lm_head in parameters or state_dict); it
        # shares `model` with this head, and its `_run_layers` is what runs the blocks.
        self._decoder = [decoder]
        for name in _METHOD_MODULES:  # the decoder's soft prompt / prefixes train with the head
            module = getattr(decoder, name, None)
            if isinstance(module, nn.Module):
                self.add_module(name, module)

    def _check_methods(self) -> None:
        for name in _METHOD_MODULES:
            module = getattr(self.decoder, name, None)
            if isinstance(module, nn.Module) and self._modules.get(name) is not module:
                raise ValueError(f"{type(self).__name__}: the decoder got a {name} after this head was built, so "
                                 "its parameters are not the head's (training and save_adapter would miss them): "
                                 "apply prompt or prefix tuning to the decoder before building the head")

    @property
    def name_or_path(self) -> str | None:
        """The checkpoint the decoder was loaded from (None when built from a config)."""
        return self.decoder.name_or_path

    @property
    def decoder(self) -> CausalLM:
        """The wrapped `CausalLM` (its body is this head's `model`)."""
        return self._decoder[0]

    def train(self, mode: bool = True):
        """Set train/eval mode here and on the decoder, whose `training` flag gates checkpointing."""
        super().train(mode)
        self.decoder.train(mode)
        return self

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether per-block activation checkpointing is on."""
        return self.decoder.is_gradient_checkpointing

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward (see `CausalLM.set_gradient_checkpointing`)."""
        self.decoder.set_gradient_checkpointing(enabled)


def last_hidden(decoder: CausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The decoder's final hidden state at each row's last real token (by the attention mask, so a pad id
    equal to EOS is harmless), (B, d): what sequence heads read."""
    h = hidden_states(decoder, input_ids, attention_mask)  # (B, T, d)
    B, T, _ = h.shape
    last = last_token_index(attention_mask, B, T, h.device)  # (B,)
    return h[torch.arange(B, device=h.device), last]  # (B, d)


class SequenceClassifier(_DecoderHead):
    """A text classifier: a linear `score` on the hidden state of each row's last real token.

    A causal decoder's last token is the only one that has seen the whole text (`load_classification`
    appends EOS so that it is the same token for every text). The row's last real token is found from
    `attention_mask`, so left and right padding give the same logits.

    Args:
        decoder: a `CausalLM`; its body is shared (not copied) and its `lm_head` is not used.
        num_labels: the number of classes.

        label_names: the class names, one per label id (saved with adapters, shown by evaluation); None.

    Forward:
        input_ids (B, T), attention_mask (B, T) or None -> logits (B, num_labels); with `labels` (B,)
        class ids a `SequenceClassifierOutput(loss, logits)` (loss: mean cross-entropy, or the sum over
        `num_items_in_batch`).

    Raises:
        TypeError: `decoder` is not a `CausalLM`.
        ValueError: num_labels < 1.
    """

    peft_task_type = "SEQ_CLS"
    peft_modules_to_save = ("score",)  # trained whole with any PEFT method, saved with the adapter

    def __init__(self, decoder: CausalLM, num_labels: int, label_names=None):
        super().__init__(decoder, "SequenceClassifier")
        self.num_labels = num_labels
        self.label_names = _check_label_names(label_names, num_labels, "SequenceClassifier")
        self.score = _new_linear(decoder, num_labels, bias=False, what="SequenceClassifier")  # bias-free as HF's

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels=None,
                num_items_in_batch=None):
        self._check_methods()
        logits = self.score(last_hidden(self.decoder, input_ids, attention_mask))  # (B, num_labels)
        if labels is None:
            return logits
        _check_targets(labels, (logits.shape[0],), self.num_labels, ignore=False)
        loss = classification_loss(logits, labels.long(), num_items_in_batch)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class TokenClassifier(_DecoderHead):
    """A token classifier (NER): a linear `classifier` on every position's hidden state.

    Each token sees only the tokens before it (the decoder is causal); `load_ner` scores each word's first
    sub-token.

    Args:
        decoder: a `CausalLM`; its body is shared (not copied) and its `lm_head` is not used.
        num_labels: the number of tags.

        label_names: the tag names, one per label id (BIO tags such as "B-PER" let evaluation score
            entities); None.

    Forward:
        input_ids (B, T), attention_mask (B, T) or None -> logits (B, T, num_labels); with `labels` (B, T)
        tag ids (-100: not scored) a `TokenClassifierOutput(loss, logits)`.

    Raises:
        TypeError: `decoder` is not a `CausalLM`.
        ValueError: num_labels < 1.
    """

    peft_task_type = "TOKEN_CLS"
    peft_modules_to_save = ("classifier",)  # trained whole with any PEFT method, saved with the adapter

    def __init__(self, decoder: CausalLM, num_labels: int, label_names=None):
        super().__init__(decoder, "TokenClassifier")
        self.num_labels = num_labels
        self.label_names = _check_label_names(label_names, num_labels, "TokenClassifier")
        self.classifier = _new_linear(decoder, num_labels, bias=True, what="TokenClassifier")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels=None,
                num_items_in_batch=None):
        self._check_methods()
        logits = self.classifier(hidden_states(self.decoder, input_ids, attention_mask))  # (B, T, num_labels)
        if labels is None:
            return logits
        _check_targets(labels, tuple(input_ids.shape), self.num_labels, ignore=True)
        loss = token_classification_loss(logits, labels.long(), num_items_in_batch)
        return TokenClassifierOutput(loss=loss, logits=logits)


def _check_label_names(names, num_labels: int, what: str) -> tuple[str, ...] | None:
    if names is None:
        return None
    names = tuple(names)
    if len(names) != num_labels or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{what}: label_names must be {num_labels} distinct non-empty strings (one per label id), "
                         f"got {list(names)!r}")
    return names


def _check_targets(labels, shape: tuple, num_labels: int, ignore: bool) -> None:
    """Refuse labels of another shape or dtype, or ids outside [0, num_labels) (-100 allowed where `ignore`)."""
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32) \
            or tuple(labels.shape) != shape:
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an int64/int32 tensor of shape {shape}, got {got}")
    scored = labels[labels != -100] if ignore else labels
    if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= num_labels):
        raise ValueError(f"labels hold ids outside [0, {num_labels}) (min {int(scored.min())}, max "
                         f"{int(scored.max())}){'; -100 marks an unscored position' if ignore else ''}")
