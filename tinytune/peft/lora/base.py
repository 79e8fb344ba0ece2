"""What LoRA layers share (`LoRALayer`): the named adapters, merging, the forward (mixed batches: `rows`).

`LoRALinear` / `LoRAEmbedding` (in `layers`) wrap an existing `nn.Linear` / `nn.Embedding`
and add `scaling * B A` beside it. The wrapped module is kept as `.base`, the very object the model had: its weight is shared,
never copied. A layer holds one or more NAMED adapters side by side (PEFT's multi-adapter model);
exactly one is active, and `lora_A` (r x in) / `lora_B` (out x r) (plus, with DoRA,
`lora_magnitude_vector`) are the active adapter's parameters. The adapter "default" (the one
`tt.lora.apply` creates) is registered under exactly those names, so a single-adapter model has
the parameter names it always had; another adapter `x` is registered as `lora_A_x`, `lora_B_x`...
`B` starts at zero so a new adapter computes exactly what the base did. Adapter parameters are
kept in fp32 when the base is bf16/fp16 (fp64 bases keep fp64, for gradcheck-grade tests). The
DoRA and PiSSA maths live in `variants`; the model-level multi-adapter calls in `multi`.

State changes only through named calls (`merge()` / `unmerge()`, `set_adapter`,
`set_row_adapters`, `tinytune.lora.disabled`): nothing happens in `forward`, `train()` or `eval()`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .._dtype import adapter_dtype
from .attributes import active_field, factor_property, param_key
from .config import DEFAULT_ADAPTER, LoraSpec, check_adapter_name
from .inference import InferenceMerge
from .rows import RowAdapters
from .variants import dora_fold, dora_unfold, dora_weight_norm

def init_lora_A(lora_A: torch.Tensor, spec: LoraSpec) -> None:
    """A's init, as PEFT: kaiming-uniform (a = sqrt(5), as nn.Linear) for "kaiming", N(0, 1/r) for "gaussian"."""
    if spec.init == "gaussian":
        nn.init.normal_(lora_A, std=1.0 / spec.rank)
    else:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))


# the parameter kind -> the suffix of PEFT's saved key (linears' factors are nn.Linear weights there)
_FILE_SUFFIX = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_embedding_A": "lora_embedding_A",
           "lora_embedding_B": "lora_embedding_B", "lora_magnitude_vector": "lora_magnitude_vector"}


