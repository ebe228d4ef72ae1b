"""Config sections of the online methods (rollouts, the KL penalty) and what a run returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.advantages import AdaptiveKLController, FixedKLController
from alignkit.config import OptimConfig
from alignkit.ops import KL_ESTIMATORS


@dataclass
class RolloutConfig:
    """How many episodes one rollout holds, how many rollouts a run makes, how often each is reused."""

    prompts_per_rollout: int = 16
    """Prompts per rollout; the rollout batch holds prompts_per_rollout × samples_per_prompt episodes."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt (the group size of GRPO and RLOO; 1 for PPO)."""
    num_rollouts: int = 0
    """Rollout → update iterations (0 = derive from optim.epochs passes over the prompts)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch (PPO's K epochs, GRPO's μ); each pass is cut into minibatches of optim.batch_size × optim.grad_accum episodes, one optimizer step each."""


@dataclass
class KLConfig:
    """The KL(π‖π_ref) penalty: its weight β, estimator, where it enters, and how β is controlled."""

    kl_coef: float = 0.05
    """β, the weight of the KL penalty (the starting value under the adaptive controller)."""
    kl_estimator: str = "k1"
    """Per-token estimator: k1 (log π − log π_ref), k2 (½(log r)²) or k3 ((r − 1) − log r), r = π_ref/π; logged as kl_estimator."""
    kl_penalty: str = "reward"
    """Where the KL enters: 'reward' (−β·KL_t in the per-token reward, InstructGPT) or 'loss' (β·KL_t as a loss term: PPO-penalty, GRPO)."""
    kl_control: str = "fixed"
    """'fixed' β, or 'adaptive' (Ziegler et al. 2019): β moves so the sequence KL approaches `target_kl`."""
    target_kl: float = 6.0
    """Target KL per sequence (nats, summed over tokens) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon in episodes of the adaptive controller (larger = β moves more slowly)."""

    def validate(self) -> None:
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl.kl_estimator must be one of {', '.join(KL_ESTIMATORS)}; got {self.kl_estimator!r}")
        if self.kl_penalty not in ("reward", "loss"):
            raise ValueError(f"kl.kl_penalty must be 'reward' or 'loss'; got {self.kl_penalty!r}")
        if self.kl_control not in KL_CONTROLLERS:
            raise ValueError(f"kl.kl_control must be one of {', '.join(KL_CONTROLLERS)}; got {self.kl_control!r}")
        if self.kl_penalty == "loss" and self.kl_estimator == "k1" and self.kl_coef > 0:
            raise ValueError("kl.kl_estimator=k1 as a loss term has zero expected gradient (docs/losses.md); "
                             "use k3 (GRPO) or k2 with kl.kl_penalty=loss")


#: β controllers by name: (KLConfig) -> object with .value and .update(sequence_kl, n_episodes).
KL_CONTROLLERS: dict[str, Callable[[KLConfig], object]] = {
    "fixed": lambda kl: FixedKLController(kl.kl_coef),
    "adaptive": lambda kl: AdaptiveKLController(kl.kl_coef, kl.target_kl, kl.kl_horizon),
}


def validate_online(optim: OptimConfig, rollout: RolloutConfig) -> None:
    if optim.max_steps > 0:
        raise ValueError("online methods count rollouts, not optimizer steps: set rollout.num_rollouts "
                         "instead of optim.max_steps")
    if rollout.prompts_per_rollout < 1 or rollout.samples_per_prompt < 1 or rollout.ppo_epochs < 1:
        raise ValueError("rollout.prompts_per_rollout, samples_per_prompt and ppo_epochs must be >= 1")


@dataclass
class OnlineResult:
    """What an online run returns: the saved policy (a plain HF directory) and its metrics."""

    output_dir: Path
    history: list[dict] = field(default_factory=list)
    wall_s: float = 0.0


#: Options of the shared sections that the online commands never read (see
#: :func:`alignkit.config.unread_options`): refused when given, left out of ``--help``.
ONLINE_UNREAD = {
    "data.eval_fraction": "the online methods evaluate on a separate prompt file only (data.eval_path)",
    "data.eval_size": "the online methods evaluate on a separate prompt file only (data.eval_path)",
    "data.eval_split": "the online methods evaluate on a separate prompt file only (data.eval_path)",
    "run.padding_free": "sampled responses are batched padded; packing applies to sft and rm",
}

