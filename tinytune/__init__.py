"""tinytune: fine-tune language models with LoRA and friends, on torch alone.

    import tinytune as tt
    tt.lora.apply(model, tt.lora.LoraConfig(rank=8, alpha=16, targets="all-linear"))
    print(tt.count_parameters(model))
"""
from . import data, lora, models, ops, peft, rlhf, train
from ._check import FieldError
from ._manifest import IntegrityError
from ._transaction import SaveError
from .models import generate, load_pretrained, save_gguf, save_pretrained
from .peft import (ParameterCount, adapter, count_parameters, freeze, ia3, load_adapter, prefix, prompt,
                   save_adapter)
from .seeding import seed_everything

__version__ = "0.1.0"

__all__ = [
    "FieldError",
    "IntegrityError",
    "ParameterCount",
    "SaveError",
    "adapter",
    "count_parameters",
    "data",
    "freeze",
    "generate",
    "ia3",
    "load_adapter",
    "load_pretrained",
    "lora",
    "models",
    "ops",
    "peft",
    "prefix",
    "prompt",
    "rlhf",
    "save_adapter",
    "save_gguf",
    "save_pretrained",
    "seed_everything",
    "train",
    "__version__",
]