class LoRALayer(RowAdapters, InferenceMerge, nn.Module):
    """What every LoRA layer shares: the named adapters, merge state, the mixed-batch forward (`RowAdapters`).

    A layer type for a new kind of module subclasses this and defines `_dims` (or `_factor_shapes`),
    `_reset`, `delta_weight` (the update in the base weight's layout) and `_forward_adapter`; then
    `tt.lora.register_layer(ModuleType, ThatLayer)` lets `apply` use it (see docs/lora.md).
    """

    _dora_axis = 1  # the weight axis DoRA's norm runs over (1: per output row of a linear)
    _A, _B = "lora_A", "lora_B"  # parameter kinds, PEFT's names (the embedding overrides them)
    _pissa_rewrites_base = True  # init="pissa" replaces the base weight (not for embeddings, as in PEFT)

    rank = active_field("rank", "The active adapter's rank r.")
    alpha = active_field("alpha", "The active adapter's alpha.")
    dropout = active_field("dropout", "The active adapter's dropout probability.")
    rslora = active_field("rslora", "Whether the active adapter uses rank-stabilised scaling.")
    init = active_field("init", "The active adapter's init.")
    dora = active_field("dora", "Whether the active adapter is DoRA.")
    scaling = active_field("scaling", "The active adapter's scaling, alpha / r (or alpha / sqrt(r)).")

    @classmethod
    def from_spec(cls, base: nn.Module, spec: LoraSpec, adapter_name: str = DEFAULT_ADAPTER) -> "LoRALayer":
        """A layer wrapping `base` with one adapter `adapter_name` of hyperparameters `spec` (what `apply`
        calls; the public constructors take the same values as plain arguments).

        Raises:
            TypeError: `cannot_wrap(base)` gives a reason.
        """
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._wrap(base, spec, adapter_name)
        return layer

    def _wrap(self, base: nn.Module, spec: LoraSpec, adapter_name: str) -> None:
        """Take `base` with a first adapter: what every constructor does once `nn.Module.__init__` ran.
        Raises TypeError (`cannot_wrap`'s reason) before anything changes."""
        reason = self.cannot_wrap(base)
        if reason is not None:
            raise TypeError(f"{type(self).__name__} cannot wrap {type(base).__name__}: {reason}")
        self._setup(base, adapter_name)
        self.add_adapter(adapter_name, spec)

    @classmethod
    def cannot_wrap(cls, base: nn.Module) -> str | None:
        """Why this layer type cannot wrap `base` (None: it can). Checked before anything changes."""
        return None

    def _setup(self, base: nn.Module, adapter_name: str) -> None:
        check_adapter_name(adapter_name)
        self.base = base
        self.adapters: dict[str, LoraSpec] = {}  # name -> hyperparameters, in the order added
        self.active_adapter = adapter_name
        self.merged = False
        self._disabled = False  # set only by tinytune.lora.disabled()
        self._rows = None  # (rows, {adapter or None: row indices}); set only by set_row_adapters
        # DoRA: the norm `merge` folded with, kept until `unmerge` (it cannot be recovered from the
        # merged weight); None whenever the layer is not merged. Not saved in state dicts.
        self.register_buffer("_dora_merge_norm", None, persistent=False)
        base.requires_grad_(False)  # the base is frozen; apply(train_bias=True) re-enables its bias
        self.train(base.training)  # a layer made inside an eval() model stays in eval (no adapter dropout)

    def _dims(self) -> tuple[int, int]:
        """(n_in, n_out): A is (r, n_in), B is (n_out, r), the magnitude (n_out,)."""
        raise NotImplementedError

    # ------------------------------------------------------------------- the named adapters
    def _spec(self, name: str | None = None) -> LoraSpec:
        name = self.active_adapter if name is None else name
        spec = self.adapters.get(name)
        if spec is None:  # an AttributeError, so hasattr(layer, "lora_A") is False here
            raise AttributeError(f"this {type(self).__name__} holds no adapter {name!r} (it holds {list(self.adapters)})")
        return spec

    def __getattr__(self, name: str):
        # Reached when a property such as `lora_A` raised AttributeError because the layer lacks the
        # active adapter: raise that message, instead of letting nn.Module find the parameter that
        # "default" registered under the same name and return another adapter's factor.
        if isinstance(getattr(type(self), name, None), property):
            self._spec()
        return super().__getattr__(name)

    def _factor(self, kind: str, name: str | None = None) -> nn.Parameter:
        name = self.active_adapter if name is None else name
        self._spec(name)
        return self._factor_tensor(kind, name)

    def _factor_tensor(self, kind: str, name: str) -> torch.Tensor:
        """Adapter `name`'s parameter `kind`, without checks (forward's hot path). An `nn.DataParallel` replica
        holds no parameters, only their per-device copies as attributes (`factor_property`)."""
        key = param_key(kind, name)
        found = self._parameters.get(key)
        return found if found is not None else self.__dict__[key]

    def adapter_parameters(self, name: str | None = None) -> dict[str, nn.Parameter]:
        """`{kind: Parameter}` of adapter `name` (default: the active one), kinds named as in PEFT's
        keys: "lora_A"/"lora_B" (embeddings: "lora_embedding_A"/"lora_embedding_B"), and
        "lora_magnitude_vector" for DoRA. Raises AttributeError when the layer lacks the adapter."""
        spec = self._spec(name)
        kinds = tuple(kind for pair in self._factor_pairs() for kind in pair)
        kinds += ("lora_magnitude_vector",) if spec.dora else ()
        return {kind: self._factor(kind, name) for kind in kinds}

    def _factor_pairs(self) -> tuple[tuple[str, str], ...]:
        """The (A kind, B kind) pairs one adapter holds: one pair here; a layer adapting several weights
        at once (nn.MultiheadAttention: in_proj and out_proj) has one per weight."""
        return ((self._A, self._B),)

    def file_tensors(self, name: str | None = None) -> dict[str, nn.Parameter]:
        """Adapter `name`'s parameters under the ends of PEFT's saved keys ("lora_A.weight", ...), which the
        file writer prefixes with the layer's path. Layer types whose PEFT keys differ override this."""
        return {_FILE_SUFFIX[kind]: p for kind, p in self.adapter_parameters(name).items()}

    lora_magnitude_vector = factor_property(
        "lora_magnitude_vector", "The active DoRA adapter's magnitude, one per output feature (embedding dim).")

    def add_adapter(self, name: str, spec: LoraSpec) -> None:
        """Add a new adapter `name` with hyperparameters `spec`, beside the others, initialised so that
        it computes the base.

        The layer's active adapter does not change; the new parameters require grad only when
        `name` is the active adapter (`set_adapter` decides what trains).

        Raises:
            TypeError: `spec` is not a LoraSpec.
            ValueError: a bad name, a name the layer holds already, or PiSSA beside another adapter
                on a linear layer (PiSSA rewrites the shared base weight).
        """
        check_adapter_name(name)
        if not isinstance(spec, LoraSpec):
            raise TypeError(f"add_adapter expects a tt.lora.LoraSpec, got {type(spec).__name__}")
        if name in self.adapters:
            raise ValueError(f"this {type(self).__name__} already has an adapter {name!r} (it holds {list(self.adapters)})")
        self._check_pissa_alone(name, spec.init)
        self._refuse_spec(spec)
        factory = self._factory()
        params = {kind: torch.zeros(shape, **factory) for kind, shape in self._factor_shapes(spec).items()}
        for kind, tensor in params.items():
            # straight into _parameters: register_parameter would read the `lora_A` property first
            self._parameters[param_key(kind, name)] = nn.Parameter(tensor, requires_grad=name == self.active_adapter)
        self.adapters[name] = spec
        self._init_adapter(name)

    def _factory(self) -> dict:
        """dtype and device of new adapter parameters: the base's floating weight (fp32 for half bases), or for
        a base without one (a quantised weight) its first floating tensor, else the default dtype."""
        weight = getattr(self.base, "weight", None)
        tensors = [weight] if isinstance(weight, torch.Tensor) else []
        tensors += [*self.base.parameters(), *self.base.buffers()]
        floating = next((t for t in tensors if t.is_floating_point()), None)
        if floating is None:
            device = tensors[0].device if tensors else torch.device("cpu")
            return {"dtype": torch.get_default_dtype(), "device": device}
        return {"dtype": adapter_dtype(floating.dtype), "device": floating.device}

    def _factor_shapes(self, spec: LoraSpec) -> dict[str, tuple[int, ...]]:
        """{kind: shape} of one adapter's parameters: A (r, n_in), B (n_out, r), DoRA's magnitude (n_out,).
        Layer types whose factors are not matrices (convolutions) override this."""
        n_in, n_out = self._dims()
        shapes = {self._A: (spec.rank, n_in), self._B: (n_out, spec.rank)}
        if spec.dora:  # filled by _init_adapter, once B A is set
            shapes["lora_magnitude_vector"] = (n_out,)
        return shapes

    def _refuse_spec(self, spec: LoraSpec) -> None:
        """Raise ValueError for hyperparameters this layer type cannot honour (none here)."""

    def _check_pissa_alone(self, name: str, init: str) -> None:
        """PiSSA replaces the base weight by a residual that every adapter of the layer would then
        see: only the sole adapter of a linear may be PiSSA."""
        if not self._pissa_rewrites_base or not self.adapters:
            return
        pissa = [n for n, s in self.adapters.items() if s.init == "pissa"]
        if init == "pissa" or pissa:
            owner = name if init == "pissa" else pissa[0]
            raise ValueError(f"adapter {owner!r} uses init='pissa', which rewrites this layer's shared base weight into "
                             f"a residual; it cannot sit beside other adapters ({sorted(set(self.adapters) | {name})}) "
                             "on one layer: merge_and_unload it first, or target other modules")

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` and its parameters.

        Raises:
            ValueError: `name` is the active adapter (set another first), or the layer lacks it.
        """
        if name not in self.adapters:
            raise ValueError(f"this {type(self).__name__} has no adapter {name!r} (it holds {list(self.adapters)})")
        if name == self.active_adapter:
            raise ValueError(f"cannot delete the active adapter {name!r}; set another one active first")
        for kind in self.adapter_parameters(name):
            del self._parameters[param_key(kind, name)]
        del self.adapters[name]

    def set_adapter(self, name: str) -> None:
        """Make `name` the active adapter: its parameters require grad, every other adapter's do not.
        A layer that lacks `name` computes its base while `name` is active.

        Raises:
            RuntimeError: the layer is merged and `name` is not the merged adapter (unmerge first).
        """
        if self.merged and name != self.active_adapter:
            raise RuntimeError(f"cannot switch to adapter {name!r}: adapter {self.active_adapter!r} is merged into the "
                               "base weight; call tt.lora.unmerge(model) first")
        self.active_adapter = name
        for other in self.adapters:
            for param in self.adapter_parameters(other).values():
                param.requires_grad_(other == name)

    # ----------------------------------------------------------------------- initialisation
    @torch.no_grad()
    def _init_adapter(self, name: str) -> None:
        self._reset(name)

    @torch.no_grad()
    def _reset_magnitude(self, name: str) -> None:
        if self.adapters[name].dora:  # m = ||W + s B A||: the layer equals its base at init
            self._factor("lora_magnitude_vector", name).copy_(self.dora_weight_norm(name))

    def dora_weight_norm(self, name: str | None = None) -> torch.Tensor:
        """DoRA's `||W + s B A||` per output row (linear) or embedding dim (embedding), detached,
        for adapter `name` (default: the active one).

        Computed in the adapter's dtype with autocast off: a bf16 norm would make DoRA's scale
        noisy. Costs a `B A` product and one pass over the base weight (a full-size temporary).
        """
        with torch.autocast(self.base.weight.device.type, enabled=False):
            mat = self._dora_matrix
            return dora_weight_norm(mat(self.base.weight), mat(self.delta_weight(name).detach()), self._dora_axis)

    def _dora_matrix(self, t: torch.Tensor) -> torch.Tensor:
        """`t` (the base weight, or a delta in its layout) as the matrix DoRA's norm and fold work on: `t`
        itself here; a convolution flattens (out, in, *kernel) to (out, in * kernel volume)."""
        return t

    def _dora_apply(self, fold, weight: torch.Tensor, delta: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """`fold` (`dora_fold` or `dora_unfold`) on the matrices `_dora_matrix` gives, in `weight`'s shape."""
        mat = self._dora_matrix
        return fold(mat(weight), mat(delta), self.lora_magnitude_vector, norm, self._dora_axis).view_as(weight)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (so code that reads `layer.weight` keeps working)."""
        return self.base.weight

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """`scaling * B A` of adapter `name` (default: the active one) in the base weight's layout,
        in the adapter's dtype."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------- merging
    def _holds_active(self) -> bool:
        return self.active_adapter in self.adapters

    def cannot_merge(self) -> str | None:
        """Why the adapter cannot be folded into this layer's base (None: it can). Layer types around a
        quantised or weightless module override this; `merge`, `merged_weight` and the model-level merges
        check every layer first, so a refused merge changes nothing."""
        if parametrize.is_parametrized(self.base):  # weight_norm & co: `weight` is recomputed on each access
            return (f"the {type(self.base).__name__}'s weights are parametrized ({', '.join(self.base.parametrizations)}), "
                    "so writing the update into `weight` would be lost; keep the adapter unmerged, or call "
                    "torch.nn.utils.parametrize.remove_parametrizations on the base first")
        return None

    def _refuse_merge(self, what: str) -> None:
        reason = self.cannot_merge()
        if reason is not None:
            raise TypeError(f"{what}: {reason}")

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The base weight with the active adapter folded in, as `merge` writes it; the layer is unchanged.

        Returns:
            `W + s B A` (DoRA: `m / ||W + s B A|| * (W + s B A)`) in the base dtype; the base
            weight itself, detached, when the layer is merged already or lacks the active adapter.
        """
        self._refuse_merge("merged_weight")
        weight = self.base.weight.detach()
        if self.merged or not self._holds_active():
            return weight
        delta = self.delta_weight().detach()
        if self.dora:
            return self._dora_apply(dora_fold, weight, delta, self.dora_weight_norm())
        return weight + delta.to(weight.dtype)

    @torch.no_grad()
    def merged_state(self) -> dict[str, torch.Tensor]:
        """The state dict of the plain base module with the active adapter folded in (what a merged
        checkpoint holds at this layer's path); the layer is unchanged. Layer types whose base keeps
        its weight under another name (nn.MultiheadAttention) override this."""
        state = {k: v.detach() for k, v in self.base.state_dict().items()}
        state["weight"] = self.merged_weight()
        return state

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into the base weight; a second call does nothing (nor does a
        layer that lacks the active adapter)."""
        if self.merged or not self._holds_active():
            return
        self._refuse_merge("merge")
        weight = self.base.weight
        if self.dora:
            norm = self.dora_weight_norm()  # from the unmerged weight, as forward sees it
            weight.copy_(self._dora_apply(dora_fold, weight, self.delta_weight(), norm))
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
            weight.copy_(self._dora_apply(dora_unfold, weight, self.delta_weight(), norm))
            self._dora_merge_norm = None
        else:
            weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False

    # ---------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self._disabled:
            return self.base(x)
        if self._rows is not None:
            return self._forward_rows(x)
        if self._inference_weight is not None:  # inside generation_context(): see `inference`
            return self._forward_merged(x)
        return self._forward_adapter(x, self.active_adapter)

    def _forward_adapter(self, x: torch.Tensor, name: str | None) -> torch.Tensor:
        """The layer's output under adapter `name` (None, or one it lacks: the base)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        if not self._holds_active():
            return f"adapters={list(self.adapters)}, active={self.active_adapter!r} (not held: base), merged={self.merged}"
        extra = f", adapters={list(self.adapters)}, active={self.active_adapter!r}" if len(self.adapters) > 1 else ""
        return (f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
                f"init={self.init}, dora={self.dora}, merged={self.merged}{extra}")


LORA_LAYER_TYPES = (LoRALayer,)  # for isinstance checks: every LoRA layer type subclasses LoRALayer
