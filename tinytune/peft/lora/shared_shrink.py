"""One shrink pass for the LoRA linears that read the same input (q/k/v, gate/up): `ShrinkGroup`.

    tt.lora.apply(model, cfg)                # links sibling LoRALinear layers into groups ("auto")
    tt.lora.share_shrink(model, "on")        # or force it: "auto" | "on" | "off"

Why: on a GPU a LoRA layer's side products are bandwidth-bound, so their cost is the passes over the
N x d activation, not the skinny matmuls. q_proj, k_proj and v_proj each read the same `x` to compute
`x A^T`; stacking their A along the rank (`tinytune.ops.lora_shrink(x, cat[A_q, A_k, A_v])`) reads x
once in the forward and once (instead of three times) for `dA` in the backward. Each projection then
adds its slice with `ops.lora_expand_linear`. Same values and gradients, up to the order of float sums.

Which layers: when LoRA is applied, the LoRALinear children of one parent module with the same
in_features form a group (a parent may hold o_proj beside q/k/v, with the same width but another input).
Who really reads one tensor is learned while the model runs, so nothing depends on names: two members
called one after the other with the same tensor (same object, unmodified) become sharers; from the next
forward on, the first sharer to see a new input computes the slices of all sharers still to come, and
each takes its own when called with that very tensor. A sharer called with another tensor, or whose
factor changed since, computes its own (always correct), and a sharer that did not come for its slice
stops being one. So the worst case costs one wasted slice (N x r) per group, once.

When: only without dropout (dropout 0, or eval mode), since independent dropout masks per projection
(PEFT's semantics) cannot share one masked input; not for DoRA, mixed per-row adapters, merged or
disabled layers, under torch.compile (which fuses the plain ops itself) or in inference mode. While
saved-tensor hooks are active, only the forward pass is shared: non-reentrant gradient checkpointing
recomputes a forward in backward and requires it to save exactly what the original saved, and a sharer
learned in between would change what a shared shrink saves. So there the shared pass runs without grad
and each member runs its usual Function with its slice as a given `x A^T` (`lora_linear(given_xa=...)`),
saving what it saves unshared; its backward computes its own `dA` (one pass over x per member). Mode
"auto" (the default) shares where the Triton kernels run (`ops.choose_backend` gives "triton": a CUDA
tensor with triton installed, or `TINYTUNE_KERNELS=triton`); on the CPU, measured, it does not pay
(see docs/kernels.md), so "auto" leaves the CPU path as it was. "on" shares on every backend, "off" never.

A group holds its members and parent by weak reference (each member holds its group, the parent its
hooks), so a model without references is freed at once, with no cycle for the garbage collector.
`copy.deepcopy` or pickling of a model copies its groups (they travel with the parent's hooks); a layer
copied or saved alone leaves its group behind (and its siblings: nothing else is saved with it). The
slices a group keeps for members not yet called are dropped as soon as every sharer took its own, and
at the end of the parent's forward.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ...ops import choose_backend, lora_shrink
from ...ops.backend import ENV_VAR
from .layers import LoRALinear

MODES = ("auto", "on", "off")


def _dead() -> None:
    """A weak reference's stand-in for a member or parent that no longer exists."""
    return None


@dataclass
class _Slices:
    """One shared shrink: the input it was computed from, and the slices not yet taken (by member index)."""

    source: weakref.ref
    version: int
    grad_enabled: bool
    dtype: torch.dtype
    pending: dict[int, tuple] = field(default_factory=dict)  # index -> (u, A, A's version, A.requires_grad)

    requires_grad: bool = False
    constant: bool = False  # computed without grad, for the layers' own Functions (saved-tensor hooks active)

    def matches(self, x: torch.Tensor, dtype: torch.dtype) -> bool:
        return (self.source() is x and x._version == self.version and self.grad_enabled == torch.is_grad_enabled()
                and self.dtype == dtype and self.requires_grad == x.requires_grad
                and self.constant == _saved_tensor_hooks_active())


def _input_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are active (non-reentrant checkpointing, offloading); True where torch
    cannot tell, so that only the forward is shared rather than risk a recompute that saves other tensors."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return True
    try:
        return top(False) is not None
    except TypeError:  # older signature, without ignore_is_tracing
        return top() is not None


def shareable_factor(layer: nn.Module | None) -> torch.Tensor | None:
    """The active adapter's A if `layer` would now run the plain fused path without dropout, else None."""
    if layer is None or layer.merged or layer._disabled or layer._rows is not None or layer._inference_weight is not None:
        return None
    spec = layer.adapters.get(layer.active_adapter)
    if spec is None or spec.dora or (layer.training and spec.dropout > 0.0):
        return None
    return layer._factor_tensor("lora_A", layer.active_adapter)


