"""LoRA layers: wrap an existing `nn.Linear` / `nn.Embedding`, add `scaling * B A` beside it.

The wrapped module is kept as `.base`, the very object the model had: its weight is shared,
never copied. The adapter's `lora_A` (r x in) and `lora_B` (out x r) are the only new parameters
(plus, with DoRA, `lora_magnitude_vector`); `B` starts at zero so the wrapped layer computes
exactly what the base did. A layer can hold several named adapters (see `base`); these
attributes are the active one's. The DoRA and PiSSA maths live in `variants`.

State changes only through `merge()` / `unmerge()` (and `tinytune.lora.disabled`): nothing
happens in `forward`, `train()` or `eval()`.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from ...ops import lora_expand_linear, lora_linear
from .attributes import factor_property
from .base import LoRALayer, init_lora_A
from .config import DEFAULT_ADAPTER, LoraSpec
from .registry import register_layer
from .variants import dora_embedding, dora_linear, pissa_factors


class LoRALinear(LoRALayer):
    """`base(x) + scaling * dropout(x) A^T B^T`, computed by the fused op `tinytune.ops.lora_linear`.

    Args:
        base: the `nn.Linear` to adapt; kept as `.base`, weights shared.
        rank: r, the inner dimension of the update.
        alpha: the scale numerator; `scaling = alpha / rank` (or `alpha / sqrt(rank)` with rslora).
        dropout: dropout on the adapter's input only, active in training mode.
        rslora: use rank-stabilised scaling.
        init: "kaiming" (A kaiming-uniform, as nn.Linear and PEFT) or "gaussian" (A ~ N(0, 1/r)),
            B = 0; or "pissa": A, B from the top-r singular vectors of W, and the base weight
            REPLACED IN PLACE by the residual `W - s B A` (see docs/lora_variants.md).
        dora: weight-decomposed LoRA: adds `lora_magnitude_vector` (out_features,), initialised
            to the row norms of W + s B A; forward computes `m / ||W + s B A|| * (W + s B A) x + b`.
        adapter_name: the name of this first adapter, which is the active one (more with
            `add_adapter`; see docs/multi_adapter.md).

    Raises:
        TypeError: `base` is not an `nn.Linear`, or is a subclass with its own `forward`.
        ValueError: a bad rank, alpha, dropout, init, dora or adapter name; with "pissa", rank > min(in, out).
    """

    _merges_for_inference = True  # generation_context(): one matmul with the merged weight (see `inference`)
    _shrink_group = None  # a shared_shrink.ShrinkGroup with its siblings reading one input, set by apply
    lora_A = factor_property("lora_A", "The active adapter's A, (rank, in_features).")
    lora_B = factor_property("lora_B", "The active adapter's B, (out_features, rank).")

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, init: str = "kaiming", dora: bool = False,
                 adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        self._wrap(base, LoraSpec(rank, alpha, dropout, rslora, init, dora), adapter_name)

    def __getstate__(self) -> dict:
        # The shared-shrink group travels with the parent's hooks and relinks its members on load; pickled
        # here, a layer saved or copied alone would carry its siblings and parent with it.
        getstate = getattr(super(), "__getstate__", None)
        state = dict(getstate() if getstate is not None else self.__dict__)
        state.pop("_shrink_group", None)
        return state

    @classmethod
    def cannot_wrap(cls, base: nn.Module) -> str | None:
        if not isinstance(base, nn.Linear):
            return f"LoRALinear wraps an nn.Linear, got {type(base).__name__}"
        if type(base).forward is not nn.Linear.forward:
            return ("it overrides nn.Linear.forward, and the fused op computes x W^T + b directly, which would "
                    "bypass that forward (register a layer for the type with tt.lora.register_layer)")
        return None

    def _dims(self) -> tuple[int, int]:
        return self.base.in_features, self.base.out_features

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def bias(self) -> torch.Tensor | None:
        """The base bias."""
        return self.base.bias

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """Initialise the active adapter's A by its init and set B to zero (DoRA: m to the base's
        row norms), so the layer equals its base.

        Raises:
            RuntimeError: the adapter was initialised with PiSSA: the base weight already holds the
                residual, and running PiSSA again would take the principal part out twice.
        """
        self._reset(self.active_adapter)

    @torch.no_grad()
    def _reset(self, name: str) -> None:
        spec = self.adapters[name]
        if spec.init == "pissa":
            raise RuntimeError("reset_lora_parameters: this LoRALinear was initialised with init='pissa', so its base "
                               "weight already holds the residual W - s B A; re-initialising would remove the principal "
                               "part twice (merge_and_unload first, then apply LoRA again)")
        init_lora_A(self._factor("lora_A", name), spec)
        nn.init.zeros_(self._factor("lora_B", name))
        self._reset_magnitude(name)

    @torch.no_grad()
    def _init_adapter(self, name: str) -> None:
        if self.adapters[name].init != "pissa":
            return self._reset(name)
        lora_A, lora_B, residual = pissa_factors(self.base.weight, self.adapters[name].rank, self.adapters[name].scaling)
        self._factor("lora_A", name).copy_(lora_A)
        self._factor("lora_B", name).copy_(lora_B)
        self.base.weight.copy_(residual)  # in place: the model's own Parameter now holds W - s B A
        self._reset_magnitude(name)  # ||W_res + s B A|| = ||W|| up to rounding

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        return (self._factor("lora_B", name) @ self._factor("lora_A", name)) * self._spec(name).scaling  # (out, in)

    def _forward_adapter(self, x: torch.Tensor, name: str | None) -> torch.Tensor:
        spec = self.adapters.get(name)
        if spec is None:
            return self.base(x)
        p = spec.dropout if self.training else 0.0
        lora_A, lora_B = self._factor_tensor("lora_A", name), self._factor_tensor("lora_B", name)
        weight = self._linear_weight()
        if spec.dora:  # plain ops around the fused op; see variants.dora_linear for the cost
            return dora_linear(x, weight, self.base.bias, lora_A, lora_B,
                               self._factor("lora_magnitude_vector", name), self.dora_weight_norm(name), spec.scaling, p)
        if p == 0.0 and self._shrink_group is not None and self._rows is None and name == self.active_adapter:
            shared = self._shrink_group.low_rank_input(self, x)  # this layer's slice of a pass shared with siblings
            if shared is not None:
                u, constant = shared
                if constant:  # saved-tensor hooks: the usual Function, saving what it saves unshared
                    return lora_linear(x, weight, self.base.bias, lora_A, lora_B, spec.scaling, 0.0, given_xa=u)
                return lora_expand_linear(x, weight, self.base.bias, u, lora_B, spec.scaling)
        return lora_linear(x, weight, self.base.bias, lora_A, lora_B, spec.scaling, p)

    def _linear_weight(self) -> torch.Tensor:
        """The base weight as the fused op takes it, (out, in) (a transposed base returns a view)."""
        return self.base.weight


class LoRAEmbedding(LoRALayer):
    """`base(ids) + scaling * A^T[ids] B^T` for an `nn.Embedding` (PEFT's `lora_embedding_A/B`).

    Shapes follow PEFT: `lora_embedding_A` is (r, num_embeddings), `lora_embedding_B` is
    (embedding_dim, r). B starts at zero; A is N(0, 1) for init="kaiming" (PEFT's embedding
    init, with the roles of A and B swapped so that B = 0 as for linears) or N(0, 1/r) for
    "gaussian". init="pissa" gives embeddings the "kaiming" init and leaves the base weight
    alone, as PEFT does. No dropout on token ids. `adapter_name` as for `LoRALinear`.

    With `dora=True`, as PEFT: `lora_magnitude_vector` has `embedding_dim` entries, initialised
    to the norms of the columns of W + s (B A)^T (each taken over the whole vocabulary), and the
    output is `m / ||W + s (B A)^T|| * (W[ids] + s A^T[ids] B^T)`.

    Raises:
        TypeError: `base` is not an `nn.Embedding`.
        ValueError: a bad rank, alpha, dropout, init, dora or adapter name.
    """

    _dora_axis = 0  # PEFT's embedding DoRA: one norm per embedding dim, over the vocabulary
    _A, _B = "lora_embedding_A", "lora_embedding_B"
    _pissa_rewrites_base = False

    lora_embedding_A = factor_property("lora_embedding_A", "The active adapter's A, (rank, num_embeddings).")
    lora_embedding_B = factor_property("lora_embedding_B", "The active adapter's B, (embedding_dim, rank).")

    def __init__(self, base: nn.Embedding, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, init: str = "kaiming", dora: bool = False,
                 adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        self._wrap(base, LoraSpec(rank, alpha, dropout, rslora, init, dora), adapter_name)

    @classmethod
    def cannot_wrap(cls, base: nn.Module) -> str | None:
        return None if isinstance(base, nn.Embedding) else f"LoRAEmbedding wraps an nn.Embedding, got {type(base).__name__}"

    def _dims(self) -> tuple[int, int]:
        return self.base.num_embeddings, self.base.embedding_dim

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """Initialise the active adapter's A by its init and set B to zero (DoRA: m to the base's
        column norms), so the layer equals its base."""
        self._reset(self.active_adapter)

    @torch.no_grad()
    def _reset(self, name: str) -> None:
        spec = self.adapters[name]
        nn.init.normal_(self._factor(self._A, name), std=1.0 / spec.rank if spec.init == "gaussian" else 1.0)
        nn.init.zeros_(self._factor(self._B, name))
        self._reset_magnitude(name)

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        product = self._factor(self._B, name) @ self._factor(self._A, name)  # (dim, num_embeddings)
        return product.t() * self._spec(name).scaling  # (num_embeddings, dim)

    def _forward_adapter(self, ids: torch.Tensor, name: str | None) -> torch.Tensor:
        out = self.base(ids)
        spec = self.adapters.get(name)
        if spec is None:
            return out
        lora_A, lora_B = self._factor(self._A, name), self._factor(self._B, name)
        # padding_idx only (no max_norm: F.embedding would renormalise the adapter in place)
        after_a = F.embedding(ids, lora_A.t(), self.base.padding_idx)  # (..., r)
        if spec.dora:
            return dora_embedding(out, after_a, lora_B, self._factor("lora_magnitude_vector", name),
                                  self.dora_weight_norm(name), spec.scaling)
        low_rank = (after_a @ lora_B.t()) * spec.scaling  # (..., dim)
        return out + low_rank.to(out.dtype)


__all__ = ["LoRALinear", "LoRAEmbedding"]

register_layer(nn.Linear, LoRALinear, linear=True)
register_layer(nn.Embedding, LoRAEmbedding)
