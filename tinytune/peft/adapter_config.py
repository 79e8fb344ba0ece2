"""`AdapterConfig`: what `adapter.apply` does (bottleneck size or reduction factor, placement, activation,
scaling, dropout, targets), validated on construction, and `bottleneck_for`, the bottleneck of one module.
`adapter.py` applies it and reads and writes PEFT's files."""
from __future__ import annotations

from dataclasses import dataclass

from .. import _check
from ._targets import TargetSpec, validate_spec
from .adapter_layers import check_layer_args
from .modules_to_save import check_names


class _NotGiven(int):
    """The default bottleneck (an int equal to 64) marked as not passed by the user, so that
    `AdapterConfig(reduction_factor=16)` alone is no conflict with it."""


def _positive_int_or_none(value, field: str) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"AdapterConfig.{field} must be an integer >= 1 or None, got {field}={value!r}")


@dataclass
class AdapterConfig:
    """What `apply` does. Validated on construction (ValueError naming the field and the choices).

    Attributes:
        bottleneck: b, the adapter's inner size (>= 1). Default 64.
        placement: "houlsby" (serial after attention and FFN), "pfeiffer" (serial after the FFN)
            or "parallel" (beside the sublayer, reading its input).
        targets: the modules to wrap, by the LoRA matching rules (a list of names or dotted
            suffixes, a regex, "all-linear", a callable). None: by placement, Llama names:
            houlsby -> every `*.self_attn` and `*.mlp`; pfeiffer, parallel -> every `*.mlp`.
        reduction_factor: r; bottleneck = hidden // r for each wrapped module. Giving an explicit
            `bottleneck` too is allowed only when they agree (checked per module).
        activation: "relu", "gelu", "silu" or "tanh".
        scaling: s > 0, the factor on the adapter's output (every placement).
        dropout: dropout after the activation, in training mode, in [0, 1).
        hidden_size: d; None infers it per module from its nn.Linear layers (see `apply`).
        exclude: modules to leave alone, by the same rules as `targets`.
        modules_to_save: modules trained whole and saved with the adapters (PEFT's field; names equal
            or a dotted suffix); see tinytune/peft/modules_to_save.py.
    """

    bottleneck: int | None = _NotGiven(64)
    placement: str = "houlsby"
    targets: TargetSpec = None
    reduction_factor: int | None = None
    activation: str = "relu"
    scaling: float = 1.0
    dropout: float = 0.0
    hidden_size: int | None = None
    exclude: TargetSpec = None
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        self.modules_to_save = check_names(self.modules_to_save, "AdapterConfig.modules_to_save")
        if isinstance(self.bottleneck, _NotGiven) and self.reduction_factor is not None:
            self.bottleneck = None  # only the reduction factor was given: b comes from each module's d
        if self.bottleneck is None and self.reduction_factor is None:
            raise ValueError("AdapterConfig needs bottleneck or reduction_factor; both are None")
        for field in ("placement", "activation"):  # types first; the choices as the layers name them
            _check.string(getattr(self, field), f"AdapterConfig.{field}", name=field)
        _check.number(self.dropout, "AdapterConfig.dropout", name="dropout")  # a finite number; [0, 1) below
        check_layer_args(self.bottleneck, self.placement, self.activation, self.scaling, self.dropout)
        _positive_int_or_none(self.reduction_factor, "reduction_factor")
        _positive_int_or_none(self.hidden_size, "hidden_size")
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        validate_spec(self.targets, "AdapterConfig.targets")
        validate_spec(self.exclude, "AdapterConfig.exclude")
        if self.hidden_size is not None:
            self.bottleneck_for(self.hidden_size, "AdapterConfig.hidden_size")

    def bottleneck_for(self, hidden: int, where: str = "the module") -> int:
        """The bottleneck for a module of hidden size `hidden`.

        Args:
            hidden: d of the module. where: how to name the module in errors.

        Returns:
            `bottleneck`, or `hidden // reduction_factor` when a reduction factor is set.

        Raises:
            ValueError: hidden // reduction_factor < 1, or it disagrees with an explicit bottleneck.
        """
        if self.reduction_factor is None:
            return int(self.bottleneck)
        size = hidden // self.reduction_factor
        if size < 1:
            raise ValueError(f"AdapterConfig.reduction_factor={self.reduction_factor} leaves no bottleneck for "
                             f"{where} (hidden size {hidden}): {hidden} // {self.reduction_factor} = 0")
        if self.bottleneck is not None and self.bottleneck != size:
            raise ValueError(f"AdapterConfig.bottleneck={self.bottleneck} conflicts with reduction_factor="
                             f"{self.reduction_factor}: {where} (hidden size {hidden}) gives {hidden} // "
                             f"{self.reduction_factor} = {size}; give only one of them")
        return size
