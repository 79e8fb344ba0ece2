"""Triton kernels for the CUDA hot path (see docs/kernels.md). Optional: needs the `triton` package.

This package's `__init__` stays light (torch only): the mask reference below imports no triton, while the
kernel modules (`lora_kernels`, `lora_function`; `cross_entropy_kernels`, `logprob_kernels`) import it and are
loaded lazily by the ops that dispatch to them (`lora_linear`, `linear_cross_entropy`, `linear_token_logprobs`
with `backend="triton"`, or "auto" on CUDA). On CPU tensors the kernels run only under Triton's interpreter
(`TRITON_INTERPRET=1`, set before triton is first imported), which is how the tests check them.
"""
from .hash_dropout import hash_dropout_reference, hash_keep_mask

__all__ = ["hash_dropout_reference", "hash_keep_mask"]
