"""LoRA's hyperparameters: the user's `LoraConfig` and the frozen, validated `LoraSpec` the layers take.

`LoraConfig` says what to adapt (targets, exclude, train_bias) and how (its `spec`); it is validated
once, on construction. A layer never re-checks: it takes a `LoraSpec` (rank, alpha, dropout, rslora,
init, dora, and the derived scaling), itself validated once when it is made. `LoRALinear(base, rank,
alpha, ...)` builds its spec from the same arguments, so hand-made layers are checked the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ... import _check
from .._targets import TargetSpec, validate_spec
from ..modules_to_save import check_names

INITS = ("kaiming", "gaussian", "pissa")
DEFAULT_ADAPTER = "default"  # PEFT's name for the first adapter


def lora_scaling(rank: int, alpha: float, rslora: bool) -> float:
    """alpha / rank, or alpha / sqrt(rank) for rsLoRA (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def check_adapter_name(name) -> None:
    """Raise ValueError unless `name` can name an adapter: a non-empty str without "." (a
    parameter name cannot hold one)."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"an adapter name must be a non-empty string without '.', got {name!r}")


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class LoraSpec:
    """One adapter's hyperparameters, validated on construction; what every LoRA layer takes.

    Attributes:
        rank: r (an int >= 1). alpha: the scale numerator (finite, > 0). dropout: in [0, 1).
        rslora: rank-stabilised scaling. init: one of `INITS`. dora: weight-decomposed LoRA.
        scaling: derived, `alpha / rank` (or `alpha / sqrt(rank)` with rslora).

    Raises:
        ValueError: a bad field, naming it and the value (a string "false" is not a bool).
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"
    dora: bool = False
    scaling: float = field(init=False)

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got rank={self.rank!r}")
        if not _finite_number(self.alpha) or not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be a finite number > 0, got alpha={self.alpha!r}")
        if not _finite_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got dropout={self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"unknown LoRA init={self.init!r}; expected one of {', '.join(map(repr, INITS))}")
        for name in ("rslora", "dora"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoRA {name} must be True or False, got {name}={getattr(self, name)!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "scaling", lora_scaling(self.rank, self.alpha, self.rslora))


@dataclass
class LoraConfig:
    """What `apply` does. Validated on construction (ValueError naming the field).

    Attributes:
        rank: r, the inner dimension of each update (>= 1).
        alpha: scale numerator (> 0); scaling = alpha / rank, or alpha / sqrt(rank) with `rslora`.
        dropout: dropout on the adapter input in training mode, in [0, 1).
        targets: which modules get LoRA: a list of names (equal, or a dotted suffix), a regex
            (`re.fullmatch` on the dotted name), "all-linear", or a callable `(name, module) -> bool`.
        exclude: modules to leave alone, by the same rules.
        rslora: rank-stabilised scaling.
        init: "kaiming" or "gaussian" for A, with B zero; or "pissa": A and B from the top-`rank`
            singular vectors of each adapted linear weight, whose base weight is replaced in place
            by the residual (embeddings get the "kaiming" init, as in PEFT).
        train_bias: also train the biases of the adapted layers (PEFT's bias="lora_only").
        dora: DoRA, weight-decomposed LoRA: one extra trainable magnitude per output feature
            (per embedding dim for embeddings), saved as PEFT's `lora_magnitude_vector`.
        modules_to_save: modules trained whole beside the adapter and saved with it (PEFT's field): a
            list of names (equal, or a dotted suffix); LoRA is never put inside them. A classifier's
            head is added by the model itself (see tinytune/peft/modules_to_save.py). They are shared
            by every LoRA adapter on the model (PEFT keeps one copy per adapter).

    Raises:
        ValueError: a bad rank, alpha, dropout, init, dora, rslora, train_bias, targets, exclude or
            modules_to_save (naming the field; `_check.FieldError`, also a TypeError, for a wrong type or range).
    """

    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: TargetSpec = ("q_proj", "v_proj")
    exclude: TargetSpec = None
    rslora: bool = False
    init: str = "kaiming"
    train_bias: bool = False
    dora: bool = False
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        _check.integer(self.rank, "LoraConfig.rank", 1, name="rank")
        self.modules_to_save = check_names(self.modules_to_save, "LoraConfig.modules_to_save")
        _check.number(self.alpha, "LoraConfig.alpha", 0, low_open=True, name="alpha")  # inf: NaN outputs
        _check.number(self.dropout, "LoraConfig.dropout", 0, 1, high_open=True, name="dropout")
        for name in ("rslora", "train_bias"):
            _check.boolean(getattr(self, name), f"LoraConfig.{name}", name=name)
        self.spec  # noqa: B018 -- the layers' own checks (init, dora), once, here
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if self.targets is None:
            raise ValueError("LoraConfig.targets is None; give module names, a regex, 'all-linear' or a callable")
        validate_spec(self.targets, "LoraConfig.targets")
        validate_spec(self.exclude, "LoraConfig.exclude")

    @property
    def spec(self) -> LoraSpec:
        """The layers' hyperparameters (a frozen `LoraSpec`)."""
        return LoraSpec(self.rank, self.alpha, self.dropout, self.rslora, self.init, self.dora)

    @property
    def scaling(self) -> float:
        """The factor applied to B A."""
        return self.spec.scaling
