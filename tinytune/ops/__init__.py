"""Hot kernels, written on torch alone. Knows nothing of modules or PEFT methods."""
from .backend import BACKENDS, choose_backend
from .cross_entropy import LinearCrossEntropyFunction, linear_cross_entropy
from .dropout_mask import MaskStream, PackedMask, keep_mask, quantised_probability, traceable_keep_mask
from .lora_shared import LoRAExpandFunction, LoRAShrinkFunction, lora_expand_linear, lora_shrink
from .lora_matmul import LoRALinearFunction, lora_linear, lora_linear_reference, lora_linear_traceable
from .memory import graph_saved_storages, saved_bytes, saved_storages
from .peak_memory import PeakMemory, reset_peak_rss, status_kib
from .token_logprobs import LinearTokenLogprobsFunction, linear_token_logprobs

__all__ = [
    "BACKENDS",
    "LinearCrossEntropyFunction",
    "LinearTokenLogprobsFunction",
    "LoRAExpandFunction",
    "LoRALinearFunction",
    "LoRAShrinkFunction",
    "MaskStream",
    "PackedMask",
    "PeakMemory",
    "choose_backend",
    "graph_saved_storages",
    "keep_mask",
    "linear_cross_entropy",
    "linear_token_logprobs",
    "lora_expand_linear",
    "lora_linear",
    "lora_linear_reference",
    "lora_linear_traceable",
    "lora_shrink",
    "quantised_probability",
    "reset_peak_rss",
    "saved_bytes",
    "saved_storages",
    "status_kib",
    "traceable_keep_mask",
]
