"""Critic-free policy optimisation from a reward: GRPO and RLOO, one file, one loop.

Each rollout samples a *group* of G responses per prompt and scores each one. With no critic,
the baseline of a response comes from its group, by an estimator chosen by name from
:data:`ADVANTAGES`:

- ``grpo`` (Shao et al. 2024, DeepSeekMath §4.1.2): Â_i = (r_i − mean_g r) / (std_g r + eps);
  ``scale_rewards=false`` keeps only the centring (Dr. GRPO, Liu et al. 2025);
- ``rloo`` (Ahmadian et al. 2024, "Back to Basics"): Â_i = r_i − mean of the *other* G − 1 rewards.

Every token of response i gets Â_i. The policy minimises the PPO clipped surrogate
    L = −min(ρ_t·Â_i, clip(ρ_t, 1 − ε, 1 + ε_high)·Â_i) [+ β·KL_t]
reduced per token or per sequence (:data:`~alignkit.train.online.LOSS_REDUCTIONS`). With one
pass and one minibatch per rollout (RLOO's default) ρ = 1 and this is exactly REINFORCE with the
leave-one-out baseline. The KL to the reference enters either as a loss term (GRPO: k3, β = 0.04)
or in the reward, r_i − β·Σ_t KL_t (RLOO), per ``kl.kl_penalty``. Metrics: docs/rl.md.
"""

from __future__ import annotations

from alignkit.context import entry

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from alignkit.advantages import grpo_advantages, rloo_advantages
from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from alignkit.data.tokenize import stop_token_ids
from alignkit.losses import kl_penalty_loss, ppo_policy_loss
from alignkit.models.loading import Reference, load_causal_lm, save_model
from alignkit.models.masks import batching_refusal
from alignkit.ops import kl_estimate, masked_mean
from alignkit.rollout.batch import build_rollout_batch
from alignkit.rollout.generate import SamplingConfig, make_generator
from alignkit.rollout.rewards import RewardSource
from alignkit.train.online import (
    KL_CONTROLLERS, LOSS_REDUCTIONS, KLConfig, OnlineLoop, OnlineResult, RewardConfig, RolloutConfig, online_inputs,
    policy_forward, rollout_logps, score_responses, sequence_kl, validate_online,
)
from alignkit.train.common import choose_logps_path
from alignkit.train.online.config import ONLINE_UNREAD
from alignkit.train.online.evaluate import held_out_reward


@dataclass
class GRPOConfig:
    """`alignkit grpo`: group-relative policy optimisation (critic-free) from a reward."""

    UNREAD = ONLINE_UNREAD  # not a field: options of the shared sections this command never reads

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to start from; with model.lora the reference is its adapter-disabled base."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts: any data file with a prompt (only the prompts are used)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, schedule="constant", warmup_ratio=0.0))
    """Optimiser; batch_size × grad_accum episodes make one minibatch (one optimizer step)."""
    run: RunConfig = field(default_factory=RunConfig)
    """Output, checkpoints (save_every counts rollouts), logging."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How responses are sampled."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward models and their combination (command line), penalty for unfinished responses."""
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(samples_per_prompt=4, ppo_epochs=1))
    """Rollout size (samples_per_prompt is the group size G ≥ 2), number of rollouts, passes per rollout (μ)."""
    kl: KLConfig = field(default_factory=lambda: KLConfig(kl_coef=0.04, kl_estimator="k3", kl_penalty="loss"))
    """KL penalty to the reference (GRPO: k3 as a loss term, β = 0.04; β = 0 skips the reference)."""
    advantage: str = "grpo"
    """Baseline estimator: 'grpo' (group mean, divided by the group std) or 'rloo' (mean of the other samples)."""
    scale_rewards: bool = True
    """grpo: divide by the group's std (false = Dr. GRPO, centring only)."""
    loss_reduction: str = "sequence"
    """'sequence' (token mean per response, then mean over responses: GRPO) or 'token' (mean over all tokens: DAPO, Dr. GRPO)."""
    clip_eps: float = 0.2
    """ε of the clipped surrogate (lower bound 1 − ε)."""
    clip_eps_high: float = 0.0
    """Upper clip 1 + ε_high (DAPO's clip-higher); 0 = same as clip_eps."""
    batching: str = "auto"
    """Forward passes over a rollout: prefix_shared (a group's prompt computed once, its samples in one row), padded (one row per sample), auto (prefix_shared where the model is served exactly with it, else padded)."""

    def validate(self) -> None:
        validate_online(self.optim, self.rollout)
        self.kl.validate()
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"advantage must be one of {', '.join(ADVANTAGES)}; got {self.advantage!r}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {', '.join(LOSS_REDUCTIONS)}; got {self.loss_reduction!r}")
        if self.rollout.samples_per_prompt < 2:
            raise ValueError("rollout.samples_per_prompt is the group size and must be >= 2 for a group baseline")
        if self.batching not in ("auto", "padded", "prefix_shared"):
            raise ValueError(f"batching must be auto, padded or prefix_shared; got {self.batching!r}")