class ShrinkGroup:
    """LoRALinear children of one `parent` with one input width; see the module docstring.

    Sharing happens only inside a call of the parent's forward: hooks on the parent open the group when
    its forward starts and close it (dropping what was not taken) when it ends, so a slice never outlives
    the forward that computed it (the graph of an earlier forward may have been freed by its backward).
    """

    def __init__(self, members: list[nn.Module], parent: nn.Module | None, mode: str = "auto"):
        self._member_refs = [weakref.ref(m) for m in members]
        self._parent_ref = weakref.ref(parent) if parent is not None else _dead
        self.mode = mode
        self.sharers: set[int] = set()  # indices of members seen reading one tensor
        self._reset_round()
        self._open = False
        if parent is not None:
            parent.register_forward_pre_hook(self._begin)
            parent.register_forward_hook(self._end, always_call=True)

    @property
    def members(self) -> list[nn.Module | None]:
        """The member layers, in the parent's order (None for one that no longer exists)."""
        return [ref() for ref in self._member_refs]

    @property
    def parent(self) -> nn.Module | None:
        """The module whose forward calls the members."""
        return self._parent_ref()

    def _reset_round(self) -> None:
        self._slices: _Slices | None = None
        self._last: tuple[weakref.ref, int, int] | None = None  # (input, its version, member index)
        self._called: set[int] = set()  # members called in this forward of the parent

    def _begin(self, *_) -> None:
        if not torch.compiler.is_compiling():
            self._reset_round()
            self._open = True

    def _end(self, *_) -> None:
        if not torch.compiler.is_compiling():
            if self._slices is not None:  # sharers that never came for their slice stop being sharers
                self.sharers.difference_update(self._slices.pending)
            self._reset_round()
            self._open = False

    def detach(self) -> None:
        """Remove the hooks from the parent (the group is replaced or its layers are gone).

        The hooks are found in the parent's hook tables by their owner (not by handles, which cannot be pickled
        once their parent is gone), so a group restored by pickle or deepcopy detaches the same way."""
        parent = self.parent
        if parent is not None:
            for table in (parent._forward_pre_hooks, parent._forward_hooks):
                for key in [k for k, hook in table.items() if getattr(hook, "__self__", None) is self]:
                    del table[key]
                    parent._forward_hooks_always_called.pop(key, None)
        for member in self.members:
            if member is not None and member._shrink_group is self:
                member._shrink_group = None

    def __getstate__(self) -> dict:
        # Reached through the parent's hook table (members do not pickle their group, see
        # LoRALinear.__getstate__): the members and the parent are being pickled with it. Dead members are
        # kept as None, so the learned indices still name the same layers. Not the live slices.
        return {"members": self.members, "parent": self.parent, "mode": self.mode, "sharers": set(self.sharers)}

    def __setstate__(self, state: dict) -> None:
        self._member_refs = [weakref.ref(m) if m is not None else _dead for m in state["members"]]
        parent = state["parent"]
        self._parent_ref = weakref.ref(parent) if parent is not None else _dead
        self.mode, self.sharers = state["mode"], set(state["sharers"])
        self._reset_round()
        self._open = False
        for member in state["members"]:  # the link the members did not pickle
            if member is not None:
                member._shrink_group = self

    def __repr__(self) -> str:
        return f"ShrinkGroup({len(self.members)} members, sharers={sorted(self.sharers)}, mode={self.mode!r})"

    def _active(self, x: torch.Tensor) -> bool:
        if not self._open or self.mode == "off":
            return False
        if self.mode == "auto" and not (x.is_cuda or os.environ.get(ENV_VAR)):  # the CPU default: no cost
            return False
        if torch.compiler.is_compiling() or torch.is_inference_mode_enabled() or x.is_inference():
            return False  # (inference tensors have no version counter)
        return self.mode == "on" or choose_backend(None, x) == "triton"

    def low_rank_input(self, member: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, bool] | None:
        """`x A^T` of `member`'s active adapter from a shared pass, or None: the member computes its own.

        Called by a member's forward (which checked that it runs without dropout) with its input x. Returns
        (u, constant): with `constant` False, u carries the shared shrink's graph (`ops.lora_shrink`) and the
        member adds it with `ops.lora_expand_linear`; True while saved-tensor hooks are active, when u was
        computed without grad and the member runs its usual Function with it (`lora_linear(given_xa=u)`), so
        that what autograd saves does not depend on whether the pass was shared (module docstring).
        """
        if not self._active(x):
            return None
        index = next((i for i, ref in enumerate(self._member_refs) if ref() is member), None)
        if index is None:  # a copy the group does not know (nn.DataParallel's replicas share their __dict__)
            return None
        dtype = _input_dtype(x)
        slices = self._slices
        if slices is not None and index in slices.pending and slices.matches(x, dtype):
            return self._take(index)
        self._observe(index, x)
        self._called.add(index)
        if index not in self.sharers:
            return None
        return self._compute(index, x, dtype)

    def _take(self, index: int) -> torch.Tensor | None:
        """The member's pending slice; None (it computes its own) if its factor is no longer the one used."""
        slices = self._slices
        u, factor, version, requires_grad = slices.pending.pop(index)
        if not slices.pending:
            self._slices = None  # every sharer served: keep nothing alive
        current = shareable_factor(self.members[index])
        if current is not factor or current._version != version or current.requires_grad != requires_grad:
            return None  # another adapter, A changed in place, or frozen / unfrozen since
        return u, slices.constant

    def _observe(self, index: int, x: torch.Tensor) -> None:
        """Learn sharers: a member called with the very tensor another member was last called with."""
        last = self._last
        if last is not None and last[0]() is x and last[1] == x._version and last[2] != index:
            self.sharers.update((index, last[2]))
        self._last = (weakref.ref(x), x._version, index)

    def _compute(self, index: int, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        if self._slices is not None:  # sharers that never came for their slice stop being sharers
            self.sharers.difference_update(self._slices.pending)
            self._slices = None
        # the members still to come in this forward (one called already will not come for a slice)
        factors = {i: shareable_factor(self.members[i]) for i in sorted(self.sharers - (self._called - {index}))}
        factors = {i: a for i, a in factors.items() if a is not None and a.device == x.device}
        if index not in factors or len(factors) < 2:
            return None
        constant = _saved_tensor_hooks_active()
        slices = _Slices(weakref.ref(x), x._version, torch.is_grad_enabled(), dtype, requires_grad=x.requires_grad,
                         constant=constant)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not constant):
            stacked = torch.cat([a.to(dtype) for a in factors.values()])  # (sum of ranks, d_in)
            parts = lora_shrink(x, stacked).split([a.shape[0] for a in factors.values()], dim=-1)
        for (i, factor), u in zip(factors.items(), parts):
            if i != index:
                slices.pending[i] = (u, factor, factor._version, factor.requires_grad)
        self._slices = slices
        return parts[list(factors).index(index)], constant


