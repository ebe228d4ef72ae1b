"""alignkit.losses against hand-computed / loop references, limits and gradient properties."""

import math

import pytest
import torch

from alignkit.losses import (
    KL_ESTIMATORS,
    PREFERENCE_LOSSES,
    kl_estimate,
    kl_penalty_loss,
    kto_kl_reference_point,
    kto_loss,
    nll_loss,
    pairwise_rm_loss,
    ppo_policy_loss,
    ppo_value_loss,
    preference_loss,
    regression_rm_loss,
)


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _pairs(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-(torch.rand(B, generator=g, dtype=torch.float64) * 20 + 1) for _ in range(4))
    return pc, pr, rc, rr


# ------------------------------------------------------------------------------ SFT and RMs


def test_nll_loss_is_negative_logps_on_mask():
    logps = -torch.rand(2, 4, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    losses, metrics = nll_loss(logps, mask)
    torch.testing.assert_close(losses, -logps * mask)
    vals = [-logps[b, t].item() for b in range(2) for t in range(4) if mask[b, t]]
    assert metrics["nll"].item() == pytest.approx(sum(vals) / len(vals))
    assert metrics["ppl"].item() == pytest.approx(math.exp(sum(vals) / len(vals)))


def test_pairwise_rm_zero_margin_and_margin_formula():
    g = torch.Generator().manual_seed(1)
    rc, rr = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    margin = torch.rand(8, generator=g, dtype=torch.float64) * 3
    plain, metrics = pairwise_rm_loss(rc, rr)
    zero, _ = pairwise_rm_loss(rc, rr, torch.zeros(8, dtype=torch.float64))
    with_margin, _ = pairwise_rm_loss(rc, rr, margin)
    for i in range(8):
        d = rc[i].item() - rr[i].item()
        assert plain[i].item() == pytest.approx(-_logsig(d))
        assert zero[i].item() == pytest.approx(-_logsig(d))
        assert with_margin[i].item() == pytest.approx(-_logsig(d - margin[i].item()))
    assert (with_margin > plain).all()  # a positive margin always increases the loss
    assert metrics["rewards/accuracies"].item() == pytest.approx((rc > rr).double().mean().item())
    assert metrics["rewards/margins"].item() == pytest.approx((rc - rr).mean().item())
    assert metrics["rewards/chosen"].item() == pytest.approx(rc.mean().item())
    assert metrics["rewards/rejected"].item() == pytest.approx(rr.mean().item())


def test_pairwise_rm_centring_term_and_its_gradient():
    """c·(r_w + r_l)² per pair (Eisenstein et al. 2023): shifting every reward by s changes only
    the centring term, whose gradient along the shift is 2c·Σ(r_w + r_l)·2, pulling the mean to 0."""
    g = torch.Generator().manual_seed(2)
    rc, rr = torch.randn(6, generator=g, dtype=torch.float64) + 2, torch.randn(6, generator=g, dtype=torch.float64) + 2
    plain, _ = pairwise_rm_loss(rc, rr)
    centred, _ = pairwise_rm_loss(rc, rr, center_coef=0.1)
    torch.testing.assert_close(centred, plain + 0.1 * (rc + rr) ** 2)
    shift = torch.zeros((), dtype=torch.float64, requires_grad=True)
    pairwise_rm_loss(rc + shift, rr + shift, center_coef=0.1)[0].sum().backward()
    assert shift.grad.item() == pytest.approx(0.1 * 2 * 2 * (rc + rr).sum().item())  # > 0: rewards move down
    assert shift.grad.item() > 0


def test_regression_rm_loss_is_per_example_mse():
    p, t = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.0, 2.5, 1.0])
    losses, metrics = regression_rm_loss(p, t)
    torch.testing.assert_close(losses, torch.tensor([1.0, 0.25, 4.0]))
    assert metrics["mse"].item() == pytest.approx(5.25 / 3)
    losses2, _ = regression_rm_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 0.0]]))
    torch.testing.assert_close(losses2, torch.tensor([5.0]))


# ------------------------------------------------------------------------------ DPO family


