"""Parameter-efficient fine-tuning methods for any `nn.Module` (knows nothing of tinytune.models).

Each method is a namespace with the same verbs: a `...Config` dataclass, `apply(model, cfg)`,
`state_dict(model)`, `load_state_dict(model, sd)`: `lora` (+ DoRA, PiSSA, LoRA+), `adapter` (bottleneck
adapters), `ia3`, `freeze` (selective fine-tuning, BitFit), `prompt` (soft prompts), `prefix` (prefix tuning);
`modules_to_save`: modules trained whole beside any of them (a classifier's head), saved with the adapter.
"""
from . import adapter, freeze, ia3, lora, modules_to_save, prefix, prompt
from .io import load_adapter, save_adapter
from .params import ParameterCount, count_parameters

__all__ = ["adapter", "freeze", "ia3", "lora", "modules_to_save", "prefix", "prompt", "load_adapter", "save_adapter", "ParameterCount", "count_parameters"]
