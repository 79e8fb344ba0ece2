"""LoRA layers: wrap an existing `nn.Linear` / `nn.Embedding`, add `scaling * B A` beside it.

The wrapped module is kept as `.base`, the very object the model had: its weight is shared,
never copied. The adapter's `lora_A` (r x in) and `lora_B` (out x r) are the only new parameters
(plus, with DoRA, `lora_magnitude_vector`); `B` starts at zero so the wrapped layer computes
exactly what the base did. Adapter parameters are kept in fp32 when the base is bf16/fp16 (fp64
bases keep fp64, for gradcheck-grade tests). The DoRA and PiSSA maths live in `lora_variants`.

State changes only through `merge()` / `unmerge()` (and `tinytune.lora.disabled`): nothing
happens in `forward`, `train()` or `eval()`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import lora_linear
from .lora_variants import dora_embedding, dora_fold, dora_linear, dora_unfold, dora_weight_norm, pissa_factors

INITS = ("kaiming", "gaussian", "pissa")


def check_hyperparameters(rank: int, alpha: float, dropout: float, init: str) -> None:
    """Raise ValueError naming the bad field (shared by the config and the layers)."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got rank={rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got alpha={alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got dropout={dropout!r}")
    if init not in INITS:
        raise ValueError(f"unknown LoRA init={init!r}; expected one of {', '.join(map(repr, INITS))}")


def check_dora(dora) -> None:
    """Raise ValueError unless `dora` is a bool (a string such as "false" would be truthy)."""
    if not isinstance(dora, bool):
        raise ValueError(f"LoRA dora must be True or False, got dora={dora!r}")


