"""PPO's four roles and how they share one frozen base.

    policy    the model being tuned               LoRA adapter `policy_adapter` on the base
    value     V(prefix) per token                 LoRA adapter "value" + its own scalar head
    reward    the score of a finished completion  LoRA adapter of the reward model + its head (frozen)
    reference the KL anchor                       the base with every adapter off

`ppo_roles` works out which role is which adapter (or a separate model) and builds the value model when
none is given; `PPOModels` is the one module `fit` trains: it holds the policy and the value model (their
parameters once, however much they share) and computes both in one forward, each under its own adapter
(so a DDP wrapper sees one forward). Roles are switched with `use_adapter`, which puts every parameter's
`requires_grad` back on exit: the reward adapter and head stay frozen, the base stays frozen.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..models.transformer import CausalLM
from ..peft.lora.multi import active_adapter, adapter_layers, list_adapters
from .dpo_step import adapters_disabled
from .logprobs import token_logprobs
from .reward_model import RewardModel
from .roles import use_adapter
from .value_model import ValueModel

VALUE_ADAPTER = "value"


def _role(base: nn.Module, adapter: str | None):
    """The block computes `base` with `adapter` (None: as it is: a separate model, nothing to switch)."""
    return use_adapter(base, adapter) if adapter is not None else contextlib.nullcontext()


@dataclass
class PPORoles:
    """Who plays which PPO role (see the module docstring).

    Attributes:
        policy: the tuned `CausalLM`. value: its `ValueModel`.
        reward: a `RewardModel`, or the reward functions.
        reference: a separate reference model, or None for the policy with its adapters disabled.
        policy_adapter, value_adapter, reward_adapter: the LoRA adapters of the shared base for each role
            (None: that role is a separate model, computed as it is).
    """

    policy: CausalLM
    value: ValueModel
    reward: RewardModel | list
    reference: nn.Module | None
    policy_adapter: str | None
    value_adapter: str | None
    reward_adapter: str | None

    def as_policy(self):
        """The block computes with the policy's adapter."""
        return _role(self.policy, self.policy_adapter)

    def as_value(self):
        """The block computes with the value model's adapter."""
        return _role(self.value.decoder, self.value_adapter)

    def as_reward(self):
        """The block computes with the reward model's adapter."""
        return _role(self.reward.decoder, self.reward_adapter)

    @property
    def shared(self) -> bool:
        """Whether the value model computes on the policy's base (one body, two adapters)."""
        return self.value.decoder is self.policy

    def reference_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T-1) log-probs of the sampled tokens under the reference (no gradients)."""
        with torch.no_grad():
            if self.reference is not None:
                return token_logprobs(self.reference, input_ids, attention_mask)
            with adapters_disabled(self.policy):
                return token_logprobs(self.policy, input_ids, attention_mask)


class PPOModels(nn.Module):
    """The module `fit` trains for PPO: the policy and the value model.

    Forward:
        input_ids (B, P+T), attention_mask (B, P+T), prompt_length P, role -> for role "policy" the policy's
        log-prob of each completion token (B, T); for "value" the value of the prefix before each (B, T); for
        "both" the pair, in one forward call (what a DDP wrapper needs: every trained parameter used).
    """

    ROLES = ("policy", "value", "both")

    def __init__(self, roles: PPORoles):
        super().__init__()
        self.policy, self.value = roles.policy, roles.value
        self._roles = [roles]  # a list: not a submodule (the reward model is not trained)

    @property
    def roles(self) -> PPORoles:
        """The `PPORoles` these models play."""
        return self._roles[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                role: str = "both"):
        if role not in self.ROLES:
            raise ValueError(f"PPOModels: role must be one of {list(self.ROLES)}, got {role!r}")
        roles, p, out = self.roles, prompt_length, []
        if role in ("policy", "both"):
            with roles.as_policy():
                out.append(token_logprobs(self.policy, input_ids, attention_mask)[:, p - 1:])
        if role in ("value", "both"):
            with roles.as_value():
                out.append(self.value(input_ids, attention_mask)[:, p - 1:-1])
        return tuple(out) if role == "both" else out[0]

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Per-block recomputation in the policy (and a separate value model's) body."""
        for model in {id(m): m for m in (self.policy, self.value.decoder)}.values():
            model.set_gradient_checkpointing(enabled)

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether the policy recomputes its blocks in backward."""
        return self.policy.is_gradient_checkpointing


def _copy_adapter(base: nn.Module, source: str, name: str) -> None:
    """Add adapter `name` to every layer holding `source`, with its hyperparameters and a copy of its weights."""
    for _, layer in adapter_layers(base, source):
        layer.add_adapter(name, layer.adapters[source])
        with torch.no_grad():
            for kind, param in layer.adapter_parameters(name).items():
                param.copy_(layer.adapter_parameters(source)[kind])


def _fresh_adapter(base: nn.Module, like: str, name: str) -> None:
    """Add adapter `name` to every layer holding `like`, with its hyperparameters, initialised to compute the base."""
    for _, layer in adapter_layers(base, like):
        layer.add_adapter(name, layer.adapters[like])


def _shared_adapter(model, policy: CausalLM, what: str) -> str | None:
    """The adapter a reward or value model uses on the policy's base (None when it has a base of its own)."""
    if model.decoder is not policy:
        return None
    name = getattr(model, "adapter_name", None)
    if name is None:
        raise ValueError(f"ppo: the {what} model computes on the policy's base, so it needs an adapter of its "
                         f"own: build it with adapter_name=... (e.g. tt.rlhf.load_reward_model(base, path, "
                         f"adapter_name='reward')); the base's adapters: {list_adapters(policy)}")
    if name not in list_adapters(policy):
        raise ValueError(f"ppo: the {what} model's adapter {name!r} is not on the base; its adapters: "
                         f"{list_adapters(policy)}")
    return name