def _naive(name, pc, pr, rc, rr, beta, **opt):
    """Per-example python formulas straight from the papers."""
    out = []
    for i in range(len(pc)):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        eps = opt.get("label_smoothing", 0.0)
        if name == "sigmoid":
            out.append(-_logsig(beta * h))
        elif name == "ipo":
            out.append((h - 1 / (2 * beta)) ** 2)
        elif name == "cdpo":
            out.append(-(1 - eps) * _logsig(beta * h) - eps * _logsig(-beta * h))
        elif name == "robust":
            out.append(((1 - eps) * -_logsig(beta * h) - eps * -_logsig(-beta * h)) / (1 - 2 * eps))
        elif name == "hinge":
            out.append(max(0.0, 1 - beta * h))
        elif name == "simpo":
            out.append(-_logsig(beta * (pc[i] - pr[i]) - opt["gamma"]))
        elif name == "orpo":
            odds = lambda lp: math.exp(lp) / (1 - math.exp(lp))  # noqa: E731
            out.append(-beta * _logsig(math.log(odds(pc[i]) / odds(pr[i]))))
    return out


CASES = [
    ("sigmoid", {}),
    ("ipo", {}),
    ("cdpo", {"label_smoothing": 0.1}),
    ("robust", {"label_smoothing": 0.2}),
    ("hinge", {}),
    ("simpo", {"gamma": 0.7}),
    ("orpo", {}),
]


@pytest.mark.parametrize("name,options", CASES)
def test_preference_losses_match_paper_formulas(name, options):
    pc, pr, rc, rr = _pairs()
    if name in ("simpo", "orpo"):  # length-normalised logps, no reference
        pc, pr, rc, rr = pc / 10, pr / 10, None, None
    beta = 0.3
    losses, chosen_r, rejected_r = PREFERENCE_LOSSES[name](pc, pr, rc, rr, beta=beta, **options)
    ref = _naive(name, pc.tolist(), pr.tolist(), (rc if rc is not None else pc * 0).tolist(),
                 (rr if rr is not None else pr * 0).tolist(), beta, **options)
    assert losses.shape == (6,)
    assert losses.tolist() == pytest.approx(ref, rel=1e-9, abs=1e-12)
    base_c, base_r = (pc, pr) if rc is None else (pc - rc, pr - rr)
    torch.testing.assert_close(chosen_r, beta * base_c)
    torch.testing.assert_close(rejected_r, beta * base_r)
    assert not chosen_r.requires_grad


def _loss_of_h(name, h, beta, **options):
    """Loss as a function of h alone (rejected/reference log-probs zero)."""
    zero = torch.zeros_like(h)
    return PREFERENCE_LOSSES[name](h, zero, zero, zero, beta=beta, **options)[0]


def test_dpo_small_beta_limit_is_log2_with_gradient_proportional_to_beta():
    h = torch.tensor([-3.0, 0.5, 4.0], dtype=torch.float64, requires_grad=True)
    for beta in (1e-3, 1e-5):
        loss = _loss_of_h("sigmoid", h, beta)
        torch.testing.assert_close(loss.detach(), torch.full_like(loss, math.log(2)), atol=10 * beta, rtol=0)
        (grad,) = torch.autograd.grad(loss.sum(), h)
        torch.testing.assert_close(grad / beta, torch.full_like(grad, -0.5), atol=10 * beta, rtol=0)


def test_cdpo_gradient_formula_and_half_smoothing_targets_h_zero():
    h = torch.linspace(-5, 5, 11, dtype=torch.float64, requires_grad=True)
    beta = 0.7
    for eps in (0.0, 0.1, 0.5):
        (grad,) = torch.autograd.grad(_loss_of_h("cdpo", h, beta, label_smoothing=eps).sum(), h)
        torch.testing.assert_close(grad, beta * (torch.sigmoid(beta * h.detach()) - (1 - eps)))
    # ε = ½: no preference left, the loss is symmetric in h and its only stationary point is h = 0
    # (it is not constant: its gradient is β(σ(βh) − ½)).
    half = _loss_of_h("cdpo", h.detach(), beta, label_smoothing=0.5)
    torch.testing.assert_close(half, half.flip(0))
    zero = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    (g0,) = torch.autograd.grad(_loss_of_h("cdpo", zero, beta, label_smoothing=0.5).sum(), zero)
    assert g0.item() == 0.0
    torch.testing.assert_close(_loss_of_h("cdpo", h, beta), _loss_of_h("sigmoid", h, beta))


