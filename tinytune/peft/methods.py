"""Every PEFT method, as the one `Method` interface (`_method`): what adapter files, the checkpoint
writer and the CLI loop over. A new method is its own module plus one line here."""
from . import adapter, freeze, ia3, lora, prefix, prompt
from ._method import Method

# selective fine-tuning last: it is what a partly frozen model is when no other method is applied
METHODS: tuple[Method, ...] = (lora.METHOD, ia3.METHOD, adapter.METHOD, prompt.METHOD, prefix.METHOD, freeze.METHOD)


def by_peft_type(peft_type) -> Method | None:
    """The method whose adapter_config.json `peft_type` is `peft_type`, or None."""
    return next((m for m in METHODS if m.peft_type == peft_type), None)


def for_config(cfg) -> Method:
    """The method a config object belongs to.  Raises: TypeError: not a method config."""
    for method in METHODS:
        if method.config_type is not None and isinstance(cfg, method.config_type):
            return method
    raise TypeError(f"{type(cfg).__name__} is not a PEFT method config; expected one of "
                    f"{[m.config_type.__name__ for m in METHODS if m.config_type is not None]}")


def methods_to_save(model) -> list[Method]:
    """The methods an adapter file of `model` would hold: those it carries, with selective fine-tuning
    only when no other is applied (and as the fallback, whose writer says why nothing can be saved)."""
    found = [m for m in METHODS if m.is_applied(model) and m is not freeze.METHOD]
    return found or [freeze.METHOD]
