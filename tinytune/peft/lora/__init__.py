"""LoRA on any `nn.Module`: config, injection, merge, disable, adapter state dicts and files.

    cfg = tt.lora.LoraConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"])
    names = tt.lora.apply(model, cfg)      # swaps modules in place, freezes everything else

The adapter state dict uses Hugging Face PEFT's key names
(`base_model.model.<module path>.lora_A.weight`, ...), so files interoperate with `peft`.
Variants: `dora=True` (DoRA), `init="pissa"` (PiSSA), and `loraplus_param_groups` (LoRA+);
see docs/lora_variants.md. Several named adapters on one model (`add_adapter`, `set_adapter`,
`add_weighted_adapter`, `adapter_per_row`, ...): see docs/multi_adapter.md.

The subpackage, by concept: `config` (LoraConfig, the frozen LoraSpec), `base` (what every LoRA
layer shares), `layers` (nn.Linear, nn.Embedding), `mha` (nn.MultiheadAttention), `registry` (which
module types take LoRA, and `register_layer` for user types), `inject` (apply, add_adapter),
`merging`, `multi` (named adapters), `rows` (mixed-adapter batches), `files` (PEFT's config and key
layout), `variants` (DoRA, PiSSA, LoRA+), `shared_shrink` (one shrink pass for q/k/v reading one input).
"""
import torch.nn as nn

from .. import modules_to_save as _modules_to_save
from .._method import Method
from .base import LORA_LAYER_TYPES, LoRALayer
from .config import DEFAULT_ADAPTER, INITS, LoraConfig, LoraSpec, lora_scaling
from .conv import LoRAConv1D, LoRAConv1d, LoRAConv2d, LoRAConv3d, register_transformers_conv1d
from .files import check_sizes, config_from_peft, load_file, load_state_dict, peft_config_dict, state_dict
from .inject import adaptable_modules
from .inject import add_adapter as _add_adapter
from .inject import apply as _apply
from .custom import LoRALinearLike
from .layers import LoRAEmbedding, LoRALinear
from .mha import LoRAMultiheadAttention
from .merging import disabled, inference_merged, merge, merge_and_unload, merged_state, unmerge
from .multi import (
    active_adapter, adapter_layers, adapter_per_row, add_weighted_adapter, delete_adapter, list_adapters, lora_layers,
    set_adapter,
)
from .registry import register_layer, register_layer_by_name, registered_types
from .shared_shrink import ShrinkGroup, share_shrink
from .variants import loraplus_param_groups

PEFT_TYPE = "LORA"

__all__ = [
    "LoraConfig", "LoraSpec", "LoRALayer", "LoRALinear", "LoRAEmbedding", "LoRALinearLike",
    "LoRAMultiheadAttention", "apply", "merge", "unmerge",
    "merge_and_unload", "disabled", "state_dict", "load_state_dict", "lora_layers", "lora_scaling", "INITS",
    "loraplus_param_groups", "add_adapter", "set_adapter", "active_adapter", "list_adapters", "delete_adapter",
    "add_weighted_adapter", "adapter_per_row", "adapter_layers", "DEFAULT_ADAPTER", "register_layer",
    "registered_types", "register_layer_by_name", "adaptable_modules", "PEFT_TYPE", "is_applied", "peft_config_dict", "config_from_peft",
    "merged_state", "inference_merged", "METHOD", "LoRAConv1d", "LoRAConv2d", "LoRAConv3d", "LoRAConv1D",
    "register_transformers_conv1d", "share_shrink", "ShrinkGroup",
]


# the public verbs mark `cfg.modules_to_save` (and a head the model declares) around the injection
apply = _modules_to_save.applies(_apply)
add_adapter = _modules_to_save.applies(_add_adapter, cfg_arg=2)


def _owned(model: nn.Module) -> list:
    """Every adapter's factors (a file holds one adapter; the others are not a user's stray parameters)."""
    return [p for _, layer in lora_layers(model) for p in layer.parameters(recurse=False)]


def is_applied(model: nn.Module) -> bool:
    """Whether `model` has any LoRA layer."""
    return any(True for _ in lora_layers(model))


METHOD = Method(
    peft_type=PEFT_TYPE, name="LoRA", config_type=LoraConfig, is_applied=is_applied,
    peft_config_dict=peft_config_dict, config_from_peft=config_from_peft, apply=apply, state_dict=state_dict,
    load_state_dict=load_state_dict, check_sizes=check_sizes, merged_state=merged_state, load=load_file,
    named_adapters=True, owned=_owned,
)