@dataclass
class RLOOConfig(GRPOConfig):
    """`alignkit rloo`: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024), critic-free."""

    kl: KLConfig = field(default_factory=lambda: KLConfig(kl_coef=0.05, kl_estimator="k1", kl_penalty="reward"))
    """KL penalty to the reference (RLOO: in the sequence reward, r − β·Σ_t KL_t)."""
    advantage: str = "rloo"
    """Baseline estimator: 'rloo' (mean of the other samples) or 'grpo' (group mean / std)."""
    loss_reduction: str = "token"
    """'token' (mean over all response tokens) or 'sequence' (token mean per response, then mean)."""


#: advantage name -> (scores (B,), group size G, config) -> Â (B,), one per sequence
ADVANTAGES: dict[str, Callable[[Tensor, int, GRPOConfig], Tensor]] = {
    "grpo": lambda scores, g, cfg: grpo_advantages(scores, g, scale_by_std=cfg.scale_rewards),
    "rloo": lambda scores, g, cfg: rloo_advantages(scores, g),
}


def share_group_prompts(cfg: GRPOConfig, policy, reference=None) -> bool:
    """Whether forward passes lay a group out as one row ``x ‖ y_1 ‖ … ‖ y_G`` (``cfg.batching``):
    both the policy and the reference model (a different model where the Python API gave one)
    must be served exactly with it; a forced ``prefix_shared`` that one cannot run is refused,
    naming the model and what works."""
    if cfg.batching == "padded":
        return False
    for role, model in (("policy", policy), ("reference model", reference)):
        reason = None if model is None else batching_refusal("prefix_shared", model)
        if reason is not None:
            if cfg.batching == "prefix_shared":
                raise ValueError(f"the {role}: " + reason.replace("batching=prefix_shared", "grpo batching=prefix_shared"))
            return False
    return True


def grpo_loss(model, mb, cfg: GRPOConfig, loss_kl_coef: float, share_prompts: bool = False):
    """Per-token clipped surrogate with the sequence advantage [+ β·KL_t]."""
    mask = mb.response_mask
    logps, entropy, _ = policy_forward(model, mb, cfg.sampling.temperature, entropy=True, share_prompts=share_prompts)
    old_logps = mb.logps if mb.logps is not None else logps.detach()  # on-policy: ρ = 1
    pg, metrics = ppo_policy_loss(logps, old_logps, mb.advantages, mask, cfg.clip_eps, cfg.clip_eps_high or None)
    metrics["loss/policy"] = masked_mean(pg.detach(), mask)
    losses = pg
    if loss_kl_coef > 0:
        kl, kl_metrics = kl_penalty_loss(logps, mb.ref_logps, mask, cfg.kl.kl_estimator)
        losses = losses + loss_kl_coef * kl
        metrics["loss/kl"] = kl_metrics["kl"]
    metrics["entropy"] = masked_mean(entropy.detach(), mask)
    return losses, metrics


