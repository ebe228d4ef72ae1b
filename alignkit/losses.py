"""Every alignkit loss as a pure tensor function (equations and metric names: docs/losses.md).

A loss returns ``(losses, metrics)``:

* ``losses`` is unreduced: per sequence ``(B,)`` or per token ``(B, T)`` with zeros where the
  mask is 0, so the trainer can sum it and divide by a global count (examples or tokens of the
  whole optimiser step), which keeps the update invariant to gradient accumulation and to the
  number of processes;
* ``metrics`` maps names to detached scalar tensors: means over this batch (over the masked
  tokens for per-token losses).

Variants of one family are small functions in a table chosen by name
(:data:`PREFERENCE_LOSSES`, :data:`KL_ESTIMATORS`), never an if/elif chain. The KL estimators
live in :mod:`alignkit.ops` (the advantage estimators use them too) and are re-exported here.

Notation (per sequence, B examples): ``policy_chosen_logps`` = log π_θ(y_w|x),
``ref_chosen_logps`` = log π_ref(y_w|x), likewise for the rejected y_l, and
h = [log π_θ(y_w|x) − log π_ref(y_w|x)] − [log π_θ(y_l|x) − log π_ref(y_l|x)].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.ops import KL_ESTIMATORS, kl_estimate, kl_k1, kl_k2, kl_k3, masked_mean

__all__ = [
    "nll_loss", "pairwise_rm_loss", "regression_rm_loss", "PREFERENCE_LOSSES", "preference_loss",
    "dpo_sigmoid_loss", "ipo_loss", "cdpo_loss", "robust_dpo_loss", "hinge_loss", "simpo_loss",
    "orpo_loss", "kto_loss", "kto_kl_reference_point", "KL_ESTIMATORS", "kl_estimate", "kl_k1",
    "kl_k2", "kl_k3", "ppo_policy_loss", "ppo_value_loss", "kl_penalty_loss",
]

Metrics = dict[str, Tensor]


def _mean(x: Tensor) -> Tensor:
    """Detached float mean, for metrics."""
    return x.detach().float().mean()


# --------------------------------------------------------------------------------------------
# Supervised fine-tuning and reward models
# --------------------------------------------------------------------------------------------


def nll_loss(logps: Tensor, mask: Tensor) -> tuple[Tensor, Metrics]:
    """Negative log-likelihood of the response tokens (SFT).

        ℓ_t = −log π_θ(y_t | x, y_<t) · m_t

    Args:
        logps: (B, T) per-token log-probs of the labels (:func:`alignkit.ops.token_logps`).
        mask: (B, T) 1 on response tokens.

    Returns:
        losses (B, T), zero where masked; metrics ``nll`` (mean per masked token) and
        ``ppl`` = exp(nll).
    """
    losses = torch.where(mask.bool(), -logps, torch.zeros_like(logps))
    nll = masked_mean(losses.detach().float(), mask)
    return losses, {"nll": nll, "ppl": torch.exp(nll)}


def pairwise_rm_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None, center_coef: float = 0.0
) -> tuple[Tensor, Metrics]:
    """Bradley–Terry reward-model loss with an optional margin and reward centring.

        ℓ = −log σ(r_θ(x, y_w) − r_θ(x, y_l) − m) + c · (r_θ(x, y_w) + r_θ(x, y_l))²

    (InstructGPT, Ouyang et al. 2022, eq. 1; the margin m of Llama 2, Touvron et al. 2023, eq. 2;
    the centring term of Eisenstein et al. 2023, "Helping or Herding?", as TRL's
    ``center_rewards_coefficient``.) The first term only sees reward differences, so nothing
    else fixes where rewards sit; the second pulls E[r] toward 0 with weight c, so the model's own
    output is centred and no offset has to be subtracted when it is read.

    Args:
        chosen_rewards, rejected_rewards: (B,) scalar rewards r_θ of y_w and y_l.
        margin: (B,) or None (= 0): how much better y_w is known to be.
        center_coef: c ≥ 0 (0 = no centring term).

    Returns:
        losses (B,); metrics ``rewards/chosen``, ``rewards/rejected`` (mean rewards),
        ``rewards/margins`` (mean r_w − r_l) and ``rewards/accuracies`` (fraction r_w > r_l,
        ties count as wrong).
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards).pow(2)
    return losses, _reward_metrics(chosen_rewards, rejected_rewards)


