"""Parameter-efficient fine-tuning methods for any `nn.Module` (knows nothing of tinytune.models).

Each method is a namespace with the same verbs: a `...Config` dataclass, `apply(model, cfg)`,
`state_dict(model)`, `load_state_dict(model, sd)`: `lora` (+ DoRA, PiSSA, LoRA+), `adapter` (bottleneck
adapters), `ia3`, `freeze` (selective fine-tuning, BitFit), `prompt` (soft prompts), `prefix` (prefix tuning).
"""
from . import adapter, freeze, ia3, lora, prefix, prompt
from .io import load_adapter, save_adapter
from .params import ParameterCount, count_parameters

__all__ = ["adapter", "freeze", "ia3", "lora", "prefix", "prompt", "load_adapter", "save_adapter", "ParameterCount", "count_parameters"]
