"""Mixed-adapter batches on one LoRA layer: `RowAdapters`, a mixin of `LoRALayer` (base.py).
`set_row_adapters` gives each row of the input its own adapter; `forward` then calls `_forward_rows`,
which runs each group of rows through its adapter. The model-level call is `multi.adapter_per_row`.

The host class provides `adapters`, `_factory()` and `_forward_adapter(x, name)`, and sets `_rows = None`
when it is set up.
"""
from __future__ import annotations

import torch


class RowAdapters:
    """The per-row adapter choice of a LoRA layer (`_rows`: None, or (rows, {adapter or None: row indices}))."""

    def set_row_adapters(self, names: list[str | None] | None) -> None:
        """Give row i of every following input the adapter `names[i]` (None, or an adapter this
        layer lacks: the base), until called with None. Used by `tt.lora.adapter_per_row`.

        Rows are the first dimension of this layer's input; rows that share an adapter run
        together, through the same code as a single-adapter forward.
        """
        if names is None:
            self._rows = None
            return
        groups: dict[str | None, list[int]] = {}
        for row, name in enumerate(names):
            groups.setdefault(name if name in self.adapters else None, []).append(row)
        device = self._factory()["device"]  # made once here, not on every forward
        self._rows = (len(names), {n: torch.tensor(r, dtype=torch.long, device=device) for n, r in groups.items()})

    def _forward_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Mixed batch: each group of rows through its own adapter, written back in place (autograd
        follows index_select / index_copy_, so gradients reach each group's adapter)."""
        rows, groups = self._rows
        if x.shape[0] != rows:
            raise ValueError(f"adapter_per_row gave {rows} adapters (one per row), but this {type(self).__name__}'s "
                             f"input has shape {tuple(x.shape)}: rows are the first dimension of each adapted "
                             "layer's input (batch-first models)")
        if len(groups) == 1:  # one adapter for the whole batch: no gather
            return self._forward_adapter(x, next(iter(groups)))
        out = None
        for name, index in groups.items():
            y = self._forward_adapter(x.index_select(0, index), name)  # (rows of the group, ..., d_out)
            if out is None:
                out = y.new_empty((rows, *y.shape[1:]))
            out.index_copy_(0, index, y.to(out.dtype))
        return out