def regression_rm_loss(predictions: Tensor, targets: Tensor) -> tuple[Tensor, Metrics]:
    """Squared error of a reward model regressed on scores (ratings).

        ℓ = mean_k (r_θ(x, y)_k − s_k)²

    Args:
        predictions, targets: (B,) or (B, K) for K attributes (averaged per example).

    Returns:
        losses (B,); metrics ``mse`` and ``mae`` (means over all entries).
    """
    err = predictions - targets
    losses = err.pow(2).flatten(1).mean(1) if err.dim() > 1 else err.pow(2)
    return losses, {"mse": _mean(err.pow(2)), "mae": _mean(err.abs())}


def _reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Metrics:
    chosen, rejected = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
    }


# --------------------------------------------------------------------------------------------
# Direct preference optimisation family. Each entry:
#   fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
#      *, beta, **its own options) -> (losses (B,), chosen_rewards (B,), rejected_rewards (B,))
# Rewards are the implicit rewards β·(log π_θ − log π_ref), detached (for metrics only).
# --------------------------------------------------------------------------------------------

PreferenceLoss = Callable[..., tuple[Tensor, Tensor, Tensor]]


def _implicit_rewards(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """(h, log-ratio of y_w, log-ratio of y_l), each (B,)."""
    chosen = policy_chosen_logps - ref_chosen_logps  # log π_θ(y_w|x)/π_ref(y_w|x)
    rejected = policy_rejected_logps - ref_rejected_logps
    return chosen - rejected, chosen, rejected


def dpo_sigmoid_loss(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta
):
    """DPO (Rafailov et al. 2023, eq. 7): ℓ = −log σ(β·h)."""
    h, chosen, rejected = _implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return -F.logsigmoid(beta * h), beta * chosen.detach(), beta * rejected.detach()


def ipo_loss(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta
):
    """IPO (Azar et al. 2023, with their τ = β): ℓ = (h − 1/(2β))².

    The minimum is at h = 1/(2β): log-ratios are regressed to a finite gap instead of pushed
    to infinity. The paper uses summed sequence log-probs; pass means for a length-normalised
    variant.
    """
    h, chosen, rejected = _implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return (h - 1 / (2 * beta)) ** 2, beta * chosen.detach(), beta * rejected.detach()


def cdpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    label_smoothing: float = 0.0,
):
    """Conservative DPO (Mitchell 2023): the DPO loss in expectation over labels flipped with
    probability ε = ``label_smoothing``:

        ℓ = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h),     ∂ℓ/∂h = β·(σ(β·h) − (1 − ε)).

    The optimum is σ(β·h) = 1 − ε (finite h for ε > 0); ε = 0 is DPO.
    """
    h, chosen, rejected = _implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    eps = label_smoothing
    losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def robust_dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta,
    label_smoothing: float = 0.0,
):
    """Robust DPO (rDPO, Chowdhury et al. 2024), ε = ``label_smoothing`` the flip rate:

        ℓ = [(1 − ε)·(−log σ(β·h)) − ε·(−log σ(−β·h))] / (1 − 2ε),     0 ≤ ε < ½.

    Unbiased for the clean-label DPO loss when labels flip with probability ε; ε = 0 is DPO.
    """
    eps = label_smoothing
    if not 0 <= eps < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
    h, chosen, rejected = _implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = ((1 - eps) * -F.logsigmoid(beta * h) - eps * -F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def hinge_loss(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta
):
    """SLiC-HF calibration loss (Zhao et al. 2023) on reference log-ratios:
    ℓ = max(0, 1 − β·h); zero (and no gradient) once β·h ≥ 1, i.e. h ≥ 1/β."""
    h, chosen, rejected = _implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return torch.relu(1 - beta * h), beta * chosen.detach(), beta * rejected.detach()


def simpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    *,
    beta,
    gamma: float = 0.5,
):
    """SimPO (Meng et al. 2024), reference-free; pass length-normalised (mean per
    token) log-probs, ``sequence_logps(..., average=True)``; the reference arguments are
    ignored (may be None):

        ℓ = −log σ(β·(ḡ_w − ḡ_l) − γ),   ḡ = (1/|y|)·log π_θ(y|x),   rewards β·ḡ.

    γ (``gamma``) is the target reward margin, not the discount factor.
    """
    chosen, rejected = policy_chosen_logps, policy_rejected_logps
    losses = -F.logsigmoid(beta * (chosen - rejected) - gamma)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, accurate at both ends (Mächler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps=None,
    ref_rejected_logps=None,
    *,
    beta,
):
    """ORPO odds-ratio term (Hong et al. 2024), reference-free; pass length-normalised
    (mean per token) log-probs ḡ = (1/|y|)·log π_θ(y|x) < 0; the reference arguments are ignored:

        odds(y) = P/(1 − P) with log P = ḡ,   ℓ = −β·log σ(log odds(y_w) − log odds(y_l)),

    β is the paper's λ. The full ORPO objective adds the NLL of y_w with weight 1:
    ``preference_loss("orpo", ..., sft_weight=1.0, chosen_nll=...)``. Rewards are β·ḡ. Mean
    log-probs are clamped to ≤ −1e-6 so that log(1 − P) stays finite.
    """
    chosen = policy_chosen_logps.clamp(max=-1e-6)
    rejected = policy_rejected_logps.clamp(max=-1e-6)
    log_odds = (chosen - _log1mexp(chosen)) - (rejected - _log1mexp(rejected))
    losses = -beta * F.logsigmoid(log_odds)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": dpo_sigmoid_loss,
    "ipo": ipo_loss,
    "cdpo": cdpo_loss,
    "robust": robust_dpo_loss,
    "hinge": hinge_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}
