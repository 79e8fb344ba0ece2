"""Issue 12's maths (tt.rlhf.advantages, tt.rlhf.rl_losses): GAE against a hand-computed example and a
per-row float64 loop, whitening, GRPO's group advantages, the KL estimators, PPO's per-token rewards and
clipped losses against float64 references, GRPO's three aggregations, the KL controller."""
import math

import pytest
import torch

from tinytune.rlhf.advantages import gae, group_advantages, whiten
from tinytune.rlhf.rl_losses import (KLController, grpo_loss, kl_estimate, ppo_policy_loss, ppo_rewards,
                                     value_loss)


def test_gae_matches_a_hand_computed_example():
    r, v, m = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3)
    adv, ret = gae(r, v, m, gamma=1.0, lam=0.95)
    # t=2: 1 - 0.7 = 0.3; t=1: (0.7 - 0.6) + 0.95 * 0.3 = 0.385; t=0: (0.6 - 0.5) + 0.95 * 0.385 = 0.46575
    assert adv.tolist()[0] == pytest.approx([0.46575, 0.385, 0.3], abs=1e-6)
    assert ret.tolist()[0] == pytest.approx([0.96575, 0.985, 1.0], abs=1e-6)


def _random_rows(B=6, T=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T)
    for b in range(B):  # a prompt (left), a completion of random length, then padding
        start = int(torch.randint(0, 4, (1,), generator=gen))
        length = int(torch.randint(1, T - start + 1, (1,), generator=gen))
        mask[b, start:start + length] = 1
    return torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen), mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0), (1.0, 0.0)])
def test_gae_equals_a_per_row_float64_loop_and_ignores_everything_off_the_mask(gamma, lam):
    r, v, m = _random_rows()
    adv, ret = gae(r, v, m, gamma, lam)
    for b in range(r.shape[0]):
        idx = m[b].nonzero().flatten().tolist()
        rr, vv = r[b, idx].double().tolist(), v[b, idx].double().tolist()
        expected, carry = [0.0] * len(idx), 0.0
        for t in reversed(range(len(idx))):
            nxt = vv[t + 1] if t + 1 < len(idx) else 0.0
            carry = rr[t] + gamma * nxt - vv[t] + gamma * lam * carry
            expected[t] = carry
        assert adv[b, idx].tolist() == pytest.approx(expected, abs=1e-5)
        assert ret[b, idx].tolist() == pytest.approx([a + x for a, x in zip(expected, vv)], abs=1e-5)
        assert (adv[b][m[b] == 0] == 0).all() and (ret[b][m[b] == 0] == 0).all()
    noisy_r, noisy_v = r.masked_fill(m == 0, 1e3), v.masked_fill(m == 0, -1e3)  # off-mask values never matter
    assert torch.equal(gae(noisy_r, noisy_v, m, gamma, lam)[0], adv)


def test_gae_refuses_bad_arguments():
    with pytest.raises(ValueError, match="lam"):
        gae(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), lam=1.5)
    with pytest.raises(ValueError, match=r"values must have the shape \(1, 2\)"):
        gae(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2))


def test_whiten_over_the_mask():
    x, _, m = _random_rows(seed=1)
    vals = x[m > 0].double()
    mean, var = vals.mean(), vals.var(unbiased=True)
    w = whiten(x, m)
    assert torch.allclose(w[m > 0].double(), (vals - mean) / torch.sqrt(var + 1e-8), atol=1e-5)
    assert (w[m == 0] == 0).all()
    kept = whiten(x, m, shift_mean=False)
    assert torch.allclose(kept[m > 0].double(), (vals - mean) / torch.sqrt(var + 1e-8) + mean, atol=1e-5)


def test_group_advantages_closed_forms():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 7.0])  # two groups of 4
    g = r.view(2, 4).double()
    centred = (g - g.mean(1, keepdim=True)).flatten()
    expected = centred / (g.std(1, unbiased=True).repeat_interleave(4) + 1e-4)
    assert torch.allclose(group_advantages(r, 4).double(), expected, atol=1e-6)
    assert torch.allclose(group_advantages(r, 4, "batch").double(), centred / (r.double().std() + 1e-4), atol=1e-6)
    assert torch.allclose(group_advantages(r, 4, "none").double(), centred, atol=1e-6)  # Dr. GRPO
    assert torch.equal(group_advantages(torch.full((4,), 2.0), 2), torch.zeros(4))  # a uniform group: no signal
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(r, 3)
    with pytest.raises(ValueError, match="group_size must be an int >= 2"):
        group_advantages(r, 1)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, 4, "mean")


def test_kl_estimators_are_zero_at_the_reference_and_match_their_formulas():
    logp = torch.randn(3, 5, dtype=torch.float64) - 2
    ref = logp + 0.3 * torch.randn(3, 5, dtype=torch.float64)
    for kind in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimate(logp, logp, kind), torch.zeros_like(logp))  # exactly 0
    d = logp - ref
    assert torch.allclose(kl_estimate(logp, ref, "k1"), d)
    assert torch.allclose(kl_estimate(logp, ref, "k2"), d ** 2 / 2)
    k3 = kl_estimate(logp, ref, "k3")
    assert torch.allclose(k3, torch.exp(ref - logp) - (ref - logp) - 1) and (k3 >= 0).all()
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logp, ref, "k4")


