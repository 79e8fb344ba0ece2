"""The dtype PEFT parameters are kept in, shared by every method."""
import torch


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision bases (adapters train in fp32), else the base's own dtype (fp64 bases
    keep fp64, for gradcheck-grade tests)."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
