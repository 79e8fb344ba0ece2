"""Parameter-efficient fine-tuning methods for any `nn.Module` (knows nothing of tinytune.models)."""
from . import lora
from .io import load_adapter, save_adapter
from .params import ParameterCount, count_parameters

__all__ = ["lora", "load_adapter", "save_adapter", "ParameterCount", "count_parameters"]
