"""Every RL role on one frozen base: the policy, the value model and the reward model are LoRA adapters of
their own on the same `CausalLM` (the value and reward models add a small head), and the reference is the
base with every adapter off (`adapters_disabled`).

    tt.lora.apply(base, policy_cfg, adapter_name="policy")
    tt.lora.add_adapter(base, "value", value_cfg)
    value = tt.rlhf.ValueModel(base)                       # shares the body: its head is its own
    with tt.rlhf.use_adapter(base, "value"):
        values = value(ids, mask)
    with tt.rlhf.use_adapter(base, "policy"):
        logp = tt.rlhf.token_logprobs(base, ids, mask)

`use_adapter` switches the active adapter for the block and puts every parameter's `requires_grad` back as
it was on exit, so switching roles never changes what trains: the policy and value adapters stay trainable
while a frozen reward adapter never gets a gradient.
"""
from __future__ import annotations

import contextlib

import torch.nn as nn

from ..peft.lora.multi import active_adapter, list_adapters, set_adapter


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str):
    """Inside the block `model` computes with its LoRA adapter `name`; on exit the previously active adapter
    is back and every parameter's `requires_grad` is what it was before the block.

    Run backward inside the block when the model recomputes activations in backward (gradient
    checkpointing): the recomputation uses whichever adapter is active at that moment.

    Raises:
        ValueError: the model has no LoRA adapter `name` (the adapters are listed).
        RuntimeError: an adapter is merged (as `tt.lora.set_adapter`).
    """
    if name not in list_adapters(model):
        raise ValueError(f"use_adapter: the model has no LoRA adapter {name!r}; its adapters: {list_adapters(model)}")
    flags = {p: p.requires_grad for p in model.parameters()}
    previous = active_adapter(model)
    set_adapter(model, name)
    try:
        yield model
    finally:
        set_adapter(model, previous)
        for p, flag in flags.items():  # set_adapter froze the others: each role keeps its own flags
            p.requires_grad_(flag)
