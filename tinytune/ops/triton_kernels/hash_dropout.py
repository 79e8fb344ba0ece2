"""The counter-based dropout mask of the Triton kernels, and its pure-torch reference.

A kernel cannot keep a random stream between programs, and a stored mask costs a byte (or a bit) per
element of x; instead every element's keep bit is a pure function of (seed, row, column):

    c    = (row * d_in + col) mod 2^32                 # the element's counter
    h    = fmix32(fmix32(c ^ seed_lo) ^ seed_hi)       # MurmurHash3's 32-bit finaliser, twice
    keep = (h >> 16) >= round(p * 65536)               # the top 16 bits against the threshold

so a kernel recomputes any tile of the mask from the seed alone, in registers, in the forward and again in
the backward. `fmix32` is a bijection of 32-bit words with full avalanche: distinct counters give distinct
hashes, and one flipped seed bit flips each output bit with probability ~1/2. The drop probability is
quantised to a multiple of 1/65536, the same quantisation as `dropout_mask.quantised_probability`, so the
kept values are scaled by `1 / (1 - quantised_probability(p))` exactly as on the torch path. Counters wrap
at 2^32 elements (N * d_in): beyond that, the mask repeats with that period.

`hash_keep_mask` computes the same bits with torch int64 arithmetic masked to 32 bits, on any device: the
tests rebuild a kernel's mask from its seed on the CPU with it.
"""
from __future__ import annotations

import torch

from ..dropout_mask import quantised_probability

M32 = 0xFFFFFFFF
FMIX_C1 = 0x85EBCA6B  # MurmurHash3 fmix32 multipliers
FMIX_C2 = 0xC2B2AE35
LANE_RANGE = 1 << 16


def drop_threshold(p: float) -> int:
    """The 16-bit threshold: an element whose hash's top 16 bits fall below it is dropped."""
    return round(p * LANE_RANGE)


def split_seed(seed: int) -> tuple[int, int]:
    """A non-negative seed (< 2^64) as two 32-bit halves, each as a signed int32 (what a kernel argument holds).

    Raises:
        ValueError: a seed outside [0, 2^64), named.
    """
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"dropout seed must be in [0, 2**64), got {seed}")

    def signed(v: int) -> int:
        return v - (1 << 32) if v >= 1 << 31 else v

    return signed(seed & M32), signed((seed >> 32) & M32)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # h: int64 holding a 32-bit word; products overflow int64 but their low 32 bits stay exact.
    h = h ^ (h >> 16)
    h = (h * FMIX_C1) & M32
    h = h ^ (h >> 13)
    h = (h * FMIX_C2) & M32
    return h ^ (h >> 16)


def hash_bits(seed: int, rows: int, cols: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 32-bit hash of every (row, col) of a (rows, cols) array, as int64 in [0, 2^32)."""
    lo, hi = (v & M32 for v in split_seed(seed))
    r = torch.arange(rows, dtype=torch.int64, device=device).view(-1, 1)
    c = torch.arange(cols, dtype=torch.int64, device=device).view(1, -1)
    counter = (r * cols + c) & M32  # (rows, cols)
    return _fmix32(_fmix32(counter ^ lo) ^ hi)


def hash_keep_mask(shape: tuple[int, int], p: float, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The kernels' boolean keep-mask of a 2-D (N, d_in) input, True where kept (P(drop) = quantised(p)).

    Bit for bit what the Triton kernels compute in registers from the same seed (module docstring).
    """
    rows, cols = shape
    return (hash_bits(seed, rows, cols, device) >> 16) >= drop_threshold(p)


def hash_dropout_reference(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """`dropout(x)` with the kernels' mask: kept entries scaled by `1 / (1 - quantised_probability(p))`."""
    keep = hash_keep_mask(tuple(x.shape), p, seed, x.device)
    return x * keep / (1.0 - quantised_probability(p))
