"""LoRA around a user's own linear-like layer, for `tt.lora.register_layer`.

    class Int8Linear(nn.Module): ...          # in_features, out_features, forward(x) -> (..., out)
    tt.lora.register_layer(Int8Linear, tt.lora.LoRALinearLike, linear=True)
    tt.lora.apply(model, tt.lora.LoraConfig(targets="all-linear"))

`LoRALinearLike` calls the wrapped module itself (whatever its forward does: dequantise, shard,
fuse) and adds `scaling * dropout(x) A^T B^T` beside it, so it needs nothing of the module but
`in_features` and `out_features`. It merges when the module keeps a floating `weight` of shape
(out_features, in_features), as nn.Linear does; a quantised weight cannot take the update without
losing it to rounding, so merging is refused there with the reason. DoRA and PiSSA rewrite or read
the weight itself and are refused (use LoRALinear for nn.Linear).
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from .attributes import factor_property
from .base import LoRALayer, init_lora_A
from .config import LoraSpec

__all__ = ["LoRALinearLike"]


class LoRALinearLike(LoRALayer):
    """`base(x) + scaling * dropout(x) A^T B^T` for any module mapping (..., in_features) to (..., out_features).

    Build it through `tt.lora.register_layer(ModuleType, LoRALinearLike)` and `tt.lora.apply`, or as
    `LoRALinearLike.from_spec(module, tt.lora.LoraSpec(rank=8, alpha=16))`. `lora_A` is (r, in),
    `lora_B` (out, r), PEFT's shapes and saved keys (`<path>.lora_A.weight`, `<path>.lora_B.weight`).

    Raises (on construction):
        TypeError: the module lacks integer `in_features` / `out_features`.
        ValueError: dora=True or init="pissa" (they need the weight itself).
    """

    lora_A = factor_property("lora_A", "The active adapter's A, (rank, in_features).")
    lora_B = factor_property("lora_B", "The active adapter's B, (out_features, rank).")

    @classmethod
    def cannot_wrap(cls, base: nn.Module) -> str | None:
        sizes = [getattr(base, n, None) for n in ("in_features", "out_features")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
            return (f"LoRALinearLike needs integer in_features and out_features on the module; "
                    f"{type(base).__name__} has in_features={sizes[0]!r}, out_features={sizes[1]!r}")
        return None

    def _dims(self) -> tuple[int, int]:
        return self.base.in_features, self.base.out_features

    def _refuse_spec(self, spec: LoraSpec) -> None:
        for flag, what in ((spec.dora, "dora=True"), (spec.init == "pissa", "init='pissa'")):
            if flag:
                raise ValueError(f"LoRALinearLike around {type(self.base).__name__}: {what} needs the layer's weight "
                                 "itself, which a custom layer may not keep (use LoRALinear for nn.Linear)")

    @torch.no_grad()
    def _reset(self, name: str) -> None:
        spec = self.adapters[name]
        init_lora_A(self._factor("lora_A", name), spec)
        nn.init.zeros_(self._factor("lora_B", name))

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        return (self._factor("lora_B", name) @ self._factor("lora_A", name)) * self._spec(name).scaling  # (out, in)

    def _forward_adapter(self, x: torch.Tensor, name: str | None) -> torch.Tensor:
        out = self.base(x)  # (..., out): the module's own forward, whatever it does
        spec = self.adapters.get(name)
        if spec is None:
            return out
        lora_A, lora_B = self._factor_tensor("lora_A", name), self._factor_tensor("lora_B", name)
        dropped = F.dropout(x.to(lora_A.dtype), spec.dropout, self.training)
        low_rank = (dropped @ lora_A.t()) @ lora_B.t()  # (..., r) then (..., out): never an (out, in) product
        return out + (low_rank * spec.scaling).to(out.dtype)

    def cannot_merge(self) -> str | None:
        reason = super().cannot_merge()
        if reason is not None:
            return reason
        weight = getattr(self.base, "weight", None)
        shape = (self.base.out_features, self.base.in_features)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point() and tuple(weight.shape) == shape:
            return None
        found = "no weight" if not isinstance(weight, torch.Tensor) else f"a {weight.dtype} weight {tuple(weight.shape)}"
        return (f"cannot fold LoRA into {type(self.base).__name__}, which has {found} (merging needs a floating weight "
                f"of shape {shape}); keep the adapter unmerged, or dequantise the layer first")