def test_robust_dpo_reduces_to_dpo_and_is_unbiased_under_label_flips():
    h = torch.linspace(-4, 4, 9, dtype=torch.float64)
    beta = 0.5
    torch.testing.assert_close(_loss_of_h("robust", h, beta), _loss_of_h("sigmoid", h, beta))
    for eps in (0.1, 0.3):
        # a pair is seen as (y_w, y_l) w.p. 1 − ε and flipped (h → −h) w.p. ε
        expected = (1 - eps) * _loss_of_h("robust", h, beta, label_smoothing=eps) + eps * _loss_of_h(
            "robust", -h, beta, label_smoothing=eps
        )
        torch.testing.assert_close(expected, _loss_of_h("sigmoid", h, beta))
    with pytest.raises(ValueError):
        _loss_of_h("robust", h, beta, label_smoothing=0.5)


def test_ipo_minimum_at_half_inverse_beta():
    beta = 0.25
    h_star = torch.tensor([1 / (2 * beta)], dtype=torch.float64, requires_grad=True)
    loss = _loss_of_h("ipo", h_star, beta)
    (grad,) = torch.autograd.grad(loss.sum(), h_star)
    assert loss.item() == 0.0 and grad.item() == 0.0
    others = torch.tensor([0.0, 1.0, 1.9, 2.1, 5.0], dtype=torch.float64)
    assert (_loss_of_h("ipo", others, beta) > 0).all()


def test_hinge_is_zero_with_no_gradient_beyond_margin():
    beta = 0.5
    h = torch.tensor([-1.0, 0.0, 1.0, 2.0, 3.0, 10.0], dtype=torch.float64, requires_grad=True)
    loss = _loss_of_h("hinge", h, beta)
    (grad,) = torch.autograd.grad(loss.sum(), h)
    beyond = h.detach() >= 1 / beta
    assert (loss[beyond] == 0).all() and (grad[beyond] == 0).all()
    torch.testing.assert_close(loss[~beyond].detach(), 1 - beta * h.detach()[~beyond])
    assert (grad[~beyond] == -beta).all()


def test_preference_loss_wrapper_metrics_sft_and_errors():
    pc, pr, rc, rr = _pairs()
    beta = 0.1
    nll = torch.rand(6, dtype=torch.float64)
    losses, metrics = preference_loss("sigmoid", pc, pr, rc, rr, beta=beta)
    with_sft, m2 = preference_loss("sigmoid", pc, pr, rc, rr, beta=beta, sft_weight=0.5, chosen_nll=nll)
    torch.testing.assert_close(with_sft, losses + 0.5 * nll)
    assert m2["nll"].item() == pytest.approx(nll.mean().item())
    cr, rj = beta * (pc - rc), beta * (pr - rr)
    expected = {
        "rewards/chosen": cr.mean(), "rewards/rejected": rj.mean(), "rewards/margins": (cr - rj).mean(),
        "rewards/accuracies": (cr > rj).double().mean(), "logps/chosen": pc.mean(), "logps/rejected": pr.mean(),
    }
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key].item() == pytest.approx(value.item()), key
        assert metrics[key].dim() == 0 and not metrics[key].requires_grad
    with pytest.raises(ValueError, match="sigmoid.*ipo"):
        preference_loss("nope", pc, pr, rc, rr, beta=beta)
    with pytest.raises(ValueError):
        preference_loss("sigmoid", pc, pr, rc, rr, beta=beta, sft_weight=1.0)
    with pytest.raises(TypeError):
        preference_loss("sigmoid", pc, pr, rc, rr, beta=beta, label_smoothing=0.1)
    with pytest.raises(ValueError):
        preference_loss("ipo", pc, pr, rc, rr, beta=0.0)


def test_per_example_losses_do_not_depend_on_batch_split():
    """Unreduced losses are computed row by row: splitting a batch changes nothing, so summing
    them over micro-batches and dividing by a global count is invariant to accumulation."""
    pc, pr, rc, rr = _pairs(B=8)
    for name, options in CASES:
        args = (pc / 10, pr / 10, None, None) if name in ("simpo", "orpo") else (pc, pr, rc, rr)
        full = PREFERENCE_LOSSES[name](*args, beta=0.2, **options)[0]
        halves = [PREFERENCE_LOSSES[name](*(a[s] if a is not None else None for a in args), beta=0.2, **options)[0]
                  for s in (slice(0, 3), slice(3, 8))]
        torch.testing.assert_close(full, torch.cat(halves))


# ------------------------------------------------------------------------------ KTO


