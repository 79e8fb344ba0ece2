"""LoRA on convolutions (`nn.Conv1d/2d/3d`) and on GPT-2's `Conv1D` from transformers.

A convolution gets PEFT's pair of convolutions beside it:

    y = base(x) + s * B(A(dropout(x)))     A: conv with the base's kernel, stride, padding, dilation,
                                              padding_mode, in_channels -> r;  B: 1x1(x1) conv, r -> out

`lora_A` is (r, in, *kernel) and `lora_B` (out, r, *1s), PEFT's shapes and saved keys
(`<path>.lora_A.weight`, `<path>.lora_B.weight`). As B is 1x1, `B(A(x))` is the single convolution
whose kernel is `B A` over the channel axes, so the update merges exactly into the base weight.
Grouped convolutions (groups > 1) are refused: `B A` mixes all input channels, which a grouped
weight cannot hold (PEFT adapts them but refuses to merge them; here every layer merges).

GPT-2's `Conv1D` is a linear layer storing its weight transposed, (in, out), with `forward` x W + b.
`LoRAConv1D` is `LoRALinear` around it (PEFT's `Linear` with `fan_in_fan_out=True`): the same
factors and fused op, the update in the base's (in, out) layout. tinytune never imports transformers:
the layer is registered by the type's name ("transformers.pytorch_utils.Conv1D"), which holds whatever
the import order (`register_transformers_conv1d()` also registers the type itself once it is loaded).
"""
from __future__ import annotations

import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attributes import factor_property
from .base import LoRALayer, init_lora_A
from .config import DEFAULT_ADAPTER, LoraSpec
from .layers import LoRALinear
from .registry import register_layer, register_layer_by_name, registered_types
from .variants import pissa_factors

__all__ = ["LoRAConv1d", "LoRAConv2d", "LoRAConv3d", "LoRAConv1D", "register_transformers_conv1d"]


