"""alignkit.advantages against naive per-sequence loops and the controllers' documented behaviour."""

import statistics

import pytest
import torch

from alignkit.advantages import (
    AdaptiveKLController,
    FixedKLController,
    LagrangeMultiplier,
    gae,
    grpo_advantages,
    kl_penalized_rewards,
    lagrangian_scores,
    rloo_advantages,
)


def _rollout(seed=0):
    """Right-padded responses of lengths 6, 2, 4, 1 (row 2 starts at 1, as if a prompt token were kept)."""
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 6
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    spans = [(0, 6), (0, 2), (1, 5), (0, 1)]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (s, e) in enumerate(spans):
        mask[b, s:e] = True
    rewards[~mask] = float("nan")  # padding may hold anything
    values[~mask] = 123.0
    return rewards, values, mask, spans


def _naive_gae(r, v, gamma, lam):
    """One sequence, python lists, straight from eq. 11/16: A_t = Σ_l (γλ)^l δ_{t+l}, V after the end = 0."""
    n = len(r)
    deltas = [r[t] + gamma * (v[t + 1] if t + 1 < n else 0.0) - v[t] for t in range(n)]
    adv = [sum((gamma * lam) ** l * deltas[t + l] for l in range(n - t)) for t in range(n)]
    return adv, [a + vv for a, vv in zip(adv, v)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0)])
def test_gae_matches_naive_loop_with_variable_lengths(gamma, lam):
    rewards, values, mask, spans = _rollout()
    adv, ret = gae(rewards, values, mask, gamma=gamma, gae_lambda=lam)
    for b, (s, e) in enumerate(spans):
        want_a, want_r = _naive_gae(rewards[b, s:e].tolist(), values[b, s:e].tolist(), gamma, lam)
        assert adv[b, s:e].tolist() == pytest.approx(want_a)
        assert ret[b, s:e].tolist() == pytest.approx(want_r)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_with_unit_gamma_and_lambda_gives_reward_to_go():
    rewards, values, mask, spans = _rollout(seed=1)
    _, ret = gae(rewards, values, mask, gamma=1.0, gae_lambda=1.0)
    for b, (s, e) in enumerate(spans):
        r = rewards[b, s:e].tolist()
        assert ret[b, s:e].tolist() == pytest.approx([sum(r[t:]) for t in range(len(r))])


def test_kl_penalized_rewards_put_the_score_on_the_last_response_token():
    g = torch.Generator().manual_seed(2)
    logps, ref = -torch.rand(3, 5, generator=g, dtype=torch.float64), -torch.rand(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    scores = torch.tensor([2.0, -1.0, 5.0], dtype=torch.float64)
    rewards, kl = kl_penalized_rewards(scores, logps, ref, mask, kl_coef=0.1)
    for b in range(3):
        last = max((t for t in range(5) if mask[b, t]), default=None)
        for t in range(5):
            k = (logps[b, t] - ref[b, t]).item() if mask[b, t] else 0.0
            assert kl[b, t].item() == pytest.approx(k)
            want = -0.1 * k + (scores[b].item() if t == last else 0.0)
            assert rewards[b, t].item() == pytest.approx(want)
    assert rewards[2].abs().sum() == 0  # empty response: no score anywhere
    _, kl3 = kl_penalized_rewards(scores, logps, ref, mask, kl_coef=0.1, kind="k3")
    assert (kl3 >= 0).all()


def test_grpo_advantages_match_loop():
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(12, generator=g, dtype=torch.float64)
    k, eps = 4, 1e-4
    adv = grpo_advantages(rewards, k, eps=eps)
    centred = grpo_advantages(rewards, k, scale_by_std=False)
    for start in range(0, 12, k):
        group = rewards[start : start + k].tolist()
        mean, std = statistics.mean(group), statistics.stdev(group)
        assert adv[start : start + k].tolist() == pytest.approx([(r - mean) / (std + eps) for r in group])
        assert centred[start : start + k].tolist() == pytest.approx([r - mean for r in group])
    assert grpo_advantages(torch.ones(4), 2).abs().max() == 0  # all equal: no signal, no NaN


def test_rloo_advantages_match_loop_and_sum_to_zero_per_group():
    g = torch.Generator().manual_seed(4)
    rewards = torch.randn(9, generator=g, dtype=torch.float64)
    k = 3
    adv = rloo_advantages(rewards, k)
    for start in range(0, 9, k):
        group = rewards[start : start + k].tolist()
        want = [r - sum(o for j, o in enumerate(group) if j != i) / (k - 1) for i, r in enumerate(group)]
        assert adv[start : start + k].tolist() == pytest.approx(want)
    torch.testing.assert_close(adv.view(-1, k).sum(1), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("fn", [grpo_advantages, rloo_advantages])
def test_group_size_must_divide_batch(fn):
    with pytest.raises(ValueError, match="multiple of group_size"):
        fn(torch.zeros(10), 4)
    with pytest.raises(ValueError, match=">= 2"):
        fn(torch.zeros(4), 1)


def test_adaptive_kl_controller_direction_and_clipping():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    assert ctl.update(9.0, n_steps=100) > 0.2  # KL too high: stronger penalty
    up = ctl.value
    assert ctl.update(3.0, n_steps=100) < up  # KL too low: weaker penalty
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    ctl.update(1e6, n_steps=100)
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 100 / 10_000))  # error clipped to +0.2
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    ctl.update(0.0, n_steps=100)
    assert ctl.value == pytest.approx(0.2 * (1 - 0.2 * 100 / 10_000))  # and to −0.2
    ctl.update(6.0, n_steps=100)
    assert ctl.value == pytest.approx(0.2 * (1 - 0.2 * 100 / 10_000))  # on target: unchanged
    restored = AdaptiveKLController(init_kl_coef=1.0, target=6.0, horizon=10_000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 10) == 0.05 and fixed.value == 0.05


def test_lagrange_multiplier_rises_with_violation_and_stays_non_negative():
    lam = LagrangeMultiplier(threshold=0.1, init_value=0.5, lr=0.1)
    assert lam.update(0.6) == pytest.approx(0.55)  # cost above threshold: λ grows
    assert lam.update(-0.4) == pytest.approx(0.5)  # below: λ shrinks
    for _ in range(100):
        lam.update(-10.0)
        assert lam.value >= 0
    assert lam.value == 0.0
    capped = LagrangeMultiplier(threshold=0.0, init_value=0.0, lr=1.0, max_value=2.0)
    for _ in range(5):
        capped.update(1.0)
    assert capped.value == 2.0
    state = capped.state_dict()
    lam.load_state_dict(state)
    assert lam.value == 2.0


def test_lagrangian_scores():
    reward, cost = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    torch.testing.assert_close(lagrangian_scores(reward, cost, 0.0), reward)
    torch.testing.assert_close(lagrangian_scores(reward, cost, 1.0), (reward - cost) / 2)
