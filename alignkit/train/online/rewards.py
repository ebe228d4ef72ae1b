"""The reward of an online run: built from the command line or given in Python, then whitened
and clipped if asked; the penalty for responses that never end."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from alignkit.rollout.rewards import (
    Clipped, RewardModel, RewardSource, SafetyGated, WeightedSum, Whitened, as_reward, check_scores,
)
from alignkit.train.online.collectives import all_reduce_sum

Messages = list[dict]


@dataclass
class RewardConfig:
    """Where scores come from on the command line (a Python caller may pass any RewardSource instead)."""

    reward_models: list[str] = field(default_factory=list)
    """Reward-model directories (outputs of `alignkit rm`); their scores are summed with `weights`."""
    weights: list[float] = field(default_factory=list)
    """One weight per reward model (empty = all 1)."""
    safety_model: str = ""
    """Safety reward model for Llama 2 gating: its score replaces the others' when below `safety_threshold`."""
    safety_threshold: float = 0.15
    """Gate of `safety_model` (Llama 2 eq. 4 uses 0.15)."""
    whiten: bool = False
    """Whiten scores with a mean and std fitted on the first rollout and then kept fixed."""
    clip: float = 0.0
    """Clamp scores to [−clip, clip] after whitening (0 = off)."""
    unfinished_penalty: float = 1.0
    """Subtracted from the score of a response that reaches sampling.max_new_tokens without EOS."""


class _WhitenOnFirstCall(Whitened):
    """Whitened scores with μ, σ fitted on the first batch scored, then fixed."""

    fitted = False

    def __call__(self, prompts, responses):
        raw = self.source(prompts, responses)
        if not self.fitted:
            # Over every process's scores (each scores only its share of the rollout).
            n, total, squares = all_reduce_sum([float(len(raw)), float(raw.sum()), float((raw.double() ** 2).sum())])
            self.mean = total / n
            var = (squares - n * self.mean**2) / max(n - 1.0, 1.0)  # unbiased, as torch.std
            self.std = max(math.sqrt(max(var, 0.0)), 1e-6) if n > 1 else 1.0
            self.fitted = True
        return (raw - self.mean) / self.std


def build_reward(cfg: RewardConfig, reward: RewardSource | None = None, device="cpu", max_length: int = 512,
                 max_prompt_length: int = 384) -> RewardSource:
    """The reward of an online run: the reward models of ``cfg`` (weighted sum, optional Llama 2
    safety gating), each reading conversations cut to ``max_length`` tokens (prompts to
    ``max_prompt_length``) as the command's data section says, and/or ``reward`` given in Python
    (a RewardSource, or a batched callable ``reward(prompts, responses) -> N floats``): alone when
    no reward models are configured, else added to their weighted sum with weight 1 (before the
    safety gate). Then whitening and clipping if configured."""
    given = None if reward is None else as_reward(reward)  # a plain callable: a batched function reward
    reward = given
    if reward is None or cfg.reward_models:
        if not cfg.reward_models:
            raise ValueError("no reward: set reward.reward_models to reward-model directories, or pass a RewardSource "
                             "or a function reward(prompts, responses) -> scores")
        weights = cfg.weights or [1.0] * len(cfg.reward_models)
        if len(weights) != len(cfg.reward_models):
            raise ValueError(f"reward.weights has {len(weights)} entries for {len(cfg.reward_models)} reward models")
        lengths = dict(device=device, max_length=max_length, max_prompt_length=max_prompt_length)
        models = [(RewardModel(p, name=Path(p).name, **lengths), w) for p, w in zip(cfg.reward_models, weights)]
        if given is not None:  # a Python reward beside reward models: summed with weight 1
            models.append((given, 1.0))
            print(f"[alignkit] reward: {' + '.join(f'{w:g}·{m.name}' for m, w in models)} (the Python reward has weight 1; "
                  "pass WeightedSum([...]) for other weights)")
        reward = models[0][0] if len(models) == 1 and models[0][1] == 1.0 else WeightedSum(models)
        if cfg.safety_model:
            reward = SafetyGated(reward, RewardModel(cfg.safety_model, name="safety", **lengths), cfg.safety_threshold)
    if cfg.whiten:
        reward = _WhitenOnFirstCall(reward)
    if cfg.clip > 0:
        reward = Clipped(reward, -cfg.clip, cfg.clip)
    return reward


def score_responses(reward: RewardSource, prompts: list[Messages], texts: list[str], finished: Tensor,
                    unfinished_penalty: float) -> tuple[Tensor, Tensor]:
    """(raw scores (B,), scores (B,) with ``unfinished_penalty`` subtracted where ``finished`` is False)."""
    # Every source's output is checked for one score per response. A non-finite score from a
    # reward model or a per-example function is left to the engine's guard (that update is skipped
    # and counted, docs/rl.md); a batched Python reward refuses it itself (BatchFunctionReward).
    raw = check_scores(reward(prompts, texts), len(texts), getattr(reward, "name", "reward"), texts, finite=False)
    return raw, raw - unfinished_penalty * (~finished.cpu()).float()
