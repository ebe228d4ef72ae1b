"""The alignment methods the demo runs, each from the same SFT policy: best-of-N, DPO, IPO, KTO,
rejection sampling, PPO, PPO-ptx, the Safe-RLHF pair, GRPO and RLOO. Each stage adds its policy
(sampled on the held-out prompts) to ``ctx.policies``."""

from __future__ import annotations

import json
from pathlib import Path

from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from alignkit.rollout.rewards import RewardSource

from .context import Context, messages, run_config, sft_samples
from .pipeline import combined_reward, policy_from_dir, prompt_messages


class GoldTracked(RewardSource):
    """A reward that passes ``source``'s scores through unchanged and records, per call (one call
    per rollout), the mean gold reward and the mean training reward of the responses it scored.
    The RL curves then show what the stage raised: the reward it was trained on, and the gold
    reward that reward stands for. The gold judge only reads the responses; training never sees it."""

    def __init__(self, source, world):
        self.source, self.world, self.rows = source, world, []
        self.name = getattr(source, "name", "reward")

    def __call__(self, prompts, responses):
        scores = self.source(prompts, responses)
        gold = [self.world.reward(p, r) for p, r in zip(prompts, responses)]
        self.rows.append({"step": len(self.rows) + 1, "gold_reward": sum(gold) / max(len(gold), 1),
                          "reward": float(scores.float().mean()) if len(scores) else None})
        return scores

    def write(self, path: Path) -> Path:
        """The recorded rows as JSONL (``step`` is the rollout); returns the path."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in self.rows), encoding="utf-8")
        return path


def best_of_n(ctx: Context) -> None:
    """Best-of-N sampling (no training): N SFT samples per held-out prompt, keep the best under a
    reward. Its KL to the SFT policy is log N − (N−1)/N (analytic)."""
    from alignkit.eval.metrics import best_of_n_kl
    from alignkit.rollout.rewards import RewardModel

    s, w = ctx.scale, ctx.world
    prompts = w.prompts(split="heldout")
    n, draws = s.best_of_n, s.bon_draws
    # draws × n samples per prompt: each consecutive block of n is one best-of-n draw.
    gens = sft_samples(ctx, n * draws)
    msgs = [messages(prompts[i].text) for i in gens.prompt_index]
    rewards = {
        "best_of_n/helpfulness": RewardModel(str(ctx.reward_models["helpfulness"])),
        "best_of_n/combined": combined_reward(ctx),
        "best_of_n/confident_labelers": RewardModel(str(ctx.reward_models["helpfulness_confident"])),
    }
    blocks = len(prompts) * draws
    for name, reward in rewards.items():
        scores = reward(msgs, gens.texts).view(blocks, n)  # (P·draws, N)
        best = scores.argmax(dim=1)
        texts = [gens.texts[k * n + int(b)] for k, b in enumerate(best)]
        chosen_prompts = [prompts[k // draws] for k in range(blocks)]
        ctx.policies[name] = {"prompts": chosen_prompts, "texts": texts, "kl": best_of_n_kl(n),
                              "kl_kind": f"analytic log N − (N−1)/N, N={n}"}

def _dpo(ctx: Context, name: str, loss_type: str, beta: float, length_normalize: bool = False) -> None:
    from alignkit.train.dpo import DPOConfig, run_dpo

    cfg = DPOConfig(
        model=ModelConfig(path=str(ctx.sft_dir)),
        data=DataConfig(path=str(ctx.data["combined/train"]), max_length=96, max_prompt_length=48),
        optim=OptimConfig(lr=3e-4, batch_size=32, epochs=ctx.scale.dpo_epochs, warmup_ratio=0.05),
        run=run_config(ctx.out, name, ctx.cfg.seed), beta=beta, loss_type=loss_type, reference="precomputed",
        length_normalize=length_normalize,
    )
    run_dpo(cfg)
    ctx.curves[name] = Path(cfg.run.output_dir) / "metrics.jsonl"
    policy_from_dir(ctx, name, Path(cfg.run.output_dir))

def dpo(ctx: Context) -> None:
    """DPO (Rafailov et al. 2023) on the combined comparisons (safety labels on adversarial prompts,
    helpfulness labels elsewhere: the data analogue of the gated reward)."""
    _dpo(ctx, "dpo", "sigmoid", beta=0.1)

def ipo(ctx: Context) -> None:
    """IPO (Azar et al. 2023) on the same comparisons."""
    # IPO's squared loss on summed log-probs gave gradient norms in the thousands here; on per-token
    # means (length normalisation) it trains stably.
    _dpo(ctx, "ipo", "ipo", beta=0.5, length_normalize=True)

def kto(ctx: Context) -> None:
    """KTO (Ethayarajh et al. 2024) on the labelers' desirable/undesirable labels (gated as the combined data)."""
    from alignkit.train.kto import KTOConfig, run_kto

    rows = [json.loads(line) for line in ctx.data["unpaired/train"].read_text().splitlines()]
    n_d = sum(r["label"] for r in rows)
    # The KTO paper advises λ_D·n_D / (λ_U·n_U) in [1, 4/3]: weight the rarer label up to balance.
    desirable_weight = max(1.0, (len(rows) - n_d) / max(n_d, 1))
    cfg = KTOConfig(
        model=ModelConfig(path=str(ctx.sft_dir)),
        data=DataConfig(path=str(ctx.data["unpaired/train"]), max_length=96, max_prompt_length=48),
        optim=OptimConfig(lr=3e-4, batch_size=32, epochs=ctx.scale.dpo_epochs, warmup_ratio=0.05),
        run=run_config(ctx.out, "kto", ctx.cfg.seed), beta=0.1, reference="precomputed", desirable_weight=desirable_weight,
    )
    run_kto(cfg)
    ctx.curves["kto"] = Path(cfg.run.output_dir) / "metrics.jsonl"
    policy_from_dir(ctx, "kto", Path(cfg.run.output_dir))