@entry("grpo")
def run_grpo(cfg: GRPOConfig, prompts: list[list[dict]] | None = None,
             reward: RewardSource | None = None) -> OnlineResult:
    """Train ``cfg.model.path`` with GRPO or RLOO (``cfg.advantage``); save the policy to ``cfg.run.output_dir``.

    ``prompts`` and ``reward`` may be passed in Python; otherwise they come from ``cfg.data.path``
    and ``cfg.reward``.
    """
    tokenizer, prompts, reward = online_inputs(cfg, prompts, reward)
    policy = load_causal_lm(cfg.model)
    choose_logps_path(policy, cfg.run.logps_path)  # before the reference copy is made: it keeps the choice
    use_ref = cfg.kl.kl_coef > 0
    reference = Reference(policy) if use_ref else None
    share = share_group_prompts(cfg, policy, reference.separate_model if reference is not None else None)
    split = (f"; optim.batch_size={cfg.optim.batch_size} is not a multiple of the group size "
             f"{cfg.rollout.samples_per_prompt}, so some groups span two forwards and share their prompt less"
             if share and cfg.optim.batch_size % cfg.rollout.samples_per_prompt else "")
    print(f"[alignkit] batching={'prefix_shared (each group prompt computed once per forward)' if share else 'padded'}{split}")
    name = "rloo" if isinstance(cfg, RLOOConfig) else "grpo"
    loop = OnlineLoop(policy, cfg.optim, cfg.run, cfg.rollout, len(prompts), name, config=cfg, prompts=prompts,
                      evaluate=held_out_reward(cfg, tokenizer, reward))
    if reference is not None:
        reference.to(loop.device)
    generator = make_generator(loop.unwrapped(), tokenizer, cfg.sampling, cfg.data.max_prompt_length)
    kl_ctl = KL_CONTROLLERS[cfg.kl.kl_control](cfg.kl)
    in_reward = cfg.kl.kl_penalty == "reward"
    G, temperature, fwd_bs = cfg.rollout.samples_per_prompt, cfg.sampling.temperature, cfg.optim.batch_size
    # Old log-probs are needed only if the policy changes before an episode's last use.
    off_policy = loop.steps_per_rollout > 1
    loop.register_state({"kl_controller": kl_ctl})

    for k in loop.rollouts():
        with loop.gathered():  # FSDP: the full policy for sampling and scoring, sharded again before the update
            with loop.timed("generation"):
                rollout_prompts = [prompts[i] for i in loop.prompts_for(k)]
                gens = generator.generate(rollout_prompts, n=G, seed=loop.sampling_seed(k))  # groups are consecutive rows
                batch = build_rollout_batch(gens, tokenizer.pad_token_id, stop_token_ids(tokenizer)).to(loop.device)
            with loop.timed("scoring"):
                sample_prompts = [rollout_prompts[i] for i in gens.prompt_index]
                raw, scores = score_responses(reward, sample_prompts, gens.texts, batch.finished, cfg.reward.unfinished_penalty)
                if off_policy or use_ref:
                    batch.logps, _ = rollout_logps(loop.model, batch, temperature, fwd_bs, share_prompts=share)
                kl = torch.zeros_like(batch.response_mask)
                if use_ref:
                    with reference.active() as ref:
                        batch.ref_logps, _ = rollout_logps(ref, batch, temperature, fwd_bs, share_prompts=share)
                    kl = kl_estimate(batch.logps, batch.ref_logps, cfg.kl.kl_estimator) * batch.response_mask
                if not off_policy:
                    batch.logps = None  # the loss uses the current log-probs, detached, as π_old
        beta = kl_ctl.value
        seq_kl = sequence_kl(kl, batch.response_mask)  # (B,) Σ_t KL_t
        batch.scores = scores.to(loop.device) - (beta * seq_kl if in_reward else 0.0)
        batch.advantages = ADVANTAGES[cfg.advantage](batch.scores, G, cfg)  # (B,)
        with loop.timed("update"):
            loss_fn = lambda m, mb: grpo_loss(m, mb, cfg, 0.0 if in_reward else beta, share)  # noqa: E731
            # Minibatches take whole groups (whatever the batching, so that the batching changes the
            # speed and never the updates): a group's rows then share one forward where they share a row.
            stats = loop.update(batch, loss_fn, cfg.loss_reduction, k, group_size=G)
        kl_ctl.update(float(seq_kl.mean()), len(batch))
        row = {
            "reward": float(raw.mean()), "score": float(batch.scores.mean()),
            "reward/group_std": float(raw.view(-1, G).std(dim=1).mean()),
            "kl": float(seq_kl.mean()), "kl_estimator": cfg.kl.kl_estimator, "kl_coef": beta,
            "response_length": float(batch.response_lengths.float().mean()),
            "unfinished": float((~batch.finished).float().mean()),
            **stats,
        }
        loop.log(k, row, tokens=int(batch.attention_mask.sum()))
        loop.maybe_save(k)

    wall = loop.close()
    loop.save_final(lambda out: save_model(loop.unwrapped(), tokenizer, out))
    return OnlineResult(output_dir=Path(cfg.run.output_dir), history=loop.history, wall_s=wall)


@entry("rloo")
def run_rloo(cfg: RLOOConfig, prompts: list[list[dict]] | None = None,
             reward: RewardSource | None = None) -> OnlineResult:
    """RLOO: :func:`run_grpo` with the leave-one-out baseline (``cfg.advantage='rloo'``)."""
    return run_grpo(cfg, prompts, reward)