"""Preference losses by name; ``simpo`` and ``orpo`` are reference-free and want mean logps."""


def preference_loss(
    name: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    *,
    beta: float,
    sft_weight: float = 0.0,
    chosen_nll: Tensor | None = None,
    **options,
) -> tuple[Tensor, Metrics]:
    """A loss of :data:`PREFERENCE_LOSSES` plus an optional SFT term on the chosen response:

        ℓ = ℓ_name(h; β, options) + sft_weight · NLL(y_w)

    Args:
        name: key of :data:`PREFERENCE_LOSSES`.
        policy_*_logps, ref_*_logps: (B,) sequence log-probs (refs may be None for the
            reference-free ``simpo`` and ``orpo``).
        beta: β > 0.
        sft_weight: weight of ``chosen_nll`` (RPO / ORPO style regularisation).
        chosen_nll: (B,) NLL of y_w, e.g. −mean token log-prob; required if sft_weight ≠ 0.
        options: keyword options of that loss (``label_smoothing`` for cdpo/robust, ``gamma``
            for simpo); an option the loss does not take raises TypeError.

    Returns:
        losses (B,); metrics ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
        ``rewards/accuracies`` (of the implicit rewards), ``logps/chosen``, ``logps/rejected``
        (mean policy log-probs), and ``nll`` when ``chosen_nll`` is given.
    """
    if name not in PREFERENCE_LOSSES:
        raise ValueError(
            f"unknown preference loss {name!r}; choose one of: {', '.join(PREFERENCE_LOSSES)}"
        )
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if sft_weight != 0 and chosen_nll is None:
        raise ValueError("sft_weight != 0 needs chosen_nll (the NLL of the chosen responses)")
    losses, chosen_rewards, rejected_rewards = PREFERENCE_LOSSES[name](
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
        beta=beta, **options,
    )
    metrics = _reward_metrics(chosen_rewards, rejected_rewards)
    metrics["logps/chosen"] = _mean(policy_chosen_logps)
    metrics["logps/rejected"] = _mean(policy_rejected_logps)
    if chosen_nll is not None:
        metrics["nll"] = _mean(chosen_nll)
        if sft_weight != 0:
            losses = losses + sft_weight * chosen_nll
    return losses, metrics


