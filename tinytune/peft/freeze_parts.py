"""Finding a model's parts by structure, for selective fine-tuning (`freeze`): its normalisation layers
(`is_norm`) and its list of blocks (`find_blocks`). Lookups only: nothing here changes `requires_grad`;
`freeze.py` decides what trains and re-exports both names."""
from __future__ import annotations

import re

import torch.nn as nn

# Norm layers whose class names do not end in "Norm" (BatchNorm1d, ...) plus the common ones, by type.
_NORM_TYPES = tuple(
    t for t in (
        nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, getattr(nn, "RMSNorm", None),
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
        nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    ) if t is not None
)
_NORM_NAME = re.compile(r"Norm(\d[dD])?$")  # LlamaRMSNorm, T5LayerNorm, LazyBatchNorm2d, ...


def is_norm(module: nn.Module) -> bool:
    """Returns: whether `module` is a normalisation layer: a torch norm type (LayerNorm, GroupNorm,
    RMSNorm, BatchNorm*, InstanceNorm*, ...) or a class named like `...Norm` / `...Norm2d`."""
    return isinstance(module, _NORM_TYPES) or _NORM_NAME.search(type(module).__name__) is not None


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Non-empty nn.ModuleLists whose entries all have one type, outermost only (so a per-block
    list of experts or heads never wins over the list of blocks that holds it)."""
    lists = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1]
    return [(n, m) for n, m in lists if not any(n.startswith(other + ".") for other, _ in lists if other and other != n)]


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.Module]:
    """The model's list of blocks: the dotted name `blocks`, or the longest outermost nn.ModuleList
    of identical-type modules (ties: the one with more parameters, then the first).

    Returns:
        (dotted name, the nn.ModuleList / nn.Sequential).

    Raises:
        ValueError: `blocks` names no module, or no candidate list exists (message lists the lists found).
        TypeError: `blocks` names a module that is not an nn.ModuleList / nn.Sequential.
    """
    candidates = _block_lists(model)
    if blocks is None:
        if not candidates:
            raise ValueError(f"last_blocks: {type(model).__name__} has no nn.ModuleList of identical blocks; "
                             "pass blocks='<dotted name of the block list>'")
        return max(candidates, key=lambda c: (len(c[1]), sum(p.numel() for p in c[1].parameters())))
    try:
        found = model.get_submodule(blocks)
    except AttributeError:
        raise ValueError(f"last_blocks: blocks={blocks!r} names no module of {type(model).__name__}; block lists "
                         f"that exist: {[n for n, _ in candidates] or '(none)'}") from None
    if not isinstance(found, (nn.ModuleList, nn.Sequential)):
        raise TypeError(f"last_blocks: blocks={blocks!r} is a {type(found).__name__}; expected an nn.ModuleList "
                        "or nn.Sequential of blocks")
    return blocks, found