def lora_scaling(rank: int, alpha: float, rslora: bool) -> float:
    """alpha / rank, or alpha / sqrt(rank) for rsLoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision bases (adapters train in fp32), else the base's own dtype."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


class _LoRABase(nn.Module):
    """What LoRALinear and LoRAEmbedding share: hyperparameters, merge state and the delta."""

    _dora_axis = 1  # the weight axis DoRA's norm runs over (1: per output row of a linear)

    def _setup(self, base: nn.Module, rank: int, alpha: float, dropout: float, rslora: bool, init: str,
               dora: bool):
        check_hyperparameters(rank, alpha, dropout, init)
        check_dora(dora)
        self.base = base
        self.rank, self.alpha, self.dropout = rank, float(alpha), float(dropout)
        self.rslora, self.init, self.dora = bool(rslora), init, dora
        self.scaling = lora_scaling(rank, alpha, rslora)
        self.merged = False
        self._disabled = False  # set only by tinytune.lora.disabled()
        # DoRA: the norm `merge` folded with, kept until `unmerge` (it cannot be recovered from the
        # merged weight); None whenever the layer is not merged. Not saved in state dicts.
        self.register_buffer("_dora_merge_norm", None, persistent=False)

    def _add_magnitude(self, size: int, factory: dict) -> None:
        if self.dora:  # filled by reset_lora_parameters / PiSSA init, once B A is set
            self.lora_magnitude_vector = nn.Parameter(torch.empty(size, **factory))

    @torch.no_grad()
    def _reset_magnitude(self) -> None:
        if self.dora:  # m = ||W + s B A||: the layer equals its base at init
            self.lora_magnitude_vector.copy_(self.dora_weight_norm())

    def dora_weight_norm(self) -> torch.Tensor:
        """DoRA's `||W + s B A||` per output row (linear) or embedding dim (embedding), detached.

        Computed in the adapter's dtype with autocast off: a bf16 norm would make DoRA's scale
        noisy. Costs a `B A` product and one pass over the base weight (a full-size temporary).
        """
        with torch.autocast(self.base.weight.device.type, enabled=False):
            return dora_weight_norm(self.base.weight, self.delta_weight().detach(), self._dora_axis)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (so code that reads `layer.weight` keeps working)."""
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """`scaling * B A` in the base weight's layout, in the adapter's dtype."""
        raise NotImplementedError

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The base weight with the adapter folded in, as `merge` writes it; the layer is unchanged.

        Returns:
            `W + s B A` (DoRA: `m / ||W + s B A|| * (W + s B A)`) in the base dtype; the base
            weight itself, detached, when the layer is merged already.
        """
        weight = self.base.weight.detach()
        if self.merged:
            return weight
        delta = self.delta_weight().detach()
        if self.dora:
            return dora_fold(weight, delta, self.lora_magnitude_vector, self.dora_weight_norm(), self._dora_axis)
        return weight + delta.to(weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight; a second call does nothing."""
        if self.merged:
            return
        weight = self.base.weight
        if self.dora:
            norm = self.dora_weight_norm()  # from the unmerged weight, as forward sees it
            weight.copy_(dora_fold(weight, self.delta_weight(), self.lora_magnitude_vector, norm, self._dora_axis))
            self._dora_merge_norm = norm
        else:
            weight.add_(self.delta_weight().to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter out again (exact up to the base dtype's rounding); safe to call twice."""
        if not self.merged:
            return
        weight = self.base.weight
        if self.dora:
            norm = self._dora_merge_norm
            weight.copy_(dora_unfold(weight, self.delta_weight(), self.lora_magnitude_vector, norm, self._dora_axis))
            self._dora_merge_norm = None
        else:
            weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
                f"init={self.init}, dora={self.dora}, merged={self.merged}")


class LoRALinear(_LoRABase):
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

    Raises:
        TypeError: `base` is not an `nn.Linear`, or is a subclass with its own `forward`.
        ValueError: a bad rank, alpha, dropout, init or dora; with "pissa", rank > min(in, out).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, init: str = "kaiming", dora: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if type(base).forward is not nn.Linear.forward:
            raise TypeError(
                f"LoRALinear cannot wrap {type(base).__name__}: it overrides nn.Linear.forward, and the fused "
                "op computes x W^T + b directly, which would bypass that forward"
            )
        self._setup(base, rank, alpha, dropout, rslora, init, dora)
        base.requires_grad_(False)  # the base is frozen; apply(train_bias=True) re-enables its bias
        factory = {"dtype": adapter_dtype(base.weight.dtype), "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        self._add_magnitude(base.out_features, factory)
        if init == "pissa":
            self._init_pissa()
        else:
            self.reset_lora_parameters()

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
        """Initialise A by `self.init` and set B to zero (DoRA: m to the base's row norms), so the
        layer equals its base.

        Raises:
            RuntimeError: the layer was initialised with PiSSA: its base weight already holds the
                residual, and running PiSSA again would take the principal part out twice.
        """
        if self.init == "pissa":
            raise RuntimeError("reset_lora_parameters: this LoRALinear was initialised with init='pissa', so its base "
                               "weight already holds the residual W - s B A; re-initialising would remove the principal "
                               "part twice (merge_and_unload first, then apply LoRA again)")
        if self.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1.0 / self.rank)
        nn.init.zeros_(self.lora_B)
        self._reset_magnitude()

    @torch.no_grad()
    def _init_pissa(self) -> None:
        lora_A, lora_B, residual = pissa_factors(self.base.weight, self.rank, self.scaling)
        self.lora_A.copy_(lora_A)
        self.lora_B.copy_(lora_B)
        self.base.weight.copy_(residual)  # in place: the model's own Parameter now holds W - s B A
        self._reset_magnitude()  # ||W_res + s B A|| = ||W|| up to rounding

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self._disabled:
            return self.base(x)
        p = self.dropout if self.training else 0.0
        if self.dora:  # plain ops around the fused op; see lora_variants.dora_linear for the cost
            return dora_linear(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B,
                               self.lora_magnitude_vector, self.dora_weight_norm(), self.scaling, p)
        return lora_linear(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling, p)


class LoRAEmbedding(_LoRABase):
    """`base(ids) + scaling * A^T[ids] B^T` for an `nn.Embedding` (PEFT's `lora_embedding_A/B`).

    Shapes follow PEFT: `lora_embedding_A` is (r, num_embeddings), `lora_embedding_B` is
    (embedding_dim, r). B starts at zero; A is N(0, 1) for init="kaiming" (PEFT's embedding
    init, with the roles of A and B swapped so that B = 0 as for linears) or N(0, 1/r) for
    "gaussian". init="pissa" gives embeddings the "kaiming" init and leaves the base weight
    alone, as PEFT does. No dropout on token ids.

    With `dora=True`, as PEFT: `lora_magnitude_vector` has `embedding_dim` entries, initialised
    to the norms of the columns of W + s (B A)^T (each taken over the whole vocabulary), and the
    output is `m / ||W + s (B A)^T|| * (W[ids] + s A^T[ids] B^T)`.

    Raises:
        TypeError: `base` is not an `nn.Embedding`.
        ValueError: a bad rank, alpha, dropout, init or dora.
    """

    _dora_axis = 0  # PEFT's embedding DoRA: one norm per embedding dim, over the vocabulary

    def __init__(self, base: nn.Embedding, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, init: str = "kaiming", dora: bool = False):
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"LoRAEmbedding wraps an nn.Embedding, got {type(base).__name__}")
        self._setup(base, rank, alpha, dropout, rslora, init, dora)
        base.requires_grad_(False)
        factory = {"dtype": adapter_dtype(base.weight.dtype), "device": base.weight.device}
        self.lora_embedding_A = nn.Parameter(torch.empty(rank, base.num_embeddings, **factory))
        self.lora_embedding_B = nn.Parameter(torch.zeros(base.embedding_dim, rank, **factory))
        self._add_magnitude(base.embedding_dim, factory)
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """Initialise A by `self.init` and set B to zero (DoRA: m to the base's column norms), so
        the layer equals its base."""
        nn.init.normal_(self.lora_embedding_A, std=1.0 / self.rank if self.init == "gaussian" else 1.0)
        nn.init.zeros_(self.lora_embedding_B)
        self._reset_magnitude()

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scaling  # (num_embeddings, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        if self.merged or self._disabled:
            return out
        # padding_idx only (no max_norm: F.embedding would renormalise the adapter in place)
        after_a = F.embedding(ids, self.lora_embedding_A.t(), self.base.padding_idx)  # (..., r)
        if self.dora:
            return dora_embedding(out, after_a, self.lora_embedding_B, self.lora_magnitude_vector,
                                  self.dora_weight_norm(), self.scaling)
        low_rank = (after_a @ self.lora_embedding_B.t()) * self.scaling  # (..., dim)
        return out + low_rank.to(out.dtype)


LORA_LAYER_TYPES = (LoRALinear, LoRAEmbedding)
