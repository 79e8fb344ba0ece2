"""Hot kernels, written on torch alone. Knows nothing of modules or PEFT methods."""
from .dropout_mask import MaskStream, PackedMask, keep_mask, quantised_probability
from .lora_matmul import LoRALinearFunction, lora_linear, lora_linear_reference
from .memory import saved_bytes, saved_storages

__all__ = [
    "LoRALinearFunction",
    "MaskStream",
    "PackedMask",
    "keep_mask",
    "lora_linear",
    "lora_linear_reference",
    "quantised_probability",
    "saved_bytes",
    "saved_storages",
]
