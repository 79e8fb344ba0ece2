"""Issue 12, point 5: every role on one frozen base. The policy, value and reward models are LoRA adapters
of one `CausalLM` (value and reward with their own heads), the reference is every adapter off; switching
roles never leaks gradients or trainable flags between them."""
import pytest
import torch

import tinytune as tt
from tinytune.rlhf import RewardModel, ValueModel, adapters_disabled, token_logprobs, use_adapter


def _role(name: str) -> str | None:
    """The adapter a parameter belongs to ('model.layers.0.self_attn.q_proj.lora_A_policy' -> 'policy')."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf.split("_", 2)[2] if leaf.startswith(("lora_A_", "lora_B_")) else None


def _one_base():
    torch.manual_seed(0)
    base = tt.models.build("llama-tiny")
    cfg = tt.lora.LoraConfig(rank=4, alpha=8, targets="all-linear")
    tt.lora.apply(base, cfg, adapter_name="policy")
    tt.lora.add_adapter(base, "value", cfg)
    tt.lora.add_adapter(base, "reward", cfg)
    with torch.no_grad():  # a "trained" reward adapter and non-zero B factors everywhere, so every role differs
        for name, p in base.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("lora_B_"):
                p.normal_(0.0, 0.05)
    for name, p in base.named_parameters():  # the value adapter trains beside the policy; the reward one never
        p.requires_grad_(_role(name) in ("policy", "value"))
    reward = RewardModel(base)
    reward.score.requires_grad_(False)
    value = ValueModel.from_reward_model(reward)
    return base, reward, value


def _snapshot(module, keep):
    return {n: p.detach().clone() for n, p in module.named_parameters() if keep(n)}


def test_a_ppo_like_step_moves_only_the_policy_and_value_roles():
    base, reward, value = _one_base()
    ids = torch.randint(3, 200, (4, 8))
    mask = torch.ones(4, 8, dtype=torch.long)
    frozen = _snapshot(base, lambda n: _role(n) is None)  # the base itself
    reward_adapter = _snapshot(base, lambda n: _role(n) == "reward")
    reward_head = reward.score.weight.detach().clone()
    policy_before = _snapshot(base, lambda n: _role(n) == "policy")
    value_before = _snapshot(base, lambda n: _role(n) == "value")
    assert len(policy_before) == len(value_before) == len(reward_adapter) == 2 * 7 * 2  # A and B, 7 linears, 2 layers
    flags = {n: p.requires_grad for n, p in base.named_parameters()}

    with torch.no_grad(), use_adapter(base, "reward"):
        scores = reward(ids, mask)
    with torch.no_grad(), adapters_disabled(base):
        ref = token_logprobs(base, ids, mask)
    with use_adapter(base, "policy"):
        logp = token_logprobs(base, ids, mask)
    with use_adapter(base, "value"):
        values = value(ids, mask)
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags  # switching changed no flag
    loss = -(logp * scores[:, None]).mean() + (logp - ref).pow(2).mean() + (values - scores[:, None]).pow(2).mean()
    params = [p for p in base.parameters() if p.requires_grad] + [value.score.weight]
    opt = torch.optim.SGD(params, lr=0.1)
    loss.backward()
    opt.step()

    assert all(torch.equal(p, frozen[n]) for n, p in base.named_parameters() if n in frozen)
    assert all(torch.equal(p, reward_adapter[n]) for n, p in base.named_parameters() if n in reward_adapter)
    assert all(p.grad is None for n, p in base.named_parameters() if _role(n) == "reward")
    assert torch.equal(reward.score.weight, reward_head)
    moved = lambda before: any(not torch.equal(p, before[n]) for n, p in base.named_parameters() if n in before)  # noqa: E731
    assert moved(policy_before) and moved(value_before)
    assert not torch.equal(value.score.weight, reward_head)


def test_each_role_computes_with_its_own_adapter_and_the_reference_with_none():
    base, reward, _ = _one_base()
    ids, mask = torch.randint(3, 200, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        with use_adapter(base, "policy"):
            policy = token_logprobs(base, ids, mask)
        with use_adapter(base, "reward"):
            as_reward = token_logprobs(base, ids, mask)
        with adapters_disabled(base):
            ref = token_logprobs(base, ids, mask)
        torch.manual_seed(0)
        plain = token_logprobs(tt.models.build("llama-tiny"), ids, mask)  # the same base weights, never adapted
    assert not torch.allclose(policy, as_reward) and not torch.allclose(policy, ref)
    assert torch.allclose(ref, plain, atol=1e-6)  # the reference is the base
    assert tt.lora.active_adapter(base) == "policy"  # restored after each block
    with pytest.raises(ValueError, match=r"no LoRA adapter 'critic'.*\['policy', 'value', 'reward'\]"):
        with use_adapter(base, "critic"):
            pass
