"""Training-step throughput and peak memory: one step = forward + loss + backward + AdamW step.

CPU peak memory is the process's resident-set high-water mark (VmHWM in /proc/self/status) reset just
before the timed steps (writing "5" to /proc/self/clear_refs) minus the resident set at that moment; where
the reset is not allowed the delta is taken against the start-of-process peak and may read low. CUDA peak
memory is `torch.cuda.max_memory_allocated` minus the memory allocated before the steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ops.peak_memory import PeakMemory, reset_peak_rss, status_kib  # noqa: F401  (re-exported)


@dataclass
class StepStats:
    """Result of `measure_training_step`."""

    tokens_per_s: float
    step_seconds: list[float]
    peak_bytes: int | None
    memory_method: str


def make_step(model, batch_size: int, seq_len: int, vocab_size: int, lr: float = 1e-4, dtype: str = "fp32",
              device: str = "cpu", seed: int = 0):
    """A closure running one training step of `model` on a fixed random batch (B, T)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: nothing to benchmark")
    opt = torch.optim.AdamW(params, lr=lr)
    amp = dtype in ("bf16", "fp16")
    amp_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16

    def step():
        with torch.autocast(device_type=device.split(":")[0], dtype=amp_dtype, enabled=amp):
            out = model(ids)
            logits = out if isinstance(out, torch.Tensor) else out.logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_training_step(model, batch_size: int, seq_len: int, vocab_size: int, steps: int = 5,
                          warmup: int = 2, dtype: str = "fp32", device: str = "cpu") -> StepStats:
    """Tokens/s (median step) and peak memory of `steps` timed training steps after `warmup` untimed ones."""
    model.to(device).train()
    step = make_step(model, batch_size, seq_len, vocab_size, dtype=dtype, device=device)
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    with PeakMemory(device) as pm:
        for _ in range(steps):
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    return StepStats(batch_size * seq_len / median, times, pm.peak_bytes, pm.method)
