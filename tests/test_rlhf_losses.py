"""tt.rlhf.reward_loss, grouped_reward_loss and dpo_loss against their closed forms (TRL's formulas:
RewardTrainer, DPOTrainer's "sigmoid" / "ipo" / "hinge", CPOTrainer's "simpo"), written out here with
math on Python floats, one pair at a time, in float64.

Tolerances: float64 inputs, compared within atol 1e-12 (rtol 0) of the per-pair math-module closed
forms; ln 2 at policy == reference exactly (atol 0) for fp32 and fp64.
"""
import math

import pytest
import torch

import tinytune as tt

TOL = dict(atol=1e-12, rtol=0)


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _vec(*values):
    return torch.tensor(values, dtype=torch.float64)


def _close(got: torch.Tensor, want: float):
    assert got.dtype == torch.float64 and got.dim() == 0
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), **TOL)


RC, RR, MARGIN = [1.5, -0.2, 0.3, 2.0], [0.5, 0.4, -1.0, 2.5], [0.25, 0.0, 1.0, -0.5]
PC, PR, REFC, REFR = [-10.0, -22.5, -7.25, -30.0], [-12.0, -20.0, -9.5, -29.0], [-11.0, -21.0, -8.0, -30.5], \
    [-11.5, -21.5, -9.0, -28.0]
LEN_C, LEN_R = [5, 9, 3, 12], [6, 8, 4, 10]


@pytest.mark.parametrize("margin", [None, MARGIN])
@pytest.mark.parametrize("center_coef", [0.0, 0.01, 1])
def test_reward_loss_closed_form(margin, center_coef):
    m = margin or [0.0] * 4
    want = sum(-_logsigmoid(c - r - mm) for c, r, mm in zip(RC, RR, m)) / 4
    want += center_coef * sum((c + r) ** 2 for c, r in zip(RC, RR)) / 4
    got = tt.rlhf.reward_loss(_vec(*RC), _vec(*RR), None if margin is None else _vec(*margin), center_coef)
    _close(got, want)


def test_reward_loss_gradient_and_fp32():
    rc, rr = _vec(*RC).float().requires_grad_(), _vec(*RR).float().requires_grad_()
    loss = tt.rlhf.reward_loss(rc, rr)
    assert loss.dtype == torch.float32
    loss.backward()
    want = [-(1 - 1 / (1 + math.exp(-(c - r)))) / 4 for c, r in zip(RC, RR)]  # d/dr_c of -logsigmoid(r_c - r_r)
    torch.testing.assert_close(rc.grad, torch.tensor(want), atol=1e-6, rtol=0)
    torch.testing.assert_close(rr.grad, -torch.tensor(want), atol=1e-6, rtol=0)


@pytest.mark.parametrize("center_coef", [0.0, 0.5])
def test_grouped_reward_loss_means_per_group_then_over_groups(center_coef):
    groups = [7, 3, 7, 7]  # group 7 has three pairs, group 3 one; not adjacent
    per = [-_logsigmoid(c - r - m) + center_coef * (c + r) ** 2 for c, r, m in zip(RC, RR, MARGIN)]
    want = ((per[0] + per[2] + per[3]) / 3 + per[1]) / 2
    got = tt.rlhf.grouped_reward_loss(_vec(*RC), _vec(*RR), torch.tensor(groups), _vec(*MARGIN), center_coef)
    _close(got, want)
    one_each = tt.rlhf.grouped_reward_loss(_vec(*RC), _vec(*RR), torch.arange(4), _vec(*MARGIN), center_coef)
    _close(one_each, sum(per) / 4)  # singleton groups: the plain reward_loss


