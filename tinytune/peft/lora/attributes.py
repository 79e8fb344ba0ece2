"""How a LoRA layer names and exposes its adapters: registered names, and the active adapter's attributes.

    lora_A = factor_property("lora_A", "The active adapter's A.")   # layer.lora_A: the active adapter's
    rank = active_field("rank", "The active adapter's rank r.")      # layer.rank: its LoraSpec's field
"""
from __future__ import annotations

from .config import DEFAULT_ADAPTER


def param_key(kind: str, adapter: str) -> str:
    """The name under which adapter `adapter`'s parameter `kind` ("lora_A", ...) is registered on
    its layer: `kind` itself for "default" (the names single-adapter LoRA always had, so model
    state dicts and training checkpoints keep their keys), `kind + "_" + adapter` otherwise."""
    return kind if adapter == DEFAULT_ADAPTER else f"{kind}_{adapter}"


def factor_property(kind: str, doc: str) -> property:
    """The active adapter's parameter `kind` as an attribute (`layer.lora_A`).

    Assignable only on an `nn.DataParallel` replica: `torch.nn.parallel.replicate` sets each parameter's
    per-device copy with setattr under its registered name, and `_factor` reads it back from there.
    """
    def set_replica_copy(self, value):
        if not getattr(self, "_is_replica", False):
            raise AttributeError(f"{kind} of a {type(self).__name__} is the active adapter's parameter: change it in "
                                 "place (under torch.no_grad()) or load it with tt.lora.load_state_dict")
        self.__dict__[kind] = value

    return property(lambda self: self._factor(kind), set_replica_copy, doc=doc)


def active_field(name: str, doc: str) -> property:
    """The active adapter's hyperparameter `name` (a `LoraSpec` field) as a read-only attribute (`layer.rank`)."""
    return property(lambda self: getattr(self._spec(), name), doc=doc)
