"""FiberPO's properties (JOYAI.md section 5) and GRPO / GSPO / PPO-clip against values computed by hand."""

import math

import pytest
import torch

from megajoy.stages.rl.losses import (fiber_terms, fiberpo_loss, group_advantages, grpo_loss, gspo_loss,
                                      ppo_clip_loss)

C_PLUS, C_MINUS, EPS = 0.12, 0.08, 0.05


def terms(log_ratio, mask=None):
    mask = torch.ones_like(log_ratio) if mask is None else mask
    return fiber_terms(log_ratio, mask, C_PLUS, C_MINUS, EPS)


def test_nothing_clipped_gives_the_plain_ratio_and_its_gradient():
    torch.manual_seed(0)
    log_ratio = (torch.rand(3, 6, dtype=torch.float64) - 0.5) * 0.04  # |log r| <= 0.02: inside every budget
    mask = torch.ones(3, 6, dtype=torch.float64)
    mask[2, 4:] = 0
    t = terms(log_ratio, mask)
    assert not t.clipped.any() and (t.channels == 0).all()
    assert torch.allclose(t.weight[mask.bool()], log_ratio.exp()[mask.bool()], rtol=0, atol=1e-14)
    ratio = log_ratio.exp()
    jac = torch.autograd.functional.jacobian(lambda r: terms(r.log(), mask).weight * mask, ratio)
    jac = jac.reshape(18, 18)
    assert torch.allclose(jac, torch.diag(mask.flatten()), atol=1e-12)
    # The loss's gradient is the plain ratio objective's: -mean_tau mean_t r A.
    advantages = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    a = log_ratio.clone().requires_grad_()
    fiberpo_loss(a, advantages, mask, C_PLUS, C_MINUS, EPS)[0].backward()
    b = log_ratio.clone().requires_grad_()
    (-((b.exp() * advantages[:, None] * mask).sum(-1) / mask.sum(-1)).mean()).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-14) and b.grad.abs().max() > 0.01


def test_weight_stays_within_its_bounds():
    torch.manual_seed(1)
    for scale in (0.01, 0.1, 0.5, 3.0):
        g = terms(torch.randn(64, 16, dtype=torch.float64) * scale).weight
        assert g.min() >= math.exp(-C_MINUS - 2 * EPS) - 1e-12
        assert g.max() <= math.exp(C_PLUS + 2 * EPS) + 1e-12


def test_rollback_reverses_the_drifting_channels_gradient():
    # T = 4 tokens, all positive: log s+ = mean log r. Pass-through at 0.10, rollback at 0.13 (C+ = 0.12 <
    # 0.13 < (1 + 1/4) 0.12 = 0.15), zeroed at 0.20. d log w_base / d log r_t = g'(x) / T.
    grads = {}
    for name, value in (("pass", 0.10), ("rollback", 0.13), ("zeroed", 0.20)):
        log_ratio = torch.full((1, 4), value, dtype=torch.float64, requires_grad=True)
        terms(log_ratio).w_base.log().sum().backward()
        grads[name] = log_ratio.grad[0, 0].item()
    assert grads["pass"] == pytest.approx(1 / 4)
    assert grads["rollback"] == pytest.approx(-4 / 4)  # slope -T, not 0
    assert grads["zeroed"] == 0


def test_jacobian_is_block_diagonal_over_trajectories():
    torch.manual_seed(2)
    log_ratio = torch.randn(3, 5, dtype=torch.float64) * 0.08
    jac = torch.autograd.functional.jacobian(lambda x: terms(x).weight, log_ratio)  # [3, 5, 3, 5]
    for a in range(3):
        for b in range(3):
            block = jac[a, :, b, :]
            assert (block.abs().max() > 1e-3) if a == b else (block == 0).all()


def test_every_regime_is_reached():
    rows = {  # T = 4 tokens each
        "G-I, L-I": [0.01, 0.01, 0.01, 0.01],
        "G-II,r": [0.13, 0.13, 0.13, 0.13],  # log s+ = 0.13 rolls back
        "G-II": [0.5, 0.5, 0.5, 0.5],  # log s+ = 0.5 zeroed
        "G-III,r, L-III": [0.26, 0.26, -0.18, -0.18],  # log s+ = 0.13, log s- = 0.09: both roll back;
        # every |u| (0.13 and 0.09) exceeds eps
        "G-III, L-III": [1.0, 1.0, -1.0, -1.0],  # both zeroed; every |u| = 0.5 > eps
        "L-II": [0.02, 0.02, 0.02, 0.1],  # only the last token's u = 0.06 is clipped
    }
    log_ratio = torch.tensor(list(rows.values()), dtype=torch.float64)
    _, stats = fiberpo_loss(log_ratio, torch.ones(len(rows), dtype=torch.float64), torch.ones_like(log_ratio))
    n = len(rows)
    assert stats["regime_G-I"] == pytest.approx(2 / n)  # the first and the L-II row
    for name in ("G-II,r", "G-II", "G-III,r", "G-III", "L-II"):
        assert stats[f"regime_{name}"] == pytest.approx(1 / n), name
    assert stats["regime_L-III"] == pytest.approx(2 / n)
    # Rows whose tokens all sit on their aggregate (u = 0, and no opposite-sign mass): nothing clipped.
    assert stats["regime_L-I"] == pytest.approx(3 / n)
    assert terms(log_ratio[4:5]).w_base.item() == pytest.approx(1.0)  # G-III: w_base = 1