def test_ppo_rewards_put_the_score_on_the_last_completion_token_never_on_a_pad():
    logp, ref, m = torch.randn(3, 6), torch.randn(3, 6), torch.tensor(
        [[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    scores = torch.tensor([2.0, -1.0, 0.5])
    rewards, kl = ppo_rewards(scores, logp, ref, m, kl_coef=0.1)
    expected = -0.1 * (logp - ref) * m
    for b, last in enumerate((3, 5, 0)):
        expected[b, last] += scores[b]
    assert torch.allclose(rewards, expected, atol=1e-6)
    assert (rewards[m == 0] == 0).all() and (kl[m == 0] == 0).all()
    with pytest.raises(ValueError, match=r"rows \[0\] have no completion tokens"):
        ppo_rewards(scores, logp, ref, m * torch.tensor([[0.0], [1.0], [1.0]]), 0.1)


def _ppo_reference(logp, old, adv, mask, eps_low, eps_high):
    ratio = torch.exp(logp - old)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("clip_high", [None, 0.28])
def test_ppo_policy_loss_and_gradient_match_a_float64_reference(clip_high):
    _, _, m = _random_rows(seed=2)
    gen = torch.Generator().manual_seed(3)
    old = torch.randn(m.shape, generator=gen) - 2
    logp = (old + 0.4 * torch.randn(m.shape, generator=gen)).requires_grad_()
    adv = torch.randn(m.shape, generator=gen)
    loss, stats = ppo_policy_loss(logp, old, adv, m, 0.2, clip_high)
    loss.backward()
    ref_lp = logp.detach().double().requires_grad_()
    ref = _ppo_reference(ref_lp, old.double(), adv.double(), m.double(), 0.2, clip_high or 0.2)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert torch.allclose(logp.grad.double(), ref_lp.grad, atol=1e-6)
    assert 0 < stats["clipfrac"] < 1 and stats["approx_kl"] > 0


def test_ppo_policy_loss_at_the_sampling_policy_is_minus_the_mean_advantage():
    logp, adv, m = torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 4)
    loss, stats = ppo_policy_loss(logp, logp.clone(), adv, m)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    assert stats == {"clipfrac": 0.0, "approx_kl": 0.0}


def test_value_loss_matches_a_float64_reference():
    _, _, m = _random_rows(seed=4)
    gen = torch.Generator().manual_seed(5)
    old, ret = torch.randn(m.shape, generator=gen), torch.randn(m.shape, generator=gen)
    v = (old + 0.5 * torch.randn(m.shape, generator=gen)).requires_grad_()
    loss, stats = value_loss(v, old, ret, m, clip=0.2)
    vd, od, rd, md = v.detach().double(), old.double(), ret.double(), m.double()
    clipped = od + (vd - od).clamp(-0.2, 0.2)
    expected = 0.5 * (torch.maximum((vd - rd) ** 2, (clipped - rd) ** 2) * md).sum() / md.sum()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert 0 < stats["vf_clipfrac"] < 1


def test_grpo_aggregations_closed_forms():
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float32)
    logp = torch.zeros(2, 4)  # ratio 1: the per-token loss is -A
    adv = torch.tensor([1.0, -2.0])
    per_token = -adv[:, None].expand(2, 4) * m  # [[-1]*4, [2, 2, 0, 0]]
    grpo, _ = grpo_loss(logp, logp, adv, m, "grpo")
    dapo, _ = grpo_loss(logp, logp, adv, m, "dapo")
    dr, _ = grpo_loss(logp, logp, adv, m, "dr_grpo", max_completion_length=8)
    assert grpo.item() == pytest.approx(((-4 / 4) + (4 / 2)) / 2)  # per sequence, then mean: 0.5
    assert dapo.item() == pytest.approx(per_token.sum().item() / 6)  # per token over the batch: 0
    assert dr.item() == pytest.approx(per_token.sum().item() / (2 * 8))
    ref = logp - 0.1
    with_kl, stats = grpo_loss(logp, logp, adv, m, "dapo", beta=0.5, ref_logp=ref)
    k3 = math.exp(-0.1) - 1 + 0.1
    assert with_kl.item() == pytest.approx(dapo.item() + 0.5 * k3, abs=1e-6) and stats["kl"] == pytest.approx(k3)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, logp, adv, m, beta=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, logp, adv, m, "bnpo")


def test_kl_controller_fixed_and_adaptive():
    fixed = KLController(0.05)
    assert fixed.update(10.0, 256) == 0.05
    adaptive = KLController(0.1, target=6.0, horizon=10000)
    adaptive.update(9.0, 512)  # error clipped to +0.2: coef * (1 + 0.2 * 512 / 10000)
    assert adaptive.coef == pytest.approx(0.1 * (1 + 0.2 * 512 / 10000))
    adaptive.update(5.4, 1000)  # error -0.1
    assert adaptive.coef == pytest.approx(0.1 * (1 + 0.2 * 512 / 10000) * (1 - 0.1 * 1000 / 10000))
    back = KLController()
    back.load_state_dict(adaptive.state_dict())
    assert back == adaptive
    with pytest.raises(ValueError, match="coef"):
        back.load_state_dict({"coef": -1.0})
    assert back == adaptive  # a refused state changed nothing
