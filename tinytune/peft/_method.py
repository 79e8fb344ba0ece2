"""The one interface every PEFT method offers, so that adapter files, the checkpoint writer and the CLI
loop over `methods.METHODS` instead of knowing any method's internals.

Each method module (`lora`, `ia3`, `adapter`, `prompt`, `prefix`, `freeze`) exposes the same names --
`PEFT_TYPE`, `is_applied`, `peft_config_dict`, `config_from_peft`, `apply`, `state_dict`,
`load_state_dict`, and `merged_state` where its layers fold into plain weights -- and gathers them in
one `Method` value, `METHOD`. Adding a method is its own file plus one line in `methods.METHODS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A PEFT method as adapter files and checkpoints see it (plain functions; see the module docstring).

    Attributes:
        peft_type: the `peft_type` of its adapter_config.json ("LORA", "IA3", ...).
        name: what messages call it ("LoRA", "bottleneck adapters", ...).
        config_type: its config dataclass (None for selective fine-tuning, which reads the file itself).
        is_applied: `(model) -> bool`, whether `model` carries the method.
        peft_config_dict: `(model) -> dict`, the adapter_config.json of the method on `model`.
        config_from_peft: `(config dict, directory or None) -> config`, type- and range-checked.
        apply: `(model, config) -> list[str]` of touched module names.
        state_dict: `(model) -> {file key: tensor}`, the adapter file's tensors (PEFT's key names).
        load_state_dict: `(model, tensors, strict) -> (missing, unexpected)`.
        check_sizes: `(config, tensors, directory) -> None`, raising ValueError when a size the config
            implies disagrees with the tensors, BEFORE anything is allocated (None: nothing to check).
        check_compatible: `(model, config, directory) -> None`, raising ValueError when the method already on
            `model` has other hyperparameters than the file's (loading would mix the two).
        merged_state: `(model) -> {module path: plain module state}` with the method folded in, for
            a plain checkpoint; None when the method cannot be merged into weights.
        load: `(model, config, config dict, tensors, directory, adapter_name) -> None`, when loading is
            more than apply-then-load_state_dict (LoRA's named adapters, selective fine-tuning).
        named_adapters: whether `peft_config_dict` / `state_dict` take an adapter name (LoRA).
        module_prefix: what the file's keys of modules_to_save start with: PEFT's "base_model.model."
            (prompt learning methods: "base_model.", their PeftModel wraps the model directly).
        saves_trainable: the method's file holds every trainable parameter itself (selective
            fine-tuning), so modules_to_save are neither written separately nor checked for.
        owned: `(model) -> tensors`, trainable parameters of the method that `state_dict` does not hold as
            they are (LoRA's inactive adapters, prefix tuning's MLP), so save_adapter does not take them
            for parameters a user unfroze by hand (None: `state_dict` holds them all).
    """

    peft_type: str
    name: str
    config_type: Optional[type]
    is_applied: Callable[[nn.Module], bool]
    peft_config_dict: Callable[..., dict]
    config_from_peft: Callable[[dict, Optional[Path]], Any]
    apply: Callable[[nn.Module, Any], list]
    state_dict: Callable[..., Tensors]
    load_state_dict: Callable[..., tuple]
    check_sizes: Optional[Callable[[Any, Tensors, Path], None]] = None
    check_compatible: Optional[Callable[[nn.Module, Any, Path], None]] = None
    merged_state: Optional[Callable[[nn.Module], dict]] = None
    load: Optional[Callable[..., None]] = None
    named_adapters: bool = False
    module_prefix: str = "base_model.model."
    saves_trainable: bool = False
    owned: Optional[Callable[[nn.Module], Any]] = None

    def load_file(self, model: nn.Module, cfg, config: dict, tensors: Tensors, where: Path,
                  adapter_name: str | None = None) -> None:
        """Put an adapter file's method on `model`: apply it when absent (else check it agrees with the
        file), then load the tensors strictly. The caller restores the model if this raises."""
        if self.load is not None:
            return self.load(model, cfg, config, tensors, where, adapter_name)
        if not self.is_applied(model):
            self.apply(model, cfg)
        elif self.check_compatible is not None:
            self.check_compatible(model, cfg, where)
        self.load_state_dict(model, tensors, strict=True)
        return None


def refuse_mixed(what: str, ours: str, theirs: str, where: Path, hint: str = "") -> None:
    """Raise the ValueError for a file whose hyperparameters differ from the method already on the model."""
    raise ValueError(f"load_adapter: the model already carries {what} with {ours}, but {where / 'adapter_config.json'} "
                     f"has {theirs}; loading its weights into it would mix the two silently. Load it into a model "
                     f"without that method{' or ' + hint if hint else ''}")
