"""LoRA on `nn.MultiheadAttention`, as PEFT's `lora.MultiheadAttention`: one adapter on the packed
`in_proj_weight` (q, k and v together) and one on `out_proj`, always both.

    tt.lora.apply(vit, tt.lora.LoraConfig(targets="all-linear"))   # every self_attn, linear1, linear2

The module never calls its projections: it reads `in_proj_weight` and `out_proj.weight` directly
(in `F.multi_head_attention_forward`, and in the fused `torch._native_multi_head_attention` it takes in
eval under no_grad). So the adapter cannot sit beside a projection as for `nn.Linear`; instead each
forward runs the module's own forward through `torch.func.functional_call` with the two weights
swapped for `W + s B A`: the very code the module runs (masks, `batch_first`, `need_weights`,
bias_k/bias_v, add_zero_attn, the fused path), with gradients reaching A and B and the base
parameters never touched. PEFT gets its result by merging before and unmerging after each call.
Inside an nn.TransformerEncoderLayer, whose own fused path would read `self_attn.in_proj_weight` raw,
`apply` disables that path (a no-op hook, see `inject`), as for adapted linear1/linear2.

Unlike PEFT 0.21.2, the out_proj delta is added ONCE: PEFT's `merge()` writes `W + dW` into out_proj and
then calls out_proj's own merge, which adds `dW` again, so its forward and its merged model use
`W + 2 dW` (huggingface/peft PR #3774 fixes it). The files hold the same tensors either way; a model
computes the same in tinytune and in PEFT when its out_proj B is zero, or once PEFT is fixed.

As in PEFT:
- the keys of the saved adapter are `<path>.lora_A.weight` (r, E) and `<path>.lora_B.weight` (3E, r)
  for in_proj, `<path>.base_layer.out_proj.lora_A.weight` (r, E) and `...lora_B.weight` (E, r) for
  out_proj (`file_tensors`), so adapter files move both ways;
- `dropout` is NOT applied: a merged-weight forward has no adapter input to drop (PEFT builds the
  dropout module and never calls it). The value is kept and saved; a warning says it has no effect;
- refused: DoRA (PEFT: "does not support DoRA (yet)"), init="pissa" (PEFT fails: the module has no
  `weight`), separate q/k/v weights (`kdim`/`vdim` != `embed_dim`; PEFT: "Only same embed for
  query/key/value is supported"), a mixed-adapter batch (`adapter_per_row`; PEFT refuses it too).
The module's biases are never trained (`train_bias` leaves them frozen; PEFT's bias="lora_only"
trains `out_proj.bias` only).

Cost per forward: two weight-sized temporaries (`3E x E` and `E x E`) and `8 r E^2` extra FLOPs for
the products `B A`, whatever the sequence length (PEFT pays the same).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
from torch.func import functional_call

from .attributes import factor_property
from .base import LoRALayer
from .config import LoraSpec
from .registry import register_layer

__all__ = ["LoRAMultiheadAttention"]

_IN, _OUT = ("lora_A", "lora_B"), ("lora_out_A", "lora_out_B")  # parameter kinds: in_proj, out_proj
_FILE_KEYS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight",  # PEFT's saved keys (see docstring)
              "lora_out_A": "base_layer.out_proj.lora_A.weight", "lora_out_B": "base_layer.out_proj.lora_B.weight"}


def _base_attr(name: str) -> property:
    return property(lambda self: getattr(self.base, name), doc=f"The wrapped module's `{name}`.")


class LoRAMultiheadAttention(LoRALayer):
    """`nn.MultiheadAttention` computed with `in_proj_weight + s B A` and `out_proj.weight + s B' A'`.

    Build it through `tt.lora.apply` (registered for nn.MultiheadAttention, counted by "all-linear"), or as
    `LoRAMultiheadAttention.from_spec(mha, tt.lora.LoraSpec(rank=8, alpha=16))`. The forward takes the
    module's own arguments and returns what it returns, `(output, weights or None)`.

    Parameters of the active adapter: `lora_A` (r, E), `lora_B` (3E, r) for in_proj; `lora_out_A` (r, E),
    `lora_out_B` (E, r) for out_proj; A kaiming-uniform (or N(0, 1/r) with init="gaussian"), B zero.
    The module's attributes (`embed_dim`, `num_heads`, `batch_first`, `in_proj_weight`, `out_proj`...)
    read through to the base, unadapted, as PEFT's wrapper does, except `dropout`, which is the
    adapter's (unused, see the module docstring); the attention dropout is `layer.base.dropout`.

    Raises (on construction):
        TypeError: not an nn.MultiheadAttention, separate q/k/v weights, its own `forward`, or an
            `out_proj` that is not an nn.Linear.
        ValueError: dora=True or init="pissa".
    """

    lora_A = factor_property("lora_A", "The active adapter's in_proj A, (rank, embed_dim).")
    lora_B = factor_property("lora_B", "The active adapter's in_proj B, (3 embed_dim, rank).")
    lora_out_A = factor_property("lora_out_A", "The active adapter's out_proj A, (rank, E).")
    lora_out_B = factor_property("lora_out_B", "The active adapter's out_proj B, (E, rank).")

    # read by nn.TransformerEncoderLayer / nn.TransformerEncoder when they decide on their fused paths
    embed_dim, kdim, vdim, num_heads = (_base_attr(n) for n in ("embed_dim", "kdim", "vdim", "num_heads"))
    head_dim, batch_first, _qkv_same_embed_dim = (_base_attr(n) for n in ("head_dim", "batch_first",
                                                                          "_qkv_same_embed_dim"))
    in_proj_weight, in_proj_bias, out_proj = (_base_attr(n) for n in ("in_proj_weight", "in_proj_bias", "out_proj"))
    bias_k, bias_v, add_zero_attn = (_base_attr(n) for n in ("bias_k", "bias_v", "add_zero_attn"))

    @classmethod
    def cannot_wrap(cls, base: nn.Module) -> str | None:
        if not isinstance(base, nn.MultiheadAttention):
            return f"LoRAMultiheadAttention wraps an nn.MultiheadAttention, got {type(base).__name__}"
        if not base._qkv_same_embed_dim:
            return (f"it has separate q/k/v weights (kdim={base.kdim}, vdim={base.vdim}, embed_dim={base.embed_dim}); "
                    "LoRA here adapts the packed in_proj_weight only, as PEFT, which refuses this case too")
        if type(base).forward is not nn.MultiheadAttention.forward:
            return ("it overrides nn.MultiheadAttention.forward, which may not read in_proj_weight / out_proj.weight "
                    "as the adapter assumes (register a layer for the type with tt.lora.register_layer)")
        if not isinstance(base.out_proj, nn.Linear):
            return f"its out_proj is a {type(base.out_proj).__name__}, not an nn.Linear (PEFT refuses this too)"
        return None

    def merge_masks(self, *args, **kwargs):
        """The base's `merge_masks` (nn.TransformerEncoderLayer's fused path calls it)."""
        return self.base.merge_masks(*args, **kwargs)

    # ------------------------------------------------------------------ the adapter's factors
    def _factor_pairs(self) -> tuple[tuple[str, str], ...]:
        return (_IN, _OUT)

    def _factor_shapes(self, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
        e, r = self.base.embed_dim, spec.rank
        return {"lora_A": (r, e), "lora_B": (3 * e, r), "lora_out_A": (r, e), "lora_out_B": (e, r)}

    def file_tensors(self, name: str | None = None) -> dict[str, nn.Parameter]:
        """PEFT's key ends: in_proj's factors on the layer's own path, out_proj's under `base_layer.out_proj`."""
        return {_FILE_KEYS[kind]: p for kind, p in self.adapter_parameters(name).items()}

    def _refuse_spec(self, spec: LoraSpec) -> None:
        if spec.dora:
            raise ValueError("LoRA on nn.MultiheadAttention does not support dora=True (PEFT neither: its "
                             "MultiheadAttention layer refuses use_dora); exclude the attention modules or use "
                             "plain LoRA")
        if spec.init == "pissa":
            raise ValueError("LoRA on nn.MultiheadAttention does not support init='pissa' (PEFT cannot apply it there "
                             "either); exclude the attention modules, or use init='kaiming' or 'gaussian'")

    def add_adapter(self, name: str, spec: LoraSpec) -> None:
        """As `LoRALayer.add_adapter`; warns when `spec.dropout` > 0, which has no effect here (see the module docs)."""
        super().add_adapter(name, spec)
        if spec.dropout > 0:
            warnings.warn(f"LoRA dropout={spec.dropout:g} has no effect on nn.MultiheadAttention: its adapter is "
                          "applied to the projection weights, so there is no adapter input to drop (PEFT ignores "
                          "it there too); the value is kept in the adapter's config", stacklevel=2)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """Initialise the active adapter's A factors by its init and set its B factors to zero."""
        self._reset(self.active_adapter)

    @torch.no_grad()
    def _reset(self, name: str) -> None:
        spec = self.adapters[name]
        for a_kind, b_kind in (_IN, _OUT):
            lora_A = self._factor(a_kind, name)
            if spec.init == "gaussian":
                nn.init.normal_(lora_A, std=1.0 / spec.rank)
            else:
                nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
            nn.init.zeros_(self._factor(b_kind, name))

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """`s B A` of in_proj, (3 embed_dim, embed_dim), in the adapter's dtype."""
        return (self._factor("lora_B", name) @ self._factor("lora_A", name)) * self._spec(name).scaling

    def out_delta_weight(self, name: str | None = None) -> torch.Tensor:
        """`s B' A'` of out_proj, (embed_dim, embed_dim), in the adapter's dtype."""
        return (self._factor("lora_out_B", name) @ self._factor("lora_out_A", name)) * self._spec(name).scaling

    def _adapted(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """{parameter name on the base: base weight + its delta (in the base dtype)}; keeps the autograd graph
        to the factors (the order of operations is PEFT's, so both give the same floats)."""
        w_in, w_out = self.base.in_proj_weight, self.base.out_proj.weight
        return {"in_proj_weight": w_in + self.delta_weight(name).to(w_in.dtype),
                "out_proj.weight": w_out + self.out_delta_weight(name).to(w_out.dtype)}

    # ---------------------------------------------------------------------------- merging
    @torch.no_grad()
    def merged_weights(self) -> dict[str, torch.Tensor]:
        """{"in_proj_weight", "out_proj.weight"} with the active adapter folded in, as `merge` writes them;
        the base's own weights (detached) when merged already or lacking the active adapter."""
        self._refuse_merge("merged_weights")
        if self.merged or not self._holds_active():
            return {"in_proj_weight": self.base.in_proj_weight.detach(),
                    "out_proj.weight": self.base.out_proj.weight.detach()}
        return self._adapted()

    def merged_weight(self) -> torch.Tensor:
        """Not defined here (two weights): use `merged_weights()` or `merged_state()`."""
        raise TypeError("LoRAMultiheadAttention adapts two weights (in_proj_weight, out_proj.weight); "
                        "use merged_weights() or merged_state()")

    @torch.no_grad()
    def merged_state(self) -> dict[str, torch.Tensor]:
        """The plain nn.MultiheadAttention's state dict with the active adapter folded into `in_proj_weight` and
        `out_proj.weight`; the layer is unchanged."""
        state = {k: v.detach() for k, v in self.base.state_dict().items()}
        state.update(self.merged_weights())
        return state

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into `in_proj_weight` and `out_proj.weight`, in place (the same Parameters);
        a second call does nothing (nor does a layer that lacks the active adapter)."""
        if self.merged or not self._holds_active():
            return
        self._refuse_merge("merge")
        self.base.in_proj_weight.add_(self.delta_weight().to(self.base.in_proj_weight.dtype))
        self.base.out_proj.weight.add_(self.out_delta_weight().to(self.base.out_proj.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter out of both weights again (exact up to the base dtype's rounding); safe to call twice."""
        if not self.merged:
            return
        self.base.in_proj_weight.sub_(self.delta_weight().to(self.base.in_proj_weight.dtype))
        self.base.out_proj.weight.sub_(self.out_delta_weight().to(self.base.out_proj.weight.dtype))
        self.merged = False

    # ---------------------------------------------------------------------------- forward
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """nn.MultiheadAttention's forward (same arguments, same returns) under the active adapter."""
        kwargs = {"key_padding_mask": key_padding_mask, "need_weights": need_weights, "attn_mask": attn_mask,
                  "average_attn_weights": average_attn_weights, "is_causal": is_causal}
        name = self.active_adapter
        if self._rows is not None:
            name = self._single_row_adapter()
        if self.merged or self._disabled or name not in self.adapters:
            return self.base(query, key, value, **kwargs)
        # the module's own forward with the two weights swapped for the adapted ones; under no_grad in eval
        # they do not require grad, so its fused path runs, on the adapted weights
        return functional_call(self.base, self._adapted(name), (query, key, value), kwargs)

    def _single_row_adapter(self) -> str | None:
        """The one adapter every row of an `adapter_per_row` batch uses; several are refused (as PEFT does)."""
        groups = self._rows[1]
        if len(groups) > 1:
            raise RuntimeError(f"adapter_per_row: LoRA on nn.MultiheadAttention cannot mix adapters in one batch "
                               f"(rows ask for {sorted(groups, key=str)}); its adapter is applied to the weights, "
                               "which all rows share (PEFT refuses mixed batches here too): run one adapter per batch")
        return next(iter(groups))


register_layer(nn.MultiheadAttention, LoRAMultiheadAttention, linear=True)