# Hand-computed examples: two trajectories, ratios (1.5, 0.5) with A = 1 and (1.1, padding) with A = -1.
LOG_RATIO = torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(1.1), 0.0]], dtype=torch.float64)
MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
ADV = torch.tensor([1.0, -1.0], dtype=torch.float64)


def test_grpo_by_hand():
    # trajectory 1: min(1.5, 1.2) = 1.2 and min(0.5, 0.8) = 0.5 -> 0.85; trajectory 2: min(-1.1, -1.1) = -1.1
    loss, stats = grpo_loss(LOG_RATIO, ADV, MASK, epsilon=0.2)
    assert loss.item() == pytest.approx(-(0.85 - 1.1) / 2)
    assert stats["token_clip_fraction"] == pytest.approx(1 / 3)


def test_ppo_clip_by_hand():
    log_ratio = LOG_RATIO.clone().requires_grad_()
    loss, _ = ppo_clip_loss(log_ratio, ADV, MASK, epsilon=0.2)
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 1.1) / 3)
    loss.backward()
    # d/d log r of -(r A)/3 where unclipped: token 2 -> -0.5/3, token 3 -> +1.1/3; token 1 clipped -> 0
    assert log_ratio.grad.flatten().tolist() == pytest.approx([0.0, -0.5 / 3, 1.1 / 3, 0.0])


def test_gspo_by_hand():
    # s1 = sqrt(1.5 * 0.5) = 0.8660 (inside [0.8, 1.2]); s2 = 1.1 -> (0.8660 - 1.1) / 2
    loss, _ = gspo_loss(LOG_RATIO, ADV, MASK, epsilon_low=0.2, epsilon_high=0.2)
    assert loss.item() == pytest.approx(-(math.sqrt(0.75) - 1.1) / 2)
    loss, stats = gspo_loss(LOG_RATIO, ADV, MASK, epsilon_low=0.1, epsilon_high=0.05)
    # s1 = 0.866 < 0.9 with A = 1: min(0.866, 0.9) = 0.866; s2 = 1.1 > 1.05, A = -1: min(-1.1, -1.05) = -1.1
    assert loss.item() == pytest.approx(-(math.sqrt(0.75) - 1.1) / 2)
    assert stats["sequence_clip_fraction"] == 0


def test_group_advantages_by_hand():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]]))
    assert adv[0].tolist() == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=1e-5)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]


PER_TRAJECTORY = {"fiberpo": fiberpo_loss, "grpo": grpo_loss, "gspo": lambda *a: gspo_loss(*a, epsilon_low=0.01,
                                                                                                 epsilon_high=0.01)}


@pytest.mark.parametrize("name", sorted(PER_TRAJECTORY))
def test_a_row_without_response_tokens_is_no_trajectory(name):
    """A padding row (no response token) counts in no mean: the loss is the mean over the others of each
    one's own loss, and the RL stage's sum over micro-batches (each scaled by its share of trajectories)
    is the same however the rows are split. Before, the empty row counted as a zero trajectory in its
    micro-batch's mean: -0.62 as one batch, -0.67 in halves, -0.83 one row at a time."""
    loss_fn = PER_TRAJECTORY[name]
    log_ratio = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.05
    mask = torch.ones(4, 5, dtype=torch.float64)
    mask[1] = 0
    mask[3, 3:] = 0
    advantages = torch.tensor([1.0, 0.7, -0.5, 2.0], dtype=torch.float64)
    own = [loss_fn(log_ratio[i:i + 1], advantages[i:i + 1], mask[i:i + 1])[0].item() for i in (0, 2, 3)]
    for splits in ([[0, 1, 2, 3]], [[0, 1], [2, 3]], [[0], [1], [2], [3]], [[1], [0, 2, 3]]):
        total = sum(loss_fn(log_ratio[rows], advantages[rows], mask[rows])[0].item()
                    * (mask[rows].sum(-1) > 0).sum().item() / 3 for rows in splits)
        assert total == pytest.approx(sum(own) / 3, abs=1e-12), splits
    assert abs(sum(own)) > 0.1


