"""Peak memory of a block of code: the process's resident-set high-water mark on CPU, the CUDA allocator's
peak on CUDA. Used by the benchmarks and `tinytune bench`; plain Linux /proc reads, no dependency.
"""
from __future__ import annotations

from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (e.g. "VmRSS", "VmHWM"); None where it cannot be read (not Linux)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """`with PeakMemory(device) as pm: ...` then `pm.peak_bytes`: the peak above the level at entry.

    CPU: the process's resident-set high-water mark (VmHWM) reset at entry (where Linux allows it), minus the
    resident set at entry; `pm.method` says which measure was used and whether the reset worked. CUDA:
    `torch.cuda.max_memory_allocated` minus the memory allocated at entry. `pm.process_peak_bytes` is the
    process's whole high-water mark at exit (CPU), for comparing processes that each ran one variant.
    """

    def __init__(self, device: str = "cpu"):
        self.device, self.peak_bytes, self.method = device, None, ""
        self.process_peak_bytes: int | None = None

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start, self.method = torch.cuda.memory_allocated(), "torch.cuda.max_memory_allocated delta"
        else:
            reset = reset_peak_rss()
            self._start = (status_kib("VmRSS") or 0) * 1024
            self.method = "VmHWM delta" + ("" if reset else " (peak not reset: may read low)")
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._start
        else:
            hwm = status_kib("VmHWM")
            self.process_peak_bytes = None if hwm is None else hwm * 1024
            self.peak_bytes = None if hwm is None else max(hwm * 1024 - self._start, 0)
        return False
