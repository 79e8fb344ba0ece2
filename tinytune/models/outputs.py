"""What a model returns when it is given `labels`: the Hugging Face output convention, on a plain dict.

    out = model(input_ids, labels=labels)   # CausalLMOutput
    out.loss, out["loss"], out[0]           # the same scalar: attribute, key, or first non-None field

As with `transformers.ModelOutput`, a field that is None is not stored as a key (so `out[0]` is the first
field that is set, `"logits" in out` is False when no logits were computed) but reads as None as an
attribute. Being a dict keeps it working with code written for transformers' outputs (and with tinytune's
own soft-prompt hooks, which cut virtual positions from every tensor field but the loss).
"""
from __future__ import annotations

import torch


class ModelOutput(dict):
    """A dict whose declared `fields` also read as attributes (None when unset), like transformers'."""

    fields: tuple[str, ...] = ()

    def __init__(self, **values):
        unknown = sorted(set(values) - set(self.fields))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {unknown}; fields: {list(self.fields)}")
        super().__init__((k, values[k]) for k in self.fields if values.get(k) is not None)

    def __getattr__(self, name: str):
        if name in type(self).fields:
            return self.get(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}; fields: {list(self.fields)}")

    def __setattr__(self, name: str, value) -> None:
        # `out.loss = out.loss + aux` must change what `out["loss"]` and `out[0]` read, as in transformers
        if name in type(self).fields:
            if value is None:
                self.pop(name, None)
            else:
                self[name] = value
        else:
            super().__setattr__(name, value)

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):  # transformers' tuple view: the set fields, in declared order
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        """The set fields' values in declared order."""
        return tuple(self[k] for k in self.fields if k in self)


class CausalLMOutput(ModelOutput):
    """`CausalLM(..., labels=...)`: `loss` (scalar; the mean cross-entropy over scored next tokens, or the sum
    over `num_items_in_batch`) and `logits` (B, T, V), None unless `return_logits=True`."""

    fields = ("loss", "logits")
    loss: torch.Tensor | None
    logits: torch.Tensor | None


class SequenceClassifierOutput(ModelOutput):
    """`SequenceClassifier(..., labels=...)`: `loss` (scalar) and `logits` (B, num_labels)."""

    fields = ("loss", "logits")
    loss: torch.Tensor | None
    logits: torch.Tensor | None


class TokenClassifierOutput(ModelOutput):
    """`TokenClassifier(..., labels=...)`: `loss` (scalar) and `logits` (B, T, num_labels)."""

    fields = ("loss", "logits")
    loss: torch.Tensor | None
    logits: torch.Tensor | None
