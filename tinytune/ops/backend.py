"""Which implementation a hot op runs: plain torch (every device) or a Triton kernel (CUDA).

    backend = choose_backend(backend, x)   # "torch" | "triton"

The choice, in order: the op's `backend=` argument, then the `TINYTUNE_KERNELS` environment variable, then
"auto". "auto" picks Triton for CUDA tensors when the `triton` package is importable, torch otherwise (the
CPU path stays pure torch, and so does code under `torch.compile`, which fuses it itself). "triton" forces the kernels: on CPU tensors that needs Triton's interpreter
(`TRITON_INTERPRET=1`, set before triton is first imported), which is how the kernels are tested without a
GPU. `import tinytune` never imports triton; this module only asks whether it is installed.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "TINYTUNE_KERNELS"


def triton_installed() -> bool:
    """Whether the `triton` package can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose_backend(backend: str | None, tensor: torch.Tensor) -> str:
    """"torch" or "triton" for an op on `tensor` (see the module docstring).

    Raises:
        ValueError: an unknown backend name (argument or environment variable, named as such).
        RuntimeError: "triton" forced where it cannot run: the package is missing, or a CPU tensor without
            the interpreter.
    """
    where = "backend"
    if backend is None:
        backend, where = os.environ.get(ENV_VAR, "auto") or "auto", f"${ENV_VAR}"
    if backend not in BACKENDS:
        raise ValueError(f"{where}={backend!r} is not one of {list(BACKENDS)}")
    if backend == "auto":  # compiled code stays torch: the compiler traces and fuses it (a kernel would break the graph)
        if torch.compiler.is_compiling():
            return "torch"
        return "triton" if tensor.is_cuda and triton_installed() else "torch"
    if backend == "triton":
        if not triton_installed():
            raise RuntimeError(f"{where}='triton' but the triton package is not installed (pip install triton; "
                               "Linux x86-64, or the dev extra)")
        if not tensor.is_cuda and not interpreting():
            raise RuntimeError(f"{where}='triton' on a {tensor.device.type} tensor needs Triton's interpreter: set "
                               "TRITON_INTERPRET=1 before triton is imported (or use a CUDA tensor)")
    return backend
