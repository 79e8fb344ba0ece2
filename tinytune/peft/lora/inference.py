"""Merged weights while generating: `InferenceMerge`, a mixin of `LoRALayer` (base.py).

Inside `layer.generation_context()` a layer that can fold its active adapter computes
`x (W + s B A)^T + b` with ONE matmul instead of the base product plus two low-rank ones: the
merged weight is computed once on entry (`merged_weight`, so DoRA folds too) and reused for every
forward, e.g. every decode step of `tt.generate`, which enters the context of each module that has
one. The base weight is never written (no merge/unmerge round trip: it stays bit-identical), and
the cache is dropped on exit. Memory: one extra copy of each adapted weight, only inside the block.

A layer keeps its normal path (the context does nothing) when merging would change what it computes
or is impossible: no folded forward for its type (embeddings, convolutions, custom layers), merged
already, disabled, mixed per-row adapters (`adapter_per_row`), no active adapter, training mode
(dropout), grad enabled (the adapter must get gradients), a base dtype other than the adapter's
(a bf16 base would round the update), or `cannot_merge()` gives a reason (parametrized, quantised).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


class InferenceMerge:
    """The once-per-generation merged weight of a LoRA layer (`_inference_weight`: None outside the block)."""

    _inference_weight = None  # set only inside generation_context()
    _merges_for_inference = False  # layer types whose base is a linear map (x W^T + b) set True

    def inference_merge_refusal(self) -> str | None:
        """Why `generation_context()` keeps this layer on its normal path now (None: it merges)."""
        checks = ((not self._merges_for_inference, f"{type(self).__name__} has no folded forward"),
                  (self._inference_weight is not None, "inside a generation context already"),
                  (self.merged, "merged already"), (self._disabled, "disabled"),
                  (self._rows is not None, "mixed per-row adapters"), (not self._holds_active(), "no active adapter"),
                  (self.training, "training mode (adapter dropout)"), (torch.is_grad_enabled(), "grad is enabled"))
        for failed, reason in checks:
            if failed:
                return reason
        if self._factor(self._A).dtype != self.base.weight.dtype:
            return f"the base is {self.base.weight.dtype}: a merged weight would round the update"
        return self.cannot_merge()

    @contextlib.contextmanager
    def generation_context(self):
        """Within: forward uses the merged weight, computed here once; after: nothing cached.
        Does nothing when `inference_merge_refusal()` gives a reason."""
        if self.inference_merge_refusal() is not None:
            yield
            return
        weight = self.merged_weight()  # a new tensor: the base weight is only read
        self._inference_weight = weight.t() if getattr(self, "fan_in_fan_out", False) else weight  # (out, in)
        try:
            yield
        finally:
            self._inference_weight = None

    def _forward_merged(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._inference_weight, self.base.bias)
