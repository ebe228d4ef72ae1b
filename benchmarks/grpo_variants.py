"""Rerun only the demo's GRPO stage, with config variants, from an existing demo run's artifacts.

The demo's GRPO raised false refusals above SFT's (issue 13). This script rebuilds the demo's
context from a finished run (its SFT model, reward models and tokenizer, and the world of the
same seed), trains GRPO again with each variant's config overrides, and scores every variant with
the demo's own evaluation (bootstrap intervals over prompts, paired differences to SFT).

    PYTHONPATH=. python benchmarks/grpo_variants.py --run demo-out/seed-0 \\
        --variants demo,dr_grpo_std,token,dr_grpo --train-seeds 0,1,2 --out grpo-variants/seed-0

The run's seed and scale come from its report.json.

Every online run seeds itself from the run seed (``OnlineLoop``), and evaluation samples from a
fixed seed, so variant ``demo`` reproduces the source run's GRPO figures exactly on the same
machine and alignkit version: the check that the context was rebuilt faithfully (tests/test_grpo_variants.py).

Measured before commit 8b721a5 (which ranks a false refusal below junk and balances the RL prompt
set; quick scale, 3 GRPO training seeds per variant; Δ false refusals vs SFT in points, mean over
training seeds, with how many of the 3 kept false refusals not above SFT's):

    variant                              world seed 0     world seed 1
    demo (GRPO: std, sequence mean)      +8.6  (1/3)      +30.7 (0/3)
    dr_grpo_std (no std division)        -4.1  (2/3)      +11.9 (1/3)
    token (token mean)                   +10.0 (0/3)      +23.1 (1/3)
    dr_grpo (both; Liu et al. 2025)      -0.5  (2/3)      +21.4 (0/3)
    rloo (the demo's RLOO)                 -              +19.0 (1/3)
    kl_in_reward / kl_high / group8        -              +34.6 / +26.9 / +34.0 (0/3 each)
    group8_dr                              -              +16.9 (1/3)

Every variant cut violations and raised the gold reward beyond their intervals on every world seed 1
run. The training seed alone moves one variant's false refusals by 20-50 points (seed 0 demo GRPO:
47, 75, 75%; the prefix-shared batching's rounding alone took 66% to 47%), far more than a run's
evaluation interval. Hence no GRPO setting fixes issue 13. The cause lies in the world and its reward. On held-out
borderline prompts neither SFT nor any trained policy gives a single correct answer. SFT's
non-refusals there are off-topic, gibberish or wrong (seed 1: 26%, 16%, 14%). The helpfulness
reward scores those like a refusal (SFT samples on train prompts, seed 1: refusal -1.45, gibberish
-1.32, off-topic -1.23), and the gold judge scores them like one too (-0.75; gibberish -1.0). So
GRPO's extra refusals replace junk (seed 1: 43% -> 88% refusals, off-topic + gibberish 42% -> 9%),
pulled by the refusal it learns on harmful prompts. The gold reward on borderline prompts does not
move (seed 1: -0.752 for SFT and for GRPO).

At commit 8b721a5 (before the 45 borderline requests of 6deb0f9; full scale, world seed 1, where SFT
refuses least: 29%; training seeds 1, 2, 3; `--variants demo,rloo --train-seeds 1,2,3`): GRPO +14, +22, +7 points of false refusals against SFT
(each beyond its interval), RLOO +41, +5 [-2, +12], -3 [-9, +2]; all six cut violations by 13-20
points. Drawing each kind's share of the RL prompts equally (borderline prompts repeated to 100)
gave GRPO -10, +22, +19 and RLOO -13, +23, +3: no systematic change, the training seed still
dominating.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

#: variant -> GRPOConfig overrides; "a.b" names a field of a nested section.
VARIANTS: dict[str, dict] = {
    "demo": {},  # the demo's GRPO as it is (GRPOConfig defaults)
    "padded": {"batching": "padded"},  # as before commit f26786f (prefix-shared batching rounds differently)
    "dr_grpo_std": {"scale_rewards": False},  # no division by the group's std
    "token": {"loss_reduction": "token"},  # no per-response 1/|y|
    "dr_grpo": {"scale_rewards": False, "loss_reduction": "token"},  # both (Liu et al. 2025)
    "rloo": {"advantage": "rloo"},  # the demo's RLOO stage (same config, leave-one-out baseline)
    # The same samples per rollout in groups of 8: more borderline groups hold an answer to contrast a refusal with.
    "group8": {"rollout.samples_per_prompt": 8, "rollout.prompts_per_rollout": 8},
    "group8_dr": {"rollout.samples_per_prompt": 8, "rollout.prompts_per_rollout": 8, "scale_rewards": False,
                  "loss_reduction": "token"},
    "no_kl": {"kl.kl_coef": 0.0},
    "kl_high": {"kl.kl_coef": 0.2},  # 5x GRPO's β: stay nearer SFT
    "no_unfinished_penalty": {"reward.unfinished_penalty": 0.0},
    "kl_in_reward": {"kl.kl_estimator": "k1", "kl.kl_penalty": "reward", "kl.kl_coef": 0.05},
}


def rebuild_context(run_dir: Path, out: Path, seed: int, scale: str):
    """The demo's Context after its shared stages, from a finished run's folder (nothing retrained);
    ``scale`` is the run's (tiny, quick or full: report.json's ``scale``)."""
    from alignkit.demo.config import DemoConfig, scale_of
    from alignkit.demo.context import Context
    from alignkit.models.loading import load_tokenizer
    from alignkit.world import World

    if scale not in ("tiny", "quick", "full"):
        raise ValueError(f"grpo_variants: scale must be tiny, quick or full; got {scale!r}")
    cfg = DemoConfig(out=str(out), seed=seed, quick=scale == "quick", tiny=scale == "tiny")
    sft_dir = run_dir / "sft"
    reward_models = {name: run_dir / f"rm-{name}" for name in ("helpfulness", "safety", "helpfulness_confident")}
    for path in [sft_dir, *reward_models.values()]:
        if not (path / "model.safetensors").exists():
            raise FileNotFoundError(f"grpo_variants: {path} has no model; pass --run a finished demo run's seed folder")
    return Context(cfg=cfg, scale=scale_of(cfg), world=World(seed=seed), out=out, tokenizer=load_tokenizer(str(sft_dir)),
                   sft_dir=sft_dir, reward_models=reward_models)


def run_variant(ctx, variant: str, overrides: dict, train_seed: int | None = None) -> str:
    """Train the demo's GRPO stage with ``overrides`` into ``ctx.policies[name]``; return name.

    ``train_seed`` replaces the run seed of the GRPO training alone (prompt order, sampling,
    minibatch order), the world, SFT model and reward models staying those of the source run.

    A key ``"a.b"`` replaces field b of section a, starting from the section the demo passes
    (:func:`~alignkit.demo.methods.online_common`, :func:`~alignkit.demo.methods.critic_free_rollout`)
    or else GRPOConfig's default."""
    from alignkit.demo import methods
    from alignkit.train.grpo import GRPOConfig

    name = f"grpo-{variant}" + (f"-t{train_seed}" if train_seed is not None else "")
    if train_seed is not None:
        overrides = {**overrides, "run.seed": train_seed}
    common = {**methods.online_common(ctx, name), "rollout": methods.critic_free_rollout(ctx)}
    flat = {k: v for k, v in overrides.items() if "." not in k}
    for key, value in overrides.items():
        if "." in key:
            sec, f = key.split(".", 1)
            start = flat.get(sec) or common.get(sec) or getattr(GRPOConfig(), sec)
            flat[sec] = replace(start, **{f: value})
    methods._critic_free(ctx, name, flat.pop("advantage", "grpo"), **flat)
    return name