def _h(i):
    return (PC[i] - REFC[i]) - (PR[i] - REFR[i])


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("ls", [0.0, 0.1, 0.3])
def test_dpo_sigmoid_and_conservative_closed_form(beta, ls):
    want = sum(-(1 - ls) * _logsigmoid(beta * _h(i)) - ls * _logsigmoid(-beta * _h(i)) for i in range(4)) / 4
    loss, cr, rr = tt.rlhf.dpo_loss(_vec(*PC), _vec(*PR), _vec(*REFC), _vec(*REFR), beta=beta, label_smoothing=ls)
    _close(loss, want)
    torch.testing.assert_close(cr, beta * (_vec(*PC) - _vec(*REFC)), **TOL)
    torch.testing.assert_close(rr, beta * (_vec(*PR) - _vec(*REFR)), **TOL)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_hinge_closed_form(beta):
    want = sum(max(0.0, 1 - beta * _h(i)) for i in range(4)) / 4
    loss, _, _ = tt.rlhf.dpo_loss(_vec(*PC), _vec(*PR), _vec(*REFC), _vec(*REFR), beta=beta, loss_type="hinge")
    _close(loss, want)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_ipo_closed_form_on_length_normalised_logprobs(beta):
    def h(i):  # every log-prob divided by its response's length, as TRL does for IPO
        return (PC[i] / LEN_C[i] - REFC[i] / LEN_C[i]) - (PR[i] / LEN_R[i] - REFR[i] / LEN_R[i])
    want = sum((h(i) - 1 / (2 * beta)) ** 2 for i in range(4)) / 4
    lc, lr = torch.tensor(LEN_C), torch.tensor(LEN_R)
    loss, cr, _ = tt.rlhf.dpo_loss(_vec(*PC), _vec(*PR), _vec(*REFC), _vec(*REFR), beta=beta, loss_type="ipo",
                                   chosen_lengths=lc, rejected_lengths=lr)
    _close(loss, want)
    torch.testing.assert_close(cr, beta * (_vec(*PC) - _vec(*REFC)) / lc, **TOL)
    pre = tt.rlhf.dpo_loss(_vec(*PC) / lc, _vec(*PR) / lr, _vec(*REFC) / lc, _vec(*REFR) / lr, beta=beta,
                           loss_type="ipo")[0]  # or the caller normalises
    _close(pre, want)
    raw = sum((_h(i) - 1 / (2 * beta)) ** 2 for i in range(4)) / 4  # without lengths: the sums as given
    _close(tt.rlhf.dpo_loss(_vec(*PC), _vec(*PR), _vec(*REFC), _vec(*REFR), beta, "ipo")[0], raw)


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_simpo_closed_form_reference_free(ls):
    beta, gamma = 2.0, 0.8
    z = [beta * (PC[i] / LEN_C[i] - PR[i] / LEN_R[i]) - gamma for i in range(4)]
    want = sum(-(1 - ls) * _logsigmoid(x) - ls * _logsigmoid(-x) for x in z) / 4
    lc, lr = torch.tensor(LEN_C), torch.tensor(LEN_R)
    loss, cr, rr = tt.rlhf.dpo_loss(_vec(*PC), _vec(*PR), None, None, beta=beta, loss_type="simpo",
                                    label_smoothing=ls, chosen_lengths=lc, rejected_lengths=lr, gamma=gamma)
    _close(loss, want)
    torch.testing.assert_close(cr, beta * _vec(*PC) / lc, **TOL)
    torch.testing.assert_close(rr, beta * _vec(*PR) / lr, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ls", [0.0, 0.25])
def test_first_step_dpo_loss_is_ln2(dtype, ls):
    policy_c, policy_r = torch.tensor(PC, dtype=dtype), torch.tensor(PR, dtype=dtype)
    loss, cr, rr = tt.rlhf.dpo_loss(policy_c, policy_r, policy_c.clone(), policy_r.clone(), label_smoothing=ls)
    torch.testing.assert_close(loss, torch.tensor(math.log(2), dtype=dtype), atol=0, rtol=0)
    assert cr.eq(0).all() and rr.eq(0).all()


def test_rewards_are_detached_and_loss_has_gradients():
    pc = _vec(*PC).requires_grad_()
    loss, cr, rr = tt.rlhf.dpo_loss(pc, _vec(*PR), _vec(*REFC), _vec(*REFR))
    assert not cr.requires_grad and not rr.requires_grad
    loss.backward()
    want = [-0.1 * (1 - 1 / (1 + math.exp(-0.1 * _h(i)))) / 4 for i in range(4)]
    torch.testing.assert_close(pc.grad, _vec(*want), **TOL)


def test_bad_inputs_give_clear_errors():
    a, b = _vec(1.0, 2.0), _vec(0.0, 1.0)
    with pytest.raises(ValueError, match=r"r_rejected must have the shape of the chosen scores \(2,\), got \(3,\)"):
        tt.rlhf.reward_loss(a, _vec(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match=r"margin must have the shape .* got \(1,\)"):
        tt.rlhf.reward_loss(a, b, margin=_vec(1.0))
    with pytest.raises(ValueError, match=r"r_chosen must be a floating \(B,\) tensor, got torch.int64 \(2,\)"):
        tt.rlhf.reward_loss(torch.tensor([1, 2]), b)
    with pytest.raises(ValueError, match="center_coef must be a number >= 0, got -0.1"):
        tt.rlhf.reward_loss(a, b, center_coef=-0.1)
    with pytest.raises(ValueError, match=r"group_ids must be an integer tensor of shape \(2,\)"):
        tt.rlhf.grouped_reward_loss(a, b, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="beta must be a number > 0, got 0"):
        tt.rlhf.dpo_loss(a, b, a, b, beta=0)
    with pytest.raises(ValueError, match=r"loss_type must be one of \('sigmoid', 'ipo', 'hinge', 'simpo'\), "
                                         r"got 'kto'"):
        tt.rlhf.dpo_loss(a, b, a, b, loss_type="kto")
    for ls in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match=rf"label_smoothing must be in \[0, 0.5\), got {ls}"):
            tt.rlhf.dpo_loss(a, b, a, b, label_smoothing=ls)
    with pytest.raises(ValueError, match="label_smoothing applies to loss_type .* got 'hinge'"):
        tt.rlhf.dpo_loss(a, b, a, b, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"ref_rejected must have the shape of the chosen scores \(2,\), got \(1,\)"):
        tt.rlhf.dpo_loss(a, b, a, _vec(1.0))
    with pytest.raises(ValueError, match="ref_chosen must be a floating"):
        tt.rlhf.dpo_loss(a, b, None, b)
    with pytest.raises(ValueError, match="'simpo' needs chosen_lengths and rejected_lengths"):
        tt.rlhf.dpo_loss(a, b, None, None, loss_type="simpo")
    with pytest.raises(ValueError, match="lengths apply to loss_type .* got 'sigmoid'"):
        tt.rlhf.dpo_loss(a, b, a, b, chosen_lengths=torch.tensor([1, 2]), rejected_lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"rejected_lengths must be a \(B,\) = \(2,\) tensor of counts > 0"):
        tt.rlhf.dpo_loss(a, b, a, b, loss_type="ipo", chosen_lengths=torch.tensor([1, 2]),
                         rejected_lengths=torch.tensor([0, 2]))