def _is_member(module: nn.Module) -> bool:
    """A LoRALinear (or subclass) running LoRALinear's own forward, which consults the group."""
    return isinstance(module, LoRALinear) and type(module)._forward_adapter is LoRALinear._forward_adapter


def _group_members(parent: nn.Module) -> list[list[nn.Module]]:
    """The parent's direct LoRA-linear children, by input width, in groups of two or more."""
    by_width: dict[int, list[nn.Module]] = {}
    for child in parent.children():
        if _is_member(child):
            by_width.setdefault(child.in_features, []).append(child)
    return [members for members in by_width.values() if len(members) > 1]


def link_groups(model: nn.Module, mode: str | None = None) -> list[ShrinkGroup]:
    """(Re)build every group of `model` (what `apply` and `add_adapter` call). Unless `mode` is given, a group
    keeps the mode its members' old group had (a new group: the model's one mode, else "auto"); layers in
    no group lose theirs."""
    old = {id(m): m._shrink_group for m in model.modules() if _is_member(m) and m._shrink_group is not None}
    old_modes = {key: group.mode for key, group in old.items()}
    modes = set(old_modes.values())
    default = modes.pop() if len(modes) == 1 else "auto"  # what share_shrink set for the whole model
    for module in model.modules():  # also the groups whose members left the model: their hooks are here
        old.update((id(h), h.__self__) for h in module._forward_pre_hooks.values()
                   if isinstance(getattr(h, "__self__", None), ShrinkGroup))
    for group in set(old.values()):
        group.detach()
    groups = []
    for parent in model.modules():
        for members in _group_members(parent):
            kept = [old_modes[id(m)] for m in members if id(m) in old_modes]
            group = ShrinkGroup(members, parent, mode or (kept[0] if kept else default))
            for member in members:
                member._shrink_group = group
            groups.append(group)
    return groups


def share_shrink(model: nn.Module, mode: str = "auto") -> list[list[str]]:
    """Set whether the LoRA linears of `model` that read one input share one shrink pass.

    Args:
        model: a model with LoRA applied.
        mode: "auto" (the default `apply` sets: share where the Triton kernels run), "on" (every backend,
            the CPU's too) or "off". See the module docstring for when sharing applies.

    Returns:
        The groups, each as the dotted names of its members (which of them really share is learned while
        the model runs).

    Raises:
        ValueError: `mode` is not one of "auto", "on", "off".
    """
    if mode not in MODES:
        raise ValueError(f"share_shrink: mode={mode!r} is not one of {list(MODES)}")
    names = {id(m): n for n, m in model.named_modules()}
    return [[names[id(m)] for m in group.members if m is not None] for group in link_groups(model, mode)]


__all__ = ["MODES", "ShrinkGroup", "share_shrink"]
