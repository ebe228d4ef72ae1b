"""Advantage estimators and the controllers of the online methods (PPO, GRPO, RLOO, Safe RLHF).

Everything here works on detached rollout tensors (the estimators run under ``no_grad``):
advantages and returns are regression targets, never something to differentiate through.
Shapes: B sequences, T response positions, right padded; ``mask`` (B, T) is 1 on response
tokens, one contiguous block per row (0 on padding, and on the prompt if it is included).
Equations and metric names: docs/losses.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from alignkit.ops import kl_estimate


def _zero_outside(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), x, torch.zeros_like(x))


@torch.no_grad()
def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, gae_lambda: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eqs. 11 and 16).

        δ_t = r_t + γ·V(s_{t+1}) − V(s_t)
        A_t = Σ_{l≥0} (γλ)^l δ_{t+l} = δ_t + γλ·A_{t+1}
        R_t = A_t + V(s_t)   (the λ-return, the value target)

    The episode ends at the last masked token: V and A after it are 0 (terminal), so rows of
    different lengths need no special handling. Computed right to left, vectorised over B.

    Args:
        rewards: (B, T) r_t (e.g. from :func:`kl_penalized_rewards`).
        values: (B, T) V(s_t) from the rollout.
        mask: (B, T) 1 on response tokens.
        gamma: discount γ. gae_lambda: λ.

    Returns:
        advantages (B, T), returns (B, T); both 0 outside the mask.
    """
    mask = mask.bool()
    rewards = _zero_outside(rewards, mask)
    values = _zero_outside(values, mask)  # V(s_{t+1}) = 0 past the end: the episode terminated
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])  # (B,) V(s_{t+1})
    next_advantage = torch.zeros_like(values[:, 0])  # (B,) A_{t+1}
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = torch.where(mask[:, t], delta + gamma * gae_lambda * next_advantage, 0.0)
        next_value, next_advantage = values[:, t], advantages[:, t]
    returns = _zero_outside(advantages + values, mask)
    return advantages, returns


@torch.no_grad()
def kl_penalized_rewards(
    scores: Tensor,
    logps: Tensor,
    ref_logps: Tensor,
    mask: Tensor,
    kl_coef: float,
    kind: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token RLHF reward (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022, eq. 2):

        r_t = −β·KL_t + [t = last response token]·score(x, y)

    with KL_t = ``kl_estimate(logps, ref_logps, kind)`` (default k1 = log π − log π_ref, whose
    sum over the response is the sequence-level log-ratio of the papers).

    Args:
        scores: (B,) reward-model (or reward-function) score per sequence.
        logps, ref_logps: (B, T) log π_old and log π_ref of the sampled tokens.
        mask: (B, T) 1 on response tokens.
        kl_coef: β (e.g. ``AdaptiveKLController.value``).

    Returns:
        rewards (B, T) and kl (B, T), both 0 outside the mask; a row with an empty mask gets
        no score.
    """
    mask = mask.bool()
    kl = _zero_outside(kl_estimate(logps, ref_logps, kind), mask)
    rewards = -kl_coef * kl
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, T)
    last = torch.where(mask, positions, -1).amax(dim=1)  # (B,) last response index, -1 if none
    score = torch.where(last >= 0, scores.to(rewards.dtype), 0.0)
    rewards.scatter_add_(1, last.clamp_min(0).unsqueeze(1), score.unsqueeze(1))  # (B, 1)
    return rewards, kl


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """(B,) -> (B / group_size, group_size): consecutive blocks are the samples of one prompt."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (samples per prompt), got {group_size}")
    if rewards.dim() != 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards must be (B,) with B a multiple of group_size={group_size}, "
            f"got shape {tuple(rewards.shape)}"
        )
    return rewards.view(-1, group_size)


@torch.no_grad()
def grpo_advantages(
    rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024, §4.1.2, outcome supervision):

        A_i = (r_i − mean_g(r)) / (std_g(r) + eps)

    over the ``group_size`` samples of the same prompt (consecutive in the batch); std is the
    unbiased sample standard deviation. ``scale_by_std=False`` keeps only the centring
    (Dr. GRPO, Liu et al. 2025), which avoids up-weighting prompts that are nearly solved or
    nearly hopeless. Returns (B,), one advantage per sequence, given to every token of it.
    """
    grouped = _groups(rewards, group_size)  # (G, k)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)  # (G, k) -> (B,)


@torch.no_grad()
def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024; Kool et al. 2019):

        A_i = r_i − (1/(k−1))·Σ_{j≠i} r_j

    each sample's baseline is the mean of the other k − 1 samples of its prompt, so the
    baseline is independent of the sample and the advantages of a group sum to zero.
    Returns (B,).
    """
    grouped = _groups(rewards, group_size)  # (G, k)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)


# --------------------------------------------------------------------------------------------
# Controllers: small stateful objects with .value, .update(...), .state_dict() for checkpoints.
# --------------------------------------------------------------------------------------------


class _ScalarState:
    """Checkpointing of a controller whose whole state is its current ``value`` (β or λ)."""

    value: float

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


@dataclass
class FixedKLController(_ScalarState):
    """A constant KL coefficient β."""

    kl_coef: float
    value: float = field(init=False)

    def __post_init__(self):
        self.value = float(self.kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


@dataclass
class AdaptiveKLController(_ScalarState):
    """Adaptive KL coefficient (Ziegler et al. 2019, §2.2): steer the measured KL to ``target``.

        e = clip(KL / KL_target − 1, −0.2, 0.2)
        β ← β·(1 + e·n_steps / horizon)

    ``current_kl`` is the sequence-level KL of the last batch (Σ_t of the per-token estimate,
    averaged over sequences); ``n_steps`` how many samples (episodes) it covered.
    """

    init_kl_coef: float
    target: float
    horizon: int
    value: float = field(init=False)

    def __post_init__(self):
        if self.target <= 0 or self.horizon <= 0:
            raise ValueError("AdaptiveKLController needs target > 0 and horizon > 0")
        self.value = float(self.init_kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


@dataclass
class LagrangeMultiplier(_ScalarState):
    """λ ≥ 0 for a cost constraint E[cost] ≤ threshold (Safe RLHF, Dai et al. 2024, §3.3).

    The policy maximises the Lagrangian E[reward] − λ·(E[cost] − threshold); λ does gradient
    ascent on the same expression, i.e. it grows while the constraint is violated:

        λ ← clip(λ + lr·(mean_cost − threshold), 0, max_value)

    (projected ascent: clamped at 0 rather than parametrised as exp(log λ), so λ can return to
    exactly 0 and moves at a rate that does not depend on its size).
    """

    threshold: float = 0.0
    init_value: float = 1.0
    lr: float = 0.05
    max_value: float | None = None
    value: float = field(init=False)

    def __post_init__(self):
        if self.init_value < 0:
            raise ValueError(f"init_value must be >= 0, got {self.init_value}")
        self.value = float(self.init_value)

    def update(self, mean_cost: float | Tensor) -> float:
        value = max(0.0, self.value + self.lr * (float(mean_cost) - self.threshold))
        self.value = value if self.max_value is None else min(value, self.max_value)
        return self.value


def lagrangian_scores(reward: Tensor, cost: Tensor, lam: float | Tensor) -> Tensor:
    """Scalarised Safe-RLHF score (R − λ·C)/(1 + λ), shape of ``reward``; dividing by 1 + λ
    keeps its scale bounded as λ grows (the objective's gradient direction is unchanged)."""
    return (reward - lam * cost) / (1 + lam)