def test_kto_loss_matches_loop_and_reference_point_is_detached_and_clamped():
    g = torch.Generator().manual_seed(3)
    policy = -torch.rand(8, generator=g, dtype=torch.float64) * 10
    ref = -torch.rand(8, generator=g, dtype=torch.float64) * 10
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    mis_p = (ref + 0.3).clone().requires_grad_(True)
    z0 = kto_kl_reference_point(mis_p, ref)
    assert not z0.requires_grad and z0.item() == pytest.approx(0.3)
    assert kto_kl_reference_point(ref - 0.3, ref).item() == 0.0  # max(0, ·)
    beta, ld, lu = 0.5, 1.0, 1.5
    losses, metrics = kto_loss(policy, ref, labels, z0, beta=beta, lambda_d=ld, lambda_u=lu)
    for i in range(8):
        r = policy[i].item() - ref[i].item()
        want = ld * (1 - _sig(beta * (r - 0.3))) if labels[i] else lu * (1 - _sig(beta * (0.3 - r)))
        assert losses[i].item() == pytest.approx(want)
    r = beta * (policy - ref)
    assert metrics["rewards/chosen"].item() == pytest.approx(r[labels].mean().item())
    assert metrics["rewards/rejected"].item() == pytest.approx(r[~labels].mean().item())
    assert metrics["count/chosen"].item() == 4 and metrics["kl_ref_point"].item() == pytest.approx(0.3)
    only_desirable, m = kto_loss(policy, ref, torch.ones(8, dtype=torch.bool), 0.0, beta=beta)
    assert m["rewards/rejected"].item() == 0.0 and m["count/rejected"].item() == 0


# ------------------------------------------------------------------------------ KL estimators


def _categoricals(n=10, seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


def test_k1_and_k3_are_unbiased_for_kl_of_two_categoricals():
    theta, theta_ref = _categoricals()
    logp, logq = torch.log_softmax(theta, 0), torch.log_softmax(theta_ref, 0)
    p = logp.exp()
    exact = (p * (logp - logq)).sum().item()
    for kind in ("k1", "k3"):  # exact expectation under π ...
        assert (p * kl_estimate(logp, logq, kind)).sum().item() == pytest.approx(exact, rel=1e-12)
    k2_mean = (p * kl_estimate(logp, logq, "k2")).sum().item()
    assert abs(k2_mean - exact) > 1e-3  # ... k2 is biased
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(5))
    for kind in ("k1", "k3"):  # ... and Monte-Carlo
        est = kl_estimate(logp[samples], logq[samples], kind)
        stderr = est.std().item() / math.sqrt(len(samples))
        assert abs(est.mean().item() - exact) < 4 * stderr
    everywhere = torch.randn(1000, dtype=torch.float64) * 5
    assert (kl_estimate(everywhere, torch.zeros(1000, dtype=torch.float64), "k3") >= 0).all()
    assert (kl_estimate(everywhere, torch.zeros(1000, dtype=torch.float64), "k2") >= 0).all()
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(logp, logq, "k4")


def test_kl_estimators_as_losses_have_the_documented_expected_gradients():
    """E_{a~π}[∇θ k(a)] with the samples held fixed: k1 → 0, k2 → ∇KL(π‖π_ref), k3 → ∇KL(π_ref‖π)."""
    theta, theta_ref = _categoricals(seed=6)
    logq = torch.log_softmax(theta_ref, 0)

    def expected_grad(kind):
        t = theta.clone().requires_grad_(True)
        logp = torch.log_softmax(t, 0)
        weights = logp.exp().detach()  # sampling distribution, not differentiated
        (grad,) = torch.autograd.grad((weights * kl_estimate(logp, logq, kind)).sum(), t)
        return grad

    def grad_of(fn):
        t = theta.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(torch.log_softmax(t, 0)), t)
        return grad

    forward_kl = grad_of(lambda logp: (logp.exp() * (logp - logq)).sum())
    reverse_kl = grad_of(lambda logp: (logq.exp() * (logq - logp)).sum())
    torch.testing.assert_close(expected_grad("k1"), torch.zeros_like(theta))
    torch.testing.assert_close(expected_grad("k2"), forward_kl)
    torch.testing.assert_close(expected_grad("k3"), reverse_kl)