def test_fiberpo_regime_shares_count_trajectories_only():
    log_ratio = torch.tensor([[0.2, 0.0, 0.7], [0.0, 0.0, 0.0], [0.01, -0.01, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    _, stats = fiberpo_loss(log_ratio, torch.ones(3, dtype=torch.float64), mask)
    # row 0: log s+ = 0.3 >= (1 + 1/3) 0.12 (zeroed), log s- = 0 (passes); u = -0.1, -0.3, 0.4, all clipped.
    # Row 2 inside every budget. Before, the empty row 1 counted as a third, G-I and L-I.
    shares = [stats[f"regime_{name}"] for name in ("G-I", "G-II", "L-I", "L-III")]
    assert shares == [0.5, 0.5, 0.5, 0.5]


@pytest.mark.parametrize("name, loss_fn", sorted({**PER_TRAJECTORY, "ppo-clip": ppo_clip_loss}.items()))
def test_policy_losses_refuse_misshaped_inputs_and_survive_empty_batches(name, loss_fn):
    log_ratio, mask = torch.zeros(3, 4), torch.ones(3, 4)
    for advantages, bad_mask in ((torch.ones(3, 1), mask), (torch.ones(3, 4), mask), (torch.ones(1), mask),
                                 (torch.ones(3), torch.ones(3, 5))):
        with pytest.raises(ValueError, match=r"advantages \[B\] \(one per trajectory\), got log_ratio \(3, 4\)"):
            loss_fn(log_ratio, advantages, bad_mask)
    # Nothing to learn from: zero loss, diagnostics 0 rather than NaN (they are summed into the step's metrics).
    loss, stats = loss_fn(torch.randn(3, 4), torch.ones(3), torch.zeros(3, 4))
    assert loss.item() == 0 and stats and all(v == 0 for k, v in stats.items() if not k.startswith("regime_"))


def test_equal_fractional_rewards_give_zero_advantages():
    """Eight rewards of 0.1 have a float32 mean one bit off 0.1; divided by their std (~1e-8) that left an
    advantage of -0.0074 for the whole group."""
    adv = group_advantages(torch.tensor([[0.1] * 8, [0.7] * 8, [0.1, 0.2] * 4]))
    assert adv[:2].abs().max().item() == 0
    expected = 0.05 / (math.sqrt(0.02 / 7) + 1e-6)  # deviations of +-0.05 over the sample std
    assert adv[2].tolist() == pytest.approx([-expected, expected] * 4, rel=1e-5)


def _fiberpo_by_the_equations(log_ratio, advantages, mask, c_plus, c_minus, eps):
    """JOYAI.md section 5 written out token by token (autograd through every term)."""

    def gate(x, budget, length):
        if abs(x) <= budget:
            return x
        if abs(x) < (1 + 1 / length) * budget:
            return math.copysign(1.0, x.item()) * (length + 1) * budget - length * x
        return x * 0

    objectives = []
    for b in range(log_ratio.shape[0]):
        tokens = [log_ratio[b, t] for t in range(log_ratio.shape[1]) if mask[b, t]]
        if not tokens:
            continue
        length = len(tokens)
        log_s = {1: sum(x.clamp(min=0) for x in tokens) / length, -1: sum((-x).clamp(min=0) for x in tokens) / length}
        w_base = torch.exp(gate(log_s[1], c_plus, length) - gate(log_s[-1], c_minus, length))
        total = 0
        for x in tokens:
            sign = 1 if x >= 0 else -1
            u, v = sign * x - log_s[sign], -log_s[-sign]
            r_fiber = torch.exp((sign * u).clamp(-eps, eps) - (sign * v).clamp(-eps, eps))
            total = total + w_base * r_fiber * advantages[b]
        objectives.append(total / length)
    return -sum(objectives) / max(len(objectives), 1)


def test_fiberpo_equals_its_equations_in_value_and_gradient():
    """Random trajectories across every regime (scales from inside the budgets to far beyond), with
    masked tokens, one-token and empty rows, and aggregates exactly on a budget: loss and gradient equal
    the token-by-token evaluation of JOYAI.md's equations."""
    g = torch.Generator().manual_seed(11)
    for trial in range(60):
        width = 1 + trial % 6
        log_ratio = torch.randn(4, width, dtype=torch.float64, generator=g) * (0.01, 0.05, 0.15, 0.6)[trial % 4]
        mask = (torch.rand(4, width, generator=g) > 0.3).double()
        mask[0] = 0
        mask[1, 0] = 1
        if trial % 5 == 0:  # a row whose log s+ sits exactly on C+ (pass-through, slope 1)
            log_ratio[2], mask[2] = C_PLUS, 1
        advantages = torch.randn(4, dtype=torch.float64, generator=g)
        ours = log_ratio.clone().requires_grad_()
        fiberpo_loss(ours, advantages, mask, C_PLUS, C_MINUS, EPS)[0].backward()
        ref = log_ratio.clone().requires_grad_()
        want = _fiberpo_by_the_equations(ref, advantages, mask, C_PLUS, C_MINUS, EPS)
        (want_grad,) = torch.autograd.grad(want, ref, allow_unused=True)
        want_grad = torch.zeros_like(log_ratio) if want_grad is None else want_grad
        assert torch.allclose(ours.grad * mask, want_grad * mask, rtol=0, atol=1e-13), trial
        loss = fiberpo_loss(log_ratio, advantages, mask, C_PLUS, C_MINUS, EPS)[0]
        assert loss.item() == pytest.approx(float(want.detach()), abs=1e-13), trial