def _default_value(policy: CausalLM, policy_adapter: str | None, reward, reward_adapter) -> ValueModel:
    """A value adapter + head on the policy's base, started from the reward model when it shares that base."""
    if policy_adapter is None:
        raise ValueError("ppo: the policy carries no LoRA adapter, so no value adapter can share its base: pass "
                         "value=tt.rlhf.ValueModel(<a copy of the base>) (and reference=<the initial policy>)")
    if VALUE_ADAPTER in list_adapters(policy):
        raise ValueError(f"ppo: the base already has an adapter {VALUE_ADAPTER!r}; pass "
                         f"value=tt.rlhf.ValueModel(base, adapter_name={VALUE_ADAPTER!r}) to train it as the value "
                         "model, or delete it")
    if isinstance(reward, RewardModel) and reward_adapter is not None:
        _copy_adapter(policy, reward_adapter, VALUE_ADAPTER)  # V starts as the reward model (TRL, torchtune)
        value = ValueModel.from_reward_model(reward, policy)
    else:
        _fresh_adapter(policy, policy_adapter, VALUE_ADAPTER)
        value = ValueModel(policy)
    value.adapter_name = VALUE_ADAPTER
    return value


def _check_models(policy, reward, value, reference) -> None:
    if not isinstance(policy, CausalLM):
        raise TypeError(f"ppo: policy must be a tinytune CausalLM, got {type(policy).__name__}")
    functions = isinstance(reward, Sequence) and not isinstance(reward, (str, bytes))
    if not (isinstance(reward, RewardModel) or callable(reward) or functions):
        raise TypeError("ppo: reward must be a tt.rlhf.RewardModel, a reward function or a list of them, "
                        f"got {type(reward).__name__}")
    if functions and (not reward or not all(callable(f) for f in reward)):
        raise TypeError(f"ppo: reward must be a non-empty list of callables, got {reward!r}")
    if value is not None and not isinstance(value, ValueModel):
        raise TypeError(f"ppo: value must be a tt.rlhf.ValueModel or None, got {type(value).__name__}")
    if reference is not None and not isinstance(reference, nn.Module):
        raise TypeError(f"ppo: reference must be an nn.Module or None, got {type(reference).__name__}")


def _freeze_reward(reward, adapter: str | None) -> None:
    """The reward model never trains: its head, and its adapter on the shared base."""
    if not isinstance(reward, RewardModel):
        return
    if adapter is None:
        reward.requires_grad_(False)
        return
    reward.score.requires_grad_(False)
    for _, layer in adapter_layers(reward.decoder, adapter):
        for param in layer.adapter_parameters(adapter).values():
            param.requires_grad_(False)


def ppo_roles(policy, reward, value=None, reference=None) -> PPORoles:
    """Work out PPO's roles (see the module docstring); builds the value model when `value` is None.

    Only the policy's and the value model's parameters are left trainable: the value adapter and head are
    made trainable, the reward model (adapter and head) frozen. Everything is checked before the model changes.

    Raises:
        TypeError: a role of the wrong type.
        ValueError: a role on the policy's base without an adapter of its own (or the policy's), a policy
            without LoRA and no value model or reference, a base that already has a "value" adapter.
    """
    _check_models(policy, reward, value, reference)
    policy_adapter = active_adapter(policy) if list_adapters(policy) else None
    reward_adapter = _shared_adapter(reward, policy, "reward") if isinstance(reward, RewardModel) else None
    value_adapter = _shared_adapter(value, policy, "value") if value is not None else None
    if policy_adapter is not None and policy_adapter in (reward_adapter, value_adapter):
        raise ValueError(f"ppo: the policy's active adapter {policy_adapter!r} is also the "
                         f"{'reward' if policy_adapter == reward_adapter else 'value'} model's; give each role an "
                         "adapter of its own and make the policy's active (tt.lora.set_adapter)")
    if reference is None and policy_adapter is None:
        raise ValueError("ppo: the policy carries no LoRA adapter, so 'adapters off' is not a reference: pass "
                         "reference=<a frozen copy of the initial policy>")
    if value is None:
        value = _default_value(policy, policy_adapter, reward, reward_adapter)
        value_adapter = value.adapter_name
    _freeze_reward(reward, reward_adapter)
    value.score.requires_grad_(True)
    if value_adapter is not None:
        for _, layer in adapter_layers(policy, value_adapter):
            for param in layer.adapter_parameters(value_adapter).values():
                param.requires_grad_(True)
    reward = reward if isinstance(reward, RewardModel) else ([reward] if callable(reward) else list(reward))
    return PPORoles(policy, value, reward, reference, policy_adapter, value_adapter, reward_adapter)
