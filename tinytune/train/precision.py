"""Precision: the one place that decides dtypes, autocast and gradient scaling for training.

- "fp32": no autocast, no scaler.
- "bf16": `torch.autocast(device, torch.bfloat16)` on CPU and CUDA; no scaler (bf16 has fp32's range).
- "fp16": `torch.autocast("cuda", torch.float16)` with a `torch.amp.GradScaler`; CUDA only.

Whatever the compute dtype, trainable parameters are kept in fp32 (they are the master weights the
optimizer updates); frozen parameters keep their dtype, or are cast to bf16 with `base_dtype="bf16"`
to halve the memory the frozen base takes.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# CPU features that give bf16 matrix instructions: x86 AVX512-BF16 and AMX-BF16; ARMv8.6 BF16 ("Features").
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str] | None:
    """The feature flags of the first CPU in `cpuinfo` ("flags" on x86, "Features" on ARM); None if unreadable."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return None


def warn_if_slow_cpu_bf16(dtype: str, device: str,
                          read_flags: Callable[[], frozenset[str] | None] | None = None) -> bool:
    """Warn (RuntimeWarning) when bf16 autocast is asked for on a CPU without bf16 matrix instructions.

    There autocast emulates bf16 matmuls and can run several times slower than fp32. The CPU is
    judged by its flags (`BF16_CPU_FLAGS`, read by `read_flags`, /proc/cpuinfo by default); where they
    cannot be read (not Linux) nothing is said. Returns whether it warned.
    """
    if dtype != "bf16" or device != "cpu":
        return False
    flags = (read_flags or cpu_flags)()
    if flags is None or any(f in flags for f in BF16_CPU_FLAGS):
        return False
    capability = torch.backends.cpu.get_cpu_capability()  # e.g. "AVX2", "AVX512", "DEFAULT"
    seen = sorted(f for f in flags if f.startswith(("avx", "amx", "sve", "asimd", "neon")))
    warnings.warn(f"dtype='bf16' on this CPU (torch CPU capability {capability}; vector flags "
                  f"{' '.join(seen) or 'none'}) finds none of {list(BF16_CPU_FLAGS)}: bf16 autocast is emulated "
                  "there and can run several times slower than fp32; consider dtype='fp32'",
                  RuntimeWarning, stacklevel=3)
    return True


class Precision:
    """Autocast context and gradient scaler for one run.

    Args:
        dtype: "fp32", "bf16" or "fp16".
        device: "cpu" or "cuda".

    Raises:
        ValueError: fp16 requested off CUDA, an unknown dtype, or CUDA requested but not available.
    """

    def __init__(self, dtype: str, device: str):
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choices: {list(COMPUTE_DTYPES)}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was requested but torch.cuda.is_available() is False")
        if dtype == "fp16" and device != "cuda":
            raise ValueError(f"dtype='fp16' needs a CUDA device (gradient scaler); got device={device!r}: "
                             "use dtype='bf16' on the CPU")
        self.dtype = dtype
        self.device = device
        self.compute_dtype = COMPUTE_DTYPES[dtype]
        # Only fp16 needs loss scaling: its 5-bit exponent underflows small gradients.
        self.scaler = torch.amp.GradScaler("cuda") if dtype == "fp16" else None

    def autocast(self):
        """The context manager the forward pass runs under (a no-op for fp32)."""
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.compute_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """`loss.backward()`, scaled first when a gradient scaler is in use."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients back to their true scale before clipping (no-op without a scaler)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def clip(self, optimizer: torch.optim.Optimizer, params: list, max_norm: float | None) -> tuple[bool, float]:
        """Unscale, then clip the gradients of `params` to the global norm `max_norm` (None: only measure).

        Returns (whether the update may apply, the global gradient norm before clipping). A non-finite
        norm refuses the update, except with a scaler: inf gradients are its business (it skips the
        step and lowers the scale).
        """
        self.unscale(optimizer)
        if max_norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            return True, _as_float(norm)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return self.scaler is not None or bool(torch.isfinite(norm)), _as_float(norm)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """`optimizer.step()`, through the scaler when there is one (it skips steps with inf grads)."""
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> dict:
        """The scaler's state (empty without a scaler), for checkpoints."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def _as_float(norm: torch.Tensor) -> float:
    """A gradient norm as a float (an FSDP norm is a DTensor: its full value first)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def prepare_model(model: nn.Module, device: str, base_dtype: str | None) -> nn.Module:
    """Move `model` to `device`, keep trainable parameters in fp32 and optionally the frozen ones in bf16.

    Args:
        model: any module; changed in place.
        device: "cpu" or "cuda".
        base_dtype: None (frozen parameters keep their dtype) or "bf16".

    Returns:
        The same model.

    Raises:
        ValueError: the model has no trainable parameter.
    """
    model.to(device)
    trainable = 0
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                trainable += 1
                if param.dtype != torch.float32 and param.is_floating_point():
                    param.data = param.data.float()  # fp32 master weights: small updates survive rounding
            elif base_dtype == "bf16" and param.is_floating_point() and param.dtype != torch.bfloat16:
                param.data = param.data.to(torch.bfloat16)
    if trainable == 0:
        raise ValueError(f"{type(model).__name__} has no trainable parameter (every requires_grad is False); "
                         "apply a PEFT method (e.g. tt.lora.apply) or unfreeze some parameters")
    return model
