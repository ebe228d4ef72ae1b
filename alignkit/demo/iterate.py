"""Iterative RLHF rounds on the alignment world: the demo's ``iterative`` method and the
`alignkit iterate` command.

The round bookkeeping (accumulated data, one directory per round, a resumable manifest) is the
library's, :func:`alignkit.train.iterate.run_rounds`; what is world-specific lives here: new
comparisons of the current policy's samples come from the world's simulated labelers, so the
command runs only on policies trained on the world (such as the demo's ``sft`` directory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config import ModelConfig

from .config import FULL, QUICK, DemoConfig, Scale
from .context import Context, Stages
from .evaluate import evaluate
from .labels import collect_comparisons, comparisons
from .methods import rejection_sample
from .pipeline import combined_reward, policy_from_dir, reward_models, sft_policy, train_reward_model


def iterative(ctx: Context) -> None:
    """Iterative rounds (Llama 2's RLHF-V1…): each round labels the current policy's samples, retrains
    the helpfulness and safety reward models on all comparisons so far and runs rejection sampling
    from the current policy. Round 1 uses the SFT comparisons and reward models already trained."""
    from alignkit.train.iterate import run_rounds

    names = ("helpfulness", "safety")
    previous = {n: ctx.reward_models[n] for n in names}

    def collect(policy: Path, r: int) -> dict[str, list[dict]]:
        if r == 1:
            return {n: [json.loads(line) for line in ctx.data[f"{n}/train"].read_text().splitlines()] for n in names}
        records, _, _ = collect_comparisons(ctx, policy, "train", ctx.cfg.seed + 1000 * r, names)
        return records

    def train_rewards(files: dict[str, Path], round_dir: Path, r: int) -> dict[str, Path]:
        if r == 1:
            return {n: ctx.reward_models[n] for n in names}
        # Each round's reward models continue from the previous round's on all comparisons so far
        # (half the epochs of a fresh model: the earlier data is already fitted once).
        dirs = {}
        for n in names:
            dirs[n] = round_dir / f"rm-{n}"
            ctx.rm_report[f"{n}/round{r}"] = train_reward_model(ctx, files[n], ctx.data[f"{n}/heldout"], dirs[n],
                                                                 max(1.0, ctx.scale.rm_epochs / 2), start=previous[n])
            previous[n] = dirs[n]
        return dirs

    def optimise(policy: Path, dirs: dict[str, Path], out: Path, r: int) -> Path:
        done = ctx.out / "rejection_sampling"
        if r == 1 and (done / "config.json").exists():
            return done  # the rejection_sampling method already ran this exact round
        return rejection_sample(ctx, policy, combined_reward(ctx, dirs), out)

    for rec in run_rounds(ctx.out / "iterative", ctx.sft_dir, ctx.scale.rounds, collect, train_rewards, optimise):
        name = f"iterative/round{rec.round}"
        reused = Path(rec.policy_dir).resolve() == (ctx.out / "rejection_sampling").resolve()
        if reused and "rejection_sampling" in ctx.policies:
            # Round 1 is the rejection_sampling method's policy, already sampled with the same seed.
            ctx.policies[name] = dict(ctx.policies["rejection_sampling"])
        else:
            policy_from_dir(ctx, name, Path(rec.policy_dir))

@dataclass
class IterateConfig:
    """`alignkit iterate`: iterative RLHF rounds on the alignment world from a policy trained on it
    (e.g. `demo-out/sft`): label the policy's samples with the simulated labelers, retrain the
    helpfulness and safety reward models on all comparisons so far, rejection-sample; repeat."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to start from (a model trained on the world, such as the demo's `sft` directory)."""
    out: str = "iterate-out"
    """Directory for the rounds (resumable: `rounds.json` lists finished rounds), data and report.json."""
    seed: int = 0
    """Seed of the world (must match the one the policy was trained on) and of the sampling."""
    rounds: int = 2
    """Number of rounds."""
    quick: bool = False
    """Smaller samples and shorter reward-model training."""
    threads: int = 1
    """torch CPU threads (0 = torch's default)."""

def run_iterate(cfg: IterateConfig) -> dict:
    from alignkit.models.loading import load_tokenizer
    from alignkit.world import World

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    scale = QUICK if cfg.quick else FULL
    scale = Scale(**{**scale.__dict__, "rounds": cfg.rounds})
    out = Path(cfg.out)
    ctx = Context(cfg=DemoConfig(out=cfg.out, seed=cfg.seed, quick=cfg.quick), scale=scale, world=World(seed=cfg.seed),
                  out=out, tokenizer=load_tokenizer(cfg.model.path), sft_dir=Path(cfg.model.path))
    stages = Stages(["comparison data", "reward models", "sample the starting policy", "iterative rounds",
                     "gold-judge evaluation"])
    stages.run("comparison data", comparisons, ctx)
    stages.run("reward models", reward_models, ctx, ("helpfulness", "safety"))
    stages.run("sample the starting policy", sft_policy, ctx)
    stages.run("iterative rounds", iterative, ctx)
    policies = stages.run("gold-judge evaluation", evaluate, ctx)["policies"]
    report = {"seed": cfg.seed, "rounds": cfg.rounds, "reward_models": ctx.rm_report, "policies": policies,
              "timings_s": stages.timings}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    for name, p in policies.items():
        print(f"[iterate] {name}: gold reward {p['gold_reward']:.3f}, KL to start {p['kl_to_sft']:.2f}")
    return report
