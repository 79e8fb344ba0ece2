"""The bottleneck adapter modules: `BottleneckAdapter` (down, activation, up) and `AdapterLayer` (a sublayer
plus its adapter, serial or parallel). `adapter.py` finds the sublayers and swaps these in."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._dtype import adapter_dtype

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def check_layer_args(bottleneck, placement: str, activation: str, scaling: float, dropout: float) -> None:
    """Raise ValueError naming the bad field and its choices (shared by the config and the layers)."""
    if bottleneck is not None and (not isinstance(bottleneck, int) or isinstance(bottleneck, bool) or bottleneck < 1):
        raise ValueError(f"adapter bottleneck must be an integer >= 1, got bottleneck={bottleneck!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown adapter placement={placement!r}; expected one of {', '.join(map(repr, PLACEMENTS))}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown adapter activation={activation!r}; expected one of {', '.join(map(repr, ACTIVATIONS))}")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not (math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"adapter scaling must be a finite number > 0, got scaling={scaling!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"adapter dropout must be in [0, 1), got dropout={dropout!r}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype inside `torch.autocast`, else the input's own dtype."""
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class BottleneckAdapter(nn.Module):
    """`up(dropout(act(down(h))))`: (..., d) -> (..., b) -> (..., d).

    Init: `down.weight` kaiming-uniform with a = sqrt(5) (nn.Linear's default, as LoRA's A), `down.bias`
    zero; `up` weight and bias zero, so the output is exactly 0 at init. Parameters are cast to the
    compute dtype in forward (they may be fp32 under a bf16 base).

    Args:
        hidden: d. bottleneck: b. activation: a key of `ACTIVATIONS`.
        dropout: probability after the activation (training mode only). dtype, device: of the parameters.

    Raises:
        ValueError: a bad bottleneck, activation or dropout.
    """

    def __init__(self, hidden: int, bottleneck: int, activation: str = "relu", dropout: float = 0.0,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        check_layer_args(bottleneck, "houlsby", activation, 1.0, dropout)
        self.hidden, self.bottleneck, self.activation, self.dropout = hidden, bottleneck, activation, float(dropout)
        self.down = nn.Linear(hidden, bottleneck, dtype=dtype, device=device)
        self.up = nn.Linear(bottleneck, hidden, dtype=dtype, device=device)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise as described above (the adapter then outputs zero)."""
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(h)
        down = F.linear(h.to(dtype), self.down.weight.to(dtype), self.down.bias.to(dtype))  # (..., b)
        z = F.dropout(ACTIVATIONS[self.activation](down), self.dropout, self.training)
        return F.linear(z, self.up.weight.to(dtype), self.up.bias.to(dtype))  # (..., d)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, bottleneck={self.bottleneck}, activation={self.activation}, dropout={self.dropout:g}"


class AdapterLayer(nn.Module):
    """Wraps a sublayer `.base` (any module, kept as is) and adds a `BottleneckAdapter` `.adapter`.

    Any positional/keyword arguments go to `base` unchanged. Its output is a tensor, or a tuple
    (HF style) whose first element is adapted and the rest kept. Serial placements adapt that
    output; "parallel" adapts the first positional argument (else `hidden_states=`, else the first
    tensor keyword argument) and adds the result to it. Attributes the wrapper lacks are read from
    `base`, so code reading e.g. `layer.self_attn.num_heads` keeps working.

    Args:
        base: the module to wrap (frozen by `apply`, not here).
        hidden_size: d, the last dimension of the tensor the adapter reads and writes.
        bottleneck, activation, dropout: of the `BottleneckAdapter`.
        placement: "houlsby"/"pfeiffer" (serial) or "parallel".
        scaling: factor on the adapter's output.

    Raises:
        ValueError: a bad bottleneck, placement, activation, scaling or dropout.
    """

    def __init__(self, base: nn.Module, hidden_size: int, bottleneck: int, placement: str = "houlsby",
                 activation: str = "relu", scaling: float = 1.0, dropout: float = 0.0):
        super().__init__()
        check_layer_args(bottleneck, placement, activation, scaling, dropout)
        ref = next(base.parameters(), None)
        dtype = adapter_dtype(ref.dtype) if ref is not None and ref.is_floating_point() else None
        self.base = base
        self.adapter = BottleneckAdapter(hidden_size, bottleneck, activation, dropout, dtype,
                                         ref.device if ref is not None else None)
        self.hidden_size, self.bottleneck, self.placement = hidden_size, bottleneck, placement
        self.activation, self.scaling, self.dropout = activation, float(scaling), float(dropout)
        self.config = None  # the AdapterConfig `apply` used, for `applied_config`
        self._disabled = False  # set only by `disabled()`

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None:
                raise
            return getattr(base, name)

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)
        if self._disabled:
            return out
        source = self._parallel_input(args, kwargs) if self.placement == "parallel" else None
        if isinstance(out, torch.Tensor):
            return self._add(out, source)
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            items = (self._add(out[0], source), *out[1:])
            return type(out)(*items) if hasattr(out, "_fields") else items  # namedtuples keep their type
        raise TypeError(f"AdapterLayer: {type(self.base).__name__} returned {type(out).__name__}; an adapter "
                        "needs a tensor or a tuple whose first element is a tensor")

    def _parallel_input(self, args, kwargs) -> torch.Tensor:
        tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor)] or [None]
        x = args[0] if args else kwargs.get("hidden_states", tensors[0])
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"parallel adapter on {type(self.base).__name__}: its first argument is "
                            f"{type(x).__name__}, not the input tensor the adapter reads")
        return x

    def _add(self, out: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        h = out if source is None else source  # serial reads f(x), parallel reads x: (..., d)
        if h.shape[-1] != self.hidden_size:
            role = "input" if source is not None else "output"
            raise ValueError(f"adapter on {type(self.base).__name__} has hidden size {self.hidden_size} but the "
                             f"sublayer's {role} has shape {tuple(h.shape)}; set AdapterConfig.hidden_size")
        delta = self.adapter(h)
        if self.scaling != 1.0:
            delta = delta * self.scaling
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        return f"placement={self.placement}, scaling={self.scaling:g}"