def test_kl_penalty_loss_is_masked_estimate():
    logps, ref = -torch.rand(2, 5, dtype=torch.float64), -torch.rand(2, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    losses, metrics = kl_penalty_loss(logps, ref, mask, kind="k3")
    r = (ref - logps).exp()
    torch.testing.assert_close(losses, ((r - 1) - (ref - logps)) * mask)
    assert metrics["kl"].item() == pytest.approx(losses[mask].mean().item())


# ------------------------------------------------------------------------------ PPO


def test_ppo_policy_loss_matches_loop_and_metrics():
    g = torch.Generator().manual_seed(7)
    B, T, eps = 3, 6, 0.2
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logps = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0]], dtype=torch.bool)
    losses, metrics = ppo_policy_loss(logps, old, adv, mask, clip_eps=eps)
    clipped_n, kl, n = 0, 0.0, 0
    for b in range(B):
        for t in range(T):
            rho, a = math.exp(logps[b, t] - old[b, t]), adv[b, t].item()
            want = -min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a) if mask[b, t] else 0.0
            assert losses[b, t].item() == pytest.approx(want)
            if mask[b, t]:
                n += 1
                clipped_n += (a > 0 and rho > 1 + eps) or (a < 0 and rho < 1 - eps)
                kl += (rho - 1) - math.log(rho)
    assert metrics["clipfrac"].item() == pytest.approx(clipped_n / n)
    assert metrics["approx_kl"].item() == pytest.approx(kl / n)


def test_ppo_clip_zeroes_gradient_only_in_the_clipped_direction():
    old = torch.zeros(1, 4, dtype=torch.float64)
    # ratios 1.5, 1.5, 0.5, 0.5 with advantages +, −, −, +
    logps = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=torch.float64)
    losses, metrics = ppo_policy_loss(logps, old, adv, torch.ones(1, 4, dtype=torch.bool), clip_eps=0.2)
    (grad,) = torch.autograd.grad(losses.sum(), logps)
    assert grad[0, 0] == 0 and grad[0, 2] == 0  # pushed past the clip: no more gradient
    assert grad[0, 1] != 0 and grad[0, 3] != 0  # outside the range but getting worse: still pulled back
    assert metrics["clipfrac"].item() == 0.5
    # clip-higher: a wider upper bound keeps the gradient of token 0
    wide, _ = ppo_policy_loss(logps, old, adv, torch.ones(1, 4, dtype=torch.bool), clip_eps=0.2, clip_eps_high=0.6)
    (grad,) = torch.autograd.grad(wide.sum(), logps)
    assert grad[0, 0] != 0 and grad[0, 2] == 0


def test_ppo_policy_loss_broadcasts_sequence_advantages():
    logps, old = -torch.rand(2, 3, dtype=torch.float64), -torch.rand(2, 3, dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    adv = torch.tensor([0.5, -2.0], dtype=torch.float64)
    a, _ = ppo_policy_loss(logps, old, adv, mask)
    b, _ = ppo_policy_loss(logps, old, adv[:, None].expand(2, 3), mask)
    torch.testing.assert_close(a, b)


def test_ppo_value_loss_clipping_matches_loop_and_gradients():
    g = torch.Generator().manual_seed(8)
    B, T, eps = 2, 5, 0.2
    old = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    returns = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1] * 5, [1] * 2 + [0] * 3], dtype=torch.bool)
    losses, metrics = ppo_value_loss(values, old, returns, mask, clip_eps_value=eps)
    (grad,) = torch.autograd.grad(losses.sum(), values)
    n_clip, n = 0, 0
    for b in range(B):
        for t in range(T):
            v, vo, ret = values[b, t].item(), old[b, t].item(), returns[b, t].item()
            vc = vo + min(max(v - vo, -eps), eps)
            want = 0.5 * max((v - ret) ** 2, (vc - ret) ** 2) if mask[b, t] else 0.0
            assert losses[b, t].item() == pytest.approx(want)
            if mask[b, t]:
                n += 1
                if (vc - ret) ** 2 > (v - ret) ** 2:
                    n_clip += 1
                    assert grad[b, t] == 0  # clipped branch is constant in V_θ
                else:
                    assert grad[b, t].item() == pytest.approx(v - ret)
            else:
                assert grad[b, t] == 0
    assert 0 < n_clip < n
    assert metrics["vf_clipfrac"].item() == pytest.approx(n_clip / n)
    plain, _ = ppo_value_loss(values, old, returns, mask, clip_eps_value=None)
    torch.testing.assert_close(plain, 0.5 * (values - returns) ** 2 * mask)
    _, perfect = ppo_value_loss(returns, old, returns, mask, clip_eps_value=None)
    assert perfect["explained_variance"].item() == pytest.approx(1.0)