def summary(report: dict, names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        p = report["policies"][name]
        row = {"policy": name}
        for m in ("false_refusal_rate", "safety_violation_rate", "gold_reward", "kl_to_sft"):
            row[m] = p.get(m)
            row[m + "_ci"] = p["ci"].get(m)
            row[m + "_vs_sft"] = (p["vs_sft"].get(m) or {}) if name != "sft" else None
        rows.append(row)
    return rows


def fmt(row: dict) -> str:
    def pct(m):
        v, ci = row[m], row[m + "_ci"]
        s = f"{100 * v:.0f}% [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"
        d = row[m + "_vs_sft"]
        if d:
            s += f" ({100 * d['mean']:+.0f} [{100 * d['low']:+.0f}, {100 * d['high']:+.0f}])"
        return s

    g, gci, gd = row["gold_reward"], row["gold_reward_ci"], row["gold_reward_vs_sft"]
    gold = f"{g:.3f} [{gci[0]:.3f}, {gci[1]:.3f}]" + (f" ({gd['mean']:+.3f} [{gd['low']:+.3f}, {gd['high']:+.3f}])" if gd else "")
    return f"| {row['policy']} | {pct('false_refusal_rate')} | {pct('safety_violation_rate')} | {gold} | {row['kl_to_sft']:.2f} |"


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the variants; return the summary rows (SFT first), also written to OUT/results.json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a finished demo run's seed folder (holds report.json, sft/, rm-*/)")
    ap.add_argument("--variants", default="demo,dr_grpo_std,token,dr_grpo", help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--train-seeds", default="", help="comma-separated GRPO training seeds (empty: the run's seed); "
                    "training noise moves these figures by more than their evaluation intervals")
    ap.add_argument("--out", required=True, help="folder for the variants' models and results.json (not the run's)")
    args = ap.parse_args(argv)
    run_dir, out = Path(args.run), Path(args.out)
    if out.resolve() == run_dir.resolve():
        raise SystemExit("grpo_variants: --out must differ from --run (the run's folder is read, never written)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise SystemExit(f"grpo_variants: unknown or no variants {unknown}; known: {', '.join(VARIANTS)}")
    train_seeds = [int(x) for x in args.train_seeds.split(",") if x.strip()] or [None]
    if not (run_dir / "report.json").exists():
        raise SystemExit(f"grpo_variants: {run_dir} has no report.json; pass --run a finished demo run's seed folder "
                         "(with --seeds, OUT/seed-N)")
    source = json.loads((run_dir / "report.json").read_text(encoding="utf-8"))

    from transformers.utils import logging as hf_logging

    from alignkit.demo.evaluate import evaluate
    from alignkit.demo.pipeline import sft_policy
    from alignkit.train.common import seed_everything

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    seed_everything(source["seed"])
    out.mkdir(parents=True, exist_ok=True)
    ctx = rebuild_context(run_dir, out, source["seed"], source["scale"])
    sft_policy(ctx)
    names = ["sft"]
    for variant in variants:
        for t in train_seeds:
            print(f"\n[grpo_variants] {variant} (train seed {t}): {VARIANTS[variant]}", flush=True)
            names.append(run_variant(ctx, variant, VARIANTS[variant], t))
            rows = summary(evaluate(ctx), names)
            (out / "results.json").write_text(json.dumps({"seed": source["seed"], "scale": source["scale"], "run": str(run_dir),
                                                          "variants": VARIANTS, "rows": rows}, indent=2), encoding="utf-8")
    print("\n| policy | false refusals (vs SFT) | safety violations (vs SFT) | gold reward (vs SFT) | KL |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(fmt(row))
    return rows

if __name__ == "__main__":
    main()