class _LoRAConvNd(LoRALayer):
    """`base(x) + scaling * B(A(dropout(x)))` around an `nn.ConvNd` (PEFT's `lora.Conv1d/2d/3d`).

    Args:
        base: the convolution to adapt (groups=1); kept as `.base`, weights shared.
        rank, alpha, dropout, rslora, adapter_name: as for `LoRALinear`.
        init: "kaiming" (A kaiming-uniform with a=sqrt(5), as PEFT) or "gaussian" (A ~ N(0, 1/r)),
            B = 0. "pissa" is refused (PEFT has no PiSSA for convolutions either).
        dora: DoRA as PEFT: `lora_magnitude_vector` holds one magnitude per output channel, the
            norm is taken over all the other axes of `W + s B A` (saved in PEFT's (1, out, 1, ...) shape).

    Raises:
        TypeError: `base` is not this layer's convolution type, or has groups > 1.
        ValueError: a bad rank, alpha, dropout, init, dora or adapter name; init="pissa".
    """

    _conv_type: type = nn.Conv2d  # set by each subclass
    _pissa_rewrites_base = False  # PiSSA is refused here

    lora_A = factor_property("lora_A", "The active adapter's A, (rank, in, *kernel).")
    lora_B = factor_property("lora_B", "The active adapter's B, (out, rank, *1s).")

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: str = "kaiming", dora: bool = False, adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        self._wrap(base, LoraSpec(rank, alpha, dropout, rslora, init, dora), adapter_name)

    def _wrap(self, base: nn.Module, spec: LoraSpec, adapter_name: str) -> None:
        super()._wrap(base, spec, adapter_name)
        dilated = any(d != 1 for d in base.dilation)
        if dilated or base.padding_mode != "zeros":
            what = ", ".join(x for x, on in ((f"dilation={base.dilation}", dilated),
                                             (f"padding_mode={base.padding_mode!r}", base.padding_mode != "zeros")) if on)
            warnings.warn(f"LoRA on this nn.{self._conv_type.__name__} ({what}): tinytune's A uses the base's {what}, so "
                          "merged equals unmerged; PEFT's A ignores it, so an adapter file of this layer gives different "
                          "outputs in PEFT (peft 0.21)", stacklevel=4)

    @classmethod
    def cannot_wrap(cls, base: nn.Module) -> str | None:
        if not isinstance(base, cls._conv_type):
            return f"{cls.__name__} wraps an nn.{cls._conv_type.__name__}, got {type(base).__name__}"
        if base.groups != 1:
            return (f"it is a grouped convolution (groups={base.groups}): the update B A mixes every input channel, "
                    "which the grouped weight cannot hold, so it could never be merged (PEFT adapts such layers "
                    "but refuses to merge them)")
        return None

    def _dims(self) -> tuple[int, int]:
        return self.base.in_channels, self.base.out_channels

    def _factor_shapes(self, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
        n_in, n_out = self._dims()
        ones = (1,) * len(self.base.kernel_size)
        shapes = {"lora_A": (spec.rank, n_in, *self.base.kernel_size), "lora_B": (n_out, spec.rank, *ones)}
        if spec.dora:  # one per output channel; the file holds it as (1, out, 1, ...), see file_tensors
            shapes["lora_magnitude_vector"] = (n_out,)
        return shapes

    def _refuse_spec(self, spec: LoraSpec) -> None:
        if spec.init == "pissa":
            raise ValueError(f"init='pissa' is not supported for {type(self).__name__} (an "
                             f"nn.{self._conv_type.__name__}): PiSSA factorises a weight matrix, and PEFT has no "
                             "PiSSA for convolutions either; use init='kaiming' or 'gaussian', or exclude the layer")

    def file_tensors(self, name: str | None = None) -> dict[str, nn.Parameter]:
        tensors = super().file_tensors(name)
        magnitude = tensors.get("lora_magnitude_vector")
        if magnitude is not None:  # PEFT keeps it as (1, out, 1, ...); a view, so loading writes through
            tensors["lora_magnitude_vector"] = magnitude.view(1, -1, *(1,) * len(self.base.kernel_size))
        return tensors

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """Initialise the active adapter's A by its init and set B to zero (DoRA: m to the base's
        per-channel norms), so the layer equals its base."""
        self._reset(self.active_adapter)

    @torch.no_grad()
    def _reset(self, name: str) -> None:
        spec = self.adapters[name]
        init_lora_A(self._factor("lora_A", name), spec)  # fan_in = in * kernel volume, as PEFT's conv A
        nn.init.zeros_(self._factor("lora_B", name))
        self._reset_magnitude(name)

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        # B is 1x1, so B(A(x)) is one convolution with kernel sum_r B[o, r] A[r, i, ...]: PEFT's
        # conv_fn(A^T, B) composition, written as the matmul it is
        lora_A, lora_B = self._factor("lora_A", name), self._factor("lora_B", name)
        product = lora_B.flatten(1) @ lora_A.flatten(1)  # (out, in * kernel volume)
        return product.view(self.base.weight.shape) * self._spec(name).scaling  # (out, in, *kernel)

    def _dora_matrix(self, t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1)  # one row per output channel: DoRA's norm runs over (in, *kernel)

    def _forward_adapter(self, x: torch.Tensor, name: str | None) -> torch.Tensor:
        out = self.base(x)  # (N, out, *spatial)
        spec = self.adapters.get(name)
        if spec is None:
            return out
        lora_A, lora_B = self._factor_tensor("lora_A", name), self._factor_tensor("lora_B", name)
        p = spec.dropout if self.training else 0.0
        dropped = F.dropout(x.to(lora_A.dtype), p, training=True) if p > 0 else x.to(lora_A.dtype)
        # _conv_forward: the base's own stride, padding (and padding_mode), dilation, with A's weight;
        # PEFT's A uses only kernel, stride and padding, so it differs from this where those matter
        after_a = self.base._conv_forward(dropped, lora_A, None)  # (N, r, *spatial)
        low_rank = self._conv_fn(after_a, lora_B)  # 1x1: a channel mix at each position, (N, out, *spatial)
        if spec.dora:
            return self._dora_forward(out, dropped, low_rank, name, p)
        return out + (low_rank * spec.scaling).to(out.dtype)

    def _dora_forward(self, out: torch.Tensor, dropped: torch.Tensor, low_rank: torch.Tensor, name: str,
                      p: float) -> torch.Tensor:
        """PEFT's conv DoRA: `out + (f - 1) * conv(x', W) + f * s * B(A(x'))`, f = m / ||W + s B A|| per
        channel (norm detached), x' = dropout(x). Without dropout `conv(x, W)` is `out - bias`, and the
        result is `f * (conv(x, W) + s B(A(x))) + bias`."""
        view = (1, -1) + (1,) * (out.dim() - 2)  # (1, out, 1, ...) against (N, out, *spatial)
        factor = (self._factor("lora_magnitude_vector", name) / self.dora_weight_norm(name)).view(view)
        if p > 0:  # the base's share of the dropped input, without bias (PEFT recomputes it too)
            plain = self.base._conv_forward(dropped, self.base.weight.to(dropped.dtype), None)
        else:
            plain = out if self.base.bias is None else out - self.base.bias.view(view)
        extra = (factor - 1) * plain.to(factor.dtype) + factor * low_rank * self._spec(name).scaling
        return out + extra.to(out.dtype)


class LoRAConv1d(_LoRAConvNd):
    """LoRA around an `nn.Conv1d`: A (r, in, k), B (out, r, 1). See `_LoRAConvNd` for the arguments."""

    _conv_type = nn.Conv1d
    _conv_fn = staticmethod(F.conv1d)


class LoRAConv2d(_LoRAConvNd):
    """LoRA around an `nn.Conv2d`: A (r, in, kh, kw), B (out, r, 1, 1). See `_LoRAConvNd` for the arguments."""

    _conv_type = nn.Conv2d
    _conv_fn = staticmethod(F.conv2d)


class LoRAConv3d(_LoRAConvNd):
    """LoRA around an `nn.Conv3d`: A (r, in, kd, kh, kw), B (out, r, 1, 1, 1). See `_LoRAConvNd`."""

    _conv_type = nn.Conv3d
    _conv_fn = staticmethod(F.conv3d)


# ------------------------------------------------------------------------ transformers' Conv1D
def _hf_conv1d_type() -> type | None:
    """transformers' `Conv1D` class if its module is loaded (any model holding one has loaded it), else None."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


class LoRAConv1D(LoRALinear):
    """LoRA around transformers' GPT-2-style `Conv1D` (weight (in, out), forward `x W + b`).

    Computes `base(x) + scaling * dropout(x) A^T B^T` with PEFT's factors for `fan_in_fan_out=True`:
    A (r, in), B (out, r); `delta_weight` is `(s B A)^T`, (in, out), in the base's layout. Otherwise
    it is `LoRALinear` (fused op, DoRA with one magnitude per output feature, PiSSA on the
    transposed weight as PEFT does). Arguments as for `LoRALinear`.

    Raises:
        TypeError: `base` is not a transformers `Conv1D`, or a subclass with its own `forward`.
    """

    _dora_axis = 0  # the weight is (in, out): the norm per output feature runs over axis 0
    fan_in_fan_out = True  # PEFT's name for "the base stores its weight as (in, out)"; read by save_adapter

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: str = "kaiming", dora: bool = False, adapter_name: str = DEFAULT_ADAPTER):
        LoRALayer.__init__(self)
        self._wrap(base, LoraSpec(rank, alpha, dropout, rslora, init, dora), adapter_name)

    @classmethod
    def cannot_wrap(cls, base: nn.Module) -> str | None:
        conv1d = _hf_conv1d_type()
        if conv1d is None or not isinstance(base, conv1d):
            return f"LoRAConv1D wraps a transformers.pytorch_utils.Conv1D, got {type(base).__name__}"
        if type(base).forward is not conv1d.forward:
            return ("it overrides Conv1D.forward, and the fused op computes x W + b directly, which would bypass "
                    "that forward (register a layer for the type with tt.lora.register_layer)")
        return None

    def _dims(self) -> tuple[int, int]:
        n_in, n_out = self.base.weight.shape  # (in, out); n_out is Conv1D's `nf`
        return n_in, n_out

    @property
    def in_features(self) -> int:
        return self.base.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.base.weight.shape[1]

    @torch.no_grad()
    def _init_adapter(self, name: str) -> None:
        if self.adapters[name].init != "pissa":
            return self._reset(name)
        spec = self.adapters[name]  # PEFT's pissa_init with fan_in_fan_out: the SVD of W^T, (out, in)
        lora_A, lora_B, residual = pissa_factors(self.base.weight.t(), spec.rank, spec.scaling)
        self._factor("lora_A", name).copy_(lora_A)
        self._factor("lora_B", name).copy_(lora_B)
        self.base.weight.copy_(residual.t())  # in place, back in the (in, out) layout
        self._reset_magnitude(name)

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        return super().delta_weight(name).t()  # (in, out)

    def _linear_weight(self) -> torch.Tensor:
        return self.base.weight.t()  # (out, in), a view: the fused op computes x (W^T)^T + b = Conv1D's x W + b


def register_transformers_conv1d() -> bool:
    """Register `LoRAConv1D` for transformers' `Conv1D` (as "all-linear", like PEFT) if transformers has
    loaded it; never imports transformers. Runs when tinytune's LoRA is imported; call it again after
    importing transformers. A registration the user made for `Conv1D` is kept.

    Returns:
        Whether `Conv1D` now has a LoRA layer.
    """
    conv1d = _hf_conv1d_type()
    if conv1d is None:
        return False
    if conv1d not in registered_types():
        register_layer(conv1d, LoRAConv1D, linear=True)
    return True


register_layer(nn.Conv1d, LoRAConv1d)  # linear=False: PEFT's "all-linear" leaves convolutions out
register_layer(nn.Conv2d, LoRAConv2d)
register_layer(nn.Conv3d, LoRAConv3d)
# by name, so that it holds whether transformers is imported before or after tinytune (never imported here)
register_layer_by_name("transformers.pytorch_utils.Conv1D", LoRAConv1D, linear=True)