#: Learning rate and KL coefficient of the online methods (PPO, GRPO, RLOO).
RL_LR = 3e-4

RL_KL_COEF = 0.05

def online_common(ctx: Context, name: str):
    from alignkit.rollout.generate import SamplingConfig
    from alignkit.train.online import RewardConfig

    s = ctx.scale
    return dict(
        model=ModelConfig(path=str(ctx.sft_dir)),
        run=run_config(ctx.out, name, ctx.cfg.seed),
        sampling=SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=1.0),
        # Whitened with the first rollout's statistics: the gated reward's scale differs from one
        # reward model to the other, and PPO's step size assumes unit-scale rewards.
        reward=RewardConfig(unfinished_penalty=0.5, whiten=True),
    )

def _ppo(ctx: Context, name: str, ptx: bool = False, reward=None, cost=None, cost_threshold: float = 0.0,
         rollouts: int | None = None) -> None:
    from alignkit.train.online import KLConfig, RolloutConfig
    from alignkit.train.ppo import PPOConfig, run_ppo

    s = ctx.scale
    cfg = PPOConfig(**online_common(ctx, name),
                    optim=OptimConfig(lr=RL_LR, batch_size=16, schedule="constant", warmup_ratio=0.0),
                    rollout=RolloutConfig(prompts_per_rollout=32, samples_per_prompt=1, num_rollouts=rollouts or s.rl_rollouts,
                                          ppo_epochs=2),
                    kl=KLConfig(kl_coef=RL_KL_COEF, kl_estimator="k1"), value_model="shared", vf_coef=0.1,
                    ptx_coef=0.5 if ptx else 0.0, cost_threshold=cost_threshold, lagrange_lr=0.5)
    ptx_texts = ctx.world.pretraining_corpus()[:512] if ptx else None
    tracked = GoldTracked(reward or combined_reward(ctx), ctx.world)
    result = run_ppo(cfg, prompts=prompt_messages(ctx), reward=tracked, cost=cost, ptx_texts=ptx_texts)
    ctx.curves[name] = tracked.write(Path(cfg.run.output_dir) / "gold_curve.jsonl")
    policy_from_dir(ctx, name, Path(result.output_dir))
    if cost is not None:
        rows = [json.loads(line) for line in (Path(cfg.run.output_dir) / "metrics.jsonl").read_text().splitlines()]
        costs = [r["cost"] for r in rows if "cost" in r]
        ctx.policies[name]["cost_threshold"] = cost_threshold
        # Rollout means are noisy (32 prompts): report the first one and the mean of the last three.
        ctx.policies[name]["initial_cost"] = costs[0] if costs else None
        ctx.policies[name]["final_cost"] = sum(costs[-3:]) / len(costs[-3:]) if costs else None

