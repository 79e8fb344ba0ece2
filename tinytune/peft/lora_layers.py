"""LoRA layers: wrap an existing `nn.Linear` / `nn.Embedding`, add `scaling * B A` beside it.

The wrapped module is kept as `.base`, the very object the model had: its weight is shared,
never copied. The adapter's `lora_A` (r x in) and `lora_B` (out x r) are the only new parameters;
`B` starts at zero so the wrapped layer computes exactly what the base did. Adapter parameters
are kept in fp32 when the base is bf16/fp16 (fp64 bases keep fp64, for gradcheck-grade tests).

State changes only through `merge()` / `unmerge()` (and `tinytune.lora.disabled`): nothing
happens in `forward`, `train()` or `eval()`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import lora_linear

INITS = ("kaiming", "gaussian")


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


def lora_scaling(rank: int, alpha: float, rslora: bool) -> float:
    """alpha / rank, or alpha / sqrt(rank) for rsLoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision bases (adapters train in fp32), else the base's own dtype."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


class _LoRABase(nn.Module):
    """What LoRALinear and LoRAEmbedding share: hyperparameters, merge state and the delta."""

    def _setup(self, base: nn.Module, rank: int, alpha: float, dropout: float, rslora: bool, init: str):
        check_hyperparameters(rank, alpha, dropout, init)
        self.base = base
        self.rank, self.alpha, self.dropout = rank, float(alpha), float(dropout)
        self.rslora, self.init = bool(rslora), init
        self.scaling = lora_scaling(rank, alpha, rslora)
        self.merged = False
        self._disabled = False  # set only by tinytune.lora.disabled()

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (so code that reads `layer.weight` keeps working)."""
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        """`scaling * B A` in the base weight's layout, in the adapter's dtype."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Add the delta into the base weight; a second call does nothing."""
        if self.merged:
            return
        weight = self.base.weight
        weight.add_(self.delta_weight().to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the delta again (exact up to the base dtype's rounding); safe to call twice."""
        if not self.merged:
            return
        weight = self.base.weight
        weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, merged={self.merged}"


class LoRALinear(_LoRABase):
    """`base(x) + scaling * dropout(x) A^T B^T`, computed by the fused op `tinytune.ops.lora_linear`.

    Args:
        base: the `nn.Linear` to adapt; kept as `.base`, weights shared.
        rank: r, the inner dimension of the update.
        alpha: the scale numerator; `scaling = alpha / rank` (or `alpha / sqrt(rank)` with rslora).
        dropout: dropout on the adapter's input only, active in training mode.
        rslora: use rank-stabilised scaling.
        init: "kaiming" (A kaiming-uniform, as nn.Linear and PEFT) or "gaussian" (A ~ N(0, 1/r)); B = 0.

    Raises:
        TypeError: `base` is not an `nn.Linear`, or is a subclass with its own `forward`.
        ValueError: a bad rank, alpha, dropout or init.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, init: str = "kaiming"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if type(base).forward is not nn.Linear.forward:
            raise TypeError(
                f"LoRALinear cannot wrap {type(base).__name__}: it overrides nn.Linear.forward, and the fused "
                "op computes x W^T + b directly, which would bypass that forward"
            )
        self._setup(base, rank, alpha, dropout, rslora, init)
        base.requires_grad_(False)  # the base is frozen; apply(train_bias=True) re-enables its bias
        factory = {"dtype": adapter_dtype(base.weight.dtype), "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
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
        """Initialise A by `self.init` and set B to zero, so the layer equals its base."""
        if self.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1.0 / self.rank)
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self._disabled:
            return self.base(x)
        p = self.dropout if self.training else 0.0
        return lora_linear(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling, p)


class LoRAEmbedding(_LoRABase):
    """`base(ids) + scaling * A^T[ids] B^T` for an `nn.Embedding` (PEFT's `lora_embedding_A/B`).

    Shapes follow PEFT: `lora_embedding_A` is (r, num_embeddings), `lora_embedding_B` is
    (embedding_dim, r). B starts at zero; A is N(0, 1) for init="kaiming" (PEFT's embedding
    init, with the roles of A and B swapped so that B = 0 as for linears) or N(0, 1/r) for
    "gaussian". No dropout on token ids.
    """

    def __init__(self, base: nn.Embedding, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, init: str = "kaiming"):
        super().__init__()
        if not isinstance(base, nn.Embedding):
            raise TypeError(f"LoRAEmbedding wraps an nn.Embedding, got {type(base).__name__}")
        self._setup(base, rank, alpha, dropout, rslora, init)
        base.requires_grad_(False)
        factory = {"dtype": adapter_dtype(base.weight.dtype), "device": base.weight.device}
        self.lora_embedding_A = nn.Parameter(torch.empty(rank, base.num_embeddings, **factory))
        self.lora_embedding_B = nn.Parameter(torch.zeros(base.embedding_dim, rank, **factory))
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """Initialise A by `self.init` and set B to zero, so the layer equals its base."""
        nn.init.normal_(self.lora_embedding_A, std=1.0 if self.init == "kaiming" else 1.0 / self.rank)
        nn.init.zeros_(self.lora_embedding_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scaling  # (num_embeddings, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        if self.merged or self._disabled:
            return out
        # padding_idx only (no max_norm: F.embedding would renormalise the adapter in place)
        after_a = F.embedding(ids, self.lora_embedding_A.t(), self.base.padding_idx)  # (..., r)
        low_rank = (after_a @ self.lora_embedding_B.t()) * self.scaling  # (..., dim)
        return out + low_rank.to(out.dtype)


LORA_LAYER_TYPES = (LoRALinear, LoRAEmbedding)
