"""The (IA)^3 layer: `IA3Linear`, an `nn.Linear` whose output (or input, for a feedforward target) is
scaled by a learned vector `ia3_l`, with its own merge / unmerge. `ia3.py` finds the targets, swaps these
in and reads and writes PEFT's files."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ._dtype import adapter_dtype


class IA3Linear(nn.Module):
    """An `nn.Linear` whose output (or, for a feedforward layer, input) is scaled by a learned vector.

    Args:
        base: the `nn.Linear` to wrap; kept as `.base` (the same object, weights shared) and frozen.
        feedforward: scale the input, `base(x * l)` with `ia3_l` (1, in); otherwise scale the
            output, `base(x) * l` with `ia3_l` (out, 1).
        init_ones: `ia3_l` starts at 1 (the layer equals its base); False: N(0, 1).

    `ia3_l` is fp32 for a bf16/fp16 base (PEFT would cast it to the base dtype), else the base dtype.

    Raises:
        TypeError: `base` is not an nn.Linear.
    """

    def __init__(self, base: nn.Linear, feedforward: bool, init_ones: bool = True):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"IA3Linear wraps an nn.Linear, got {type(base).__name__}")
        self.base = base
        self.feedforward = bool(feedforward)
        self.merged = False
        self._disabled = False  # set only by tinytune.peft.ia3.disabled()
        base.requires_grad_(False)
        shape = (1, base.in_features) if self.feedforward else (base.out_features, 1)
        factory = {"dtype": adapter_dtype(base.weight.dtype), "device": base.weight.device}
        self.ia3_l = nn.Parameter(torch.ones(shape, **factory))
        if not init_ones:
            with torch.no_grad():
                self.ia3_l.normal_()  # PEFT's init_ia3_weights=False keeps torch.randn

    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)
    weight = property(lambda self: self.base.weight, doc="The base weight.")
    bias = property(lambda self: self.base.bias, doc="The base bias.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self._disabled:
            return self.base(x)
        scale = self.ia3_l.flatten()  # (in,) or (out,): broadcasts over the last dim
        if self.feedforward:
            # as PEFT: scale in the vector's dtype, then back to the input's dtype for the base
            return self.base((x.to(scale.dtype) * scale).to(x.dtype))
        out = self.base(x)  # (..., out): includes the bias, which is scaled too (PEFT)
        return (out * scale).to(out.dtype)

    @torch.no_grad()
    def _rescale(self, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """Apply `op(tensor, l)` to the base weight, and to the bias for an output-scaling layer."""
        weight, l = self.base.weight, self.ia3_l
        weight.copy_(op(weight, l).to(weight.dtype))  # (out, in) with (out, 1) rows or (1, in) columns
        bias = self.base.bias
        if not self.feedforward and bias is not None:
            bias.copy_(op(bias, l.reshape(bias.shape)).to(bias.dtype))

    def merge(self) -> None:
        """Fold `ia3_l` into the base weight (and bias, for output scaling); a second call does nothing.

        Raises:
            ValueError: `ia3_l` has a zero entry, which `unmerge` could not divide out.
        """
        if self.merged:
            return
        if bool((self.ia3_l == 0).any()):
            raise ValueError("IA3Linear.merge: ia3_l has zero entries, so unmerge could not undo the merge; "
                             "use merge_and_unload for a one-way merge")
        self._rescale(torch.mul)
        self.merged = True

    @torch.no_grad()
    def merged_state(self) -> dict[str, torch.Tensor]:
        """The plain nn.Linear's state with `ia3_l` folded in (rows and bias, or columns), as `merge` would
        write it; the layer is unchanged."""
        state = {k: v.detach() for k, v in self.base.state_dict().items()}
        if self.merged:
            return state
        l = self.ia3_l.float()  # (out, 1) scales rows and the bias; (1, in) scales columns
        state["weight"] = (state["weight"].float() * l).to(state["weight"].dtype)
        if state.get("bias") is not None and not self.feedforward:
            state["bias"] = (state["bias"].float() * l.reshape(state["bias"].shape)).to(state["bias"].dtype)
        return state

    def unmerge(self) -> None:
        """Divide `ia3_l` out again (exact up to rounding; PEFT adds 1e-8 to l, we do not). Safe twice."""
        if not self.merged:
            return
        self._rescale(torch.div)
        self.merged = False

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, ia3_l={tuple(self.ia3_l.shape)}, merged={self.merged}"