# --------------------------------------------------------------------------------------------
# KTO
# --------------------------------------------------------------------------------------------


def kto_kl_reference_point(policy_mismatched_logps: Tensor, ref_mismatched_logps: Tensor) -> Tensor:
    """KTO's reference point z₀ (Ethayarajh et al. 2024, §4.1), a detached scalar:

        z₀ = max(0, mean_i [log π_θ(y'_i|x_i) − log π_ref(y'_i|x_i)])

    on mismatched pairs (x_i, y'_i), y' the completion of another prompt of the batch; no
    gradient flows through it. Across processes, average the (B,) differences over all of
    them before the max, if a global estimate is wanted.
    """
    kl = (policy_mismatched_logps - ref_mismatched_logps).detach().float().mean()
    return kl.clamp_min(0.0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl_ref_point: Tensor | float,
    *,
    beta: float,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> tuple[Tensor, Metrics]:
    """KTO (Ethayarajh et al. 2024), with r = log π_θ(y|x) − log π_ref(y|x):

        desirable   (label True):  ℓ = λ_D·(1 − σ(β·(r − z₀)))
        undesirable (label False): ℓ = λ_U·(1 − σ(β·(z₀ − r)))

    Args:
        policy_logps, ref_logps: (B,) sequence log-probs.
        labels: (B,) bool, True for desirable.
        kl_ref_point: z₀ from :func:`kto_kl_reference_point` (scalar, no gradient).

    Returns:
        losses (B,); metrics ``rewards/chosen`` / ``rewards/rejected`` (mean β·r over desirable
        / undesirable examples, 0 if there are none), ``logps/chosen`` / ``logps/rejected``
        (likewise for log π_θ), ``count/chosen`` / ``count/rejected`` (how many of each, to
        weight those means when aggregating), and ``kl_ref_point`` = z₀.
    """
    labels = labels.bool()
    z0 = torch.as_tensor(kl_ref_point, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    r = policy_logps - ref_logps
    desirable = lambda_d * (1 - torch.sigmoid(beta * (r - z0)))
    undesirable = lambda_u * (1 - torch.sigmoid(beta * (z0 - r)))
    losses = torch.where(labels, desirable, undesirable)
    rewards = (beta * r).detach().float()
    logps = policy_logps.detach().float()
    metrics = {
        "rewards/chosen": masked_mean(rewards, labels),
        "rewards/rejected": masked_mean(rewards, ~labels),
        "logps/chosen": masked_mean(logps, labels),
        "logps/rejected": masked_mean(logps, ~labels),
        "count/chosen": labels.sum().float(),
        "count/rejected": (~labels).sum().float(),
        "kl_ref_point": z0.float(),
    }
    return losses, metrics


# --------------------------------------------------------------------------------------------
# PPO
# --------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> tuple[Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), per token:

        ρ_t = π_θ(a_t|s_t) / π_old(a_t|s_t)
        ℓ_t = −min(ρ_t·A_t, clip(ρ_t, 1 − ε, 1 + ε_high)·A_t) · m_t

    ε_high = ``clip_eps_high`` defaults to ε (``clip_eps``); a larger one is DAPO's
    "clip-higher" (Yu et al. 2025).

    Args:
        logps: (B, T) log π_θ, with gradient.
        old_logps: (B, T) log π_old of the same tokens, from the rollout.
        advantages: (B, T), or (B,) per sequence (GRPO/RLOO), broadcast over tokens.
        mask: (B, T) 1 on response tokens.

    Returns:
        losses (B, T), zero where masked; metrics (means over masked tokens):
        ``clipfrac`` fraction of tokens where the clipped term is the minimum (strictly), so
        the token gives no gradient; ``approx_kl`` k3 estimate of KL(π_old‖π_θ) with samples
        from π_old: (ρ − 1) − log ρ; ``ratio`` mean ρ.
    """
    if advantages.dim() == logps.dim() - 1:
        advantages = advantages.unsqueeze(-1)  # (B,) -> (B, 1): one advantage per sequence
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + high) * advantages
    objective = torch.minimum(unclipped, clipped)
    losses = torch.where(mask.bool(), -objective, torch.zeros_like(objective))
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((clipped < unclipped).float(), mask),
            "approx_kl": masked_mean((torch.expm1(log_ratio) - log_ratio).float(), mask),
            "ratio": masked_mean(ratio.float(), mask),
        }
    return losses, metrics


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps_value: float | None = 0.2,
) -> tuple[Tensor, Metrics]:
    """Clipped value loss (PPO2 baselines; Schulman et al. 2017 use the unclipped term), per token:

        V_clip = V_old + clip(V_θ − V_old, −ε_v, ε_v)
        ℓ_t = ½·max((V_θ − R_t)², (V_clip − R_t)²) · m_t

    ``clip_eps_value=None`` gives the plain ½(V_θ − R_t)².

    Args:
        values: (B, T) V_θ(s_t), with gradient.
        old_values: (B, T) V_old(s_t) from the rollout.
        returns: (B, T) targets R_t (e.g. GAE returns).
        mask: (B, T) 1 on response tokens.

    Returns:
        losses (B, T), zero where masked; metrics ``vf_clipfrac`` (fraction of masked tokens
        where the clipped error is the larger, so the token gives no gradient) and
        ``explained_variance`` = 1 − Var[R − V_θ]/Var[R] over masked tokens (NaN if Var[R] = 0).
    """
    unclipped = (values - returns) ** 2
    if clip_eps_value is None:
        clipped = unclipped
    else:
        values_clipped = old_values + torch.clamp(values - old_values, -clip_eps_value, clip_eps_value)
        clipped = (values_clipped - returns) ** 2
    error = 0.5 * torch.maximum(unclipped, clipped)
    losses = torch.where(mask.bool(), error, torch.zeros_like(error))
    with torch.no_grad():
        ret = returns.float()
        var_returns = _masked_population_var(ret, mask)
        var_residual = _masked_population_var(ret - values.float(), mask)
        metrics = {
            "vf_clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "explained_variance": 1 - var_residual / var_returns,
        }
    return losses, metrics


def _masked_population_var(x: Tensor, mask: Tensor) -> Tensor:
    """Biased variance over the mask that never raises (0 for an empty mask), for metrics."""
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)


def kl_penalty_loss(
    logps: Tensor, ref_logps: Tensor, mask: Tensor, kind: str = "k3"
) -> tuple[Tensor, Metrics]:
    """KL to the reference as a loss term (PPO-penalty style; GRPO, Shao et al. 2024, eq. 4
    uses k3), per token: ℓ_t = k(log π_θ(a_t), log π_ref(a_t)) · m_t, weighted by β in the trainer.

    Differentiated with the samples held fixed, the estimators do not all give ∇KL(π‖π_ref)
    (see docs/losses.md): k2 does, k3 gives ∇KL(π_ref‖π), and k1 has zero expected gradient.

    Returns:
        losses (B, T), zero where masked; metric ``kl`` (mean per masked token of that estimator).
    """
    kl = kl_estimate(logps, ref_logps, kind)
    losses = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    return losses, {"kl": masked_mean(kl.detach().float(), mask)}