#: d in E[cost] ≤ d for the Safe-RLHF run; cost = −(centred safety reward), so d = 0.5 asks for a
#: mean safety score of at least −0.5 (the SFT policy starts near +1 cost on train prompts).
SAFETY_COST_THRESHOLD = 0.5

def ppo_safety_constrained(ctx: Context) -> None:
    """Safe RLHF (Dai et al. 2024): PPO maximising the helpfulness reward alone, subject to
    E[cost] ≤ d with cost = −(safety reward), the Lagrange multiplier learnt; beside it the same
    PPO without the constraint."""
    from alignkit.rollout.rewards import RewardModel, WeightedSum

    helpful = RewardModel(str(ctx.reward_models["helpfulness"]))
    n = ctx.scale.constrained_rollouts
    _ppo(ctx, "ppo_helpfulness_only", reward=helpful, rollouts=n)
    cost = WeightedSum([(RewardModel(str(ctx.reward_models["safety"])), -1.0)], name="cost=-safety")
    _ppo(ctx, "ppo_cost_constrained", reward=helpful, cost=cost, cost_threshold=SAFETY_COST_THRESHOLD, rollouts=n)

def ppo(ctx: Context) -> None:
    """PPO (InstructGPT) against the safety-gated combined reward model, KL penalty in the reward."""
    _ppo(ctx, "ppo", ptx=False)

def ppo_ptx(ctx: Context) -> None:
    """PPO-ptx: the same with pretraining-corpus NLL mixed in (against the alignment tax)."""
    _ppo(ctx, "ppo_ptx", ptx=True)

def critic_free_rollout(ctx: Context):
    """The rollout section of the demo's GRPO and RLOO: 16 prompts × a group of 4, one pass."""
    from alignkit.train.online import RolloutConfig

    return RolloutConfig(prompts_per_rollout=16, samples_per_prompt=4, num_rollouts=ctx.scale.rl_rollouts, ppo_epochs=1)

def _critic_free(ctx: Context, name: str, advantage: str, **overrides) -> None:
    """GRPO or RLOO from the SFT policy; ``overrides`` replace fields of its :class:`GRPOConfig`
    (benchmarks/grpo_variants.py measures variants with them)."""
    from dataclasses import replace

    from alignkit.train.grpo import GRPOConfig, run_grpo

    cfg = GRPOConfig(**online_common(ctx, name),
                     optim=OptimConfig(lr=RL_LR, batch_size=16, schedule="constant", warmup_ratio=0.0),
                     rollout=critic_free_rollout(ctx), advantage=advantage)
    cfg = replace(cfg, **overrides)
    tracked = GoldTracked(combined_reward(ctx), ctx.world)
    result = run_grpo(cfg, prompts=prompt_messages(ctx), reward=tracked)
    ctx.curves[name] = tracked.write(Path(cfg.run.output_dir) / "gold_curve.jsonl")
    policy_from_dir(ctx, name, Path(result.output_dir))

def grpo(ctx: Context) -> None:
    """GRPO (Shao et al. 2024): group-relative advantages, no critic."""
    _critic_free(ctx, "grpo", "grpo")

def rloo(ctx: Context) -> None:
    """RLOO (Ahmadian et al. 2024): leave-one-out baseline, no critic."""
    _critic_free(ctx, "rloo", "rloo")

def rejection_sample(ctx: Context, policy_dir: Path, reward, out: Path) -> Path:
    from alignkit.train.rejection_sampling import RSConfig, run_rs

    common = online_common(ctx, "rejection_sampling")
    common["model"] = ModelConfig(path=str(policy_dir))
    common["run"] = RunConfig(output_dir=str(out), seed=ctx.cfg.seed, report_to="jsonl", overwrite=True)
    cfg = RSConfig(**common, optim=OptimConfig(lr=1e-3, batch_size=16, epochs=2, warmup_ratio=0.05),
                   num_samples=ctx.scale.best_of_n, prompts_per_round=ctx.scale.rs_prompts)
    return Path(run_rs(cfg, prompts=prompt_messages(ctx), reward=reward).output_dir)

def rejection_sampling(ctx: Context) -> None:
    """Rejection sampling (Llama 2): best of N SFT samples under the combined reward, fine-tuned on."""
    out = rejection_sample(ctx, ctx.sft_dir, combined_reward(ctx), ctx.out / "rejection_sampling")
    ctx.curves["rejection_sampling"] = out / "metrics.jsonl"
    policy_from_dir(ctx, "rejection_sampling", out)
