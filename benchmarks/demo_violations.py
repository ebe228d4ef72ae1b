"""Measure a finished demo run's safety violations again, with more samples per held-out harmful prompt.

A violation is rare (SFT complies with 7-15% of the harmful requests), so a method's cut of a few
points can stay inside its paired interval from the sampling alone. The demo drew 3 samples per
held-out prompt at full scale (2 at quick) when this script was written; it now draws 16 per
held-out harmful prompt for the violation rates (``Scale.harmful_eval_samples``), and this script
gives any finished run a second, independent draw. It loads the run's sampled policies (SFT, DPO,
IPO, KTO, rejection sampling, PPO, GRPO, RLOO, whichever the run has), draws ``--samples`` samples per
held-out harmful prompt from each with one sampling seed, scores them with the world's gold judge,
and prints each method's violation rate minus SFT's with a paired cluster-bootstrap 95% interval
over prompts (``alignkit.eval.uncertainty.bootstrap_difference``, as the report's).

    PYTHONPATH=. python benchmarks/demo_violations.py --run demo-out/seed-3 --samples 8

The run's seed comes from its report.json. Measured on full seeds 3, 4 and 5 of commit b5f8f81
(docs/demo.md, Helpful and harmless together), 8 samples per prompt, violations minus SFT's in points:

    seed (SFT)     DPO          IPO          KTO          RS           PPO          GRPO         RLOO
    3 (8.9%)    -6.2 [-8,-4] -5.3 [-8,-3] -5.7 [-8,-4] -5.2 [-7,-4] -6.2 [-8,-4] -7.6 [-10,-6] -6.9 [-9,-5]
    4 (14.2%)   -3.9 [-7,-1] -0.1 [-3,+3] -9.1 [-12,-7] -6.4 [-10,-4] -5.6 [-8,-3] -5.2 [-8,-2] -3.0 [-6,+0]
    5 (9.9%)    -1.6 [-4,+1] -2.1 [-5,+1] -5.2 [-8,-3] -7.8 [-10,-6] -4.0 [-6,-2] -6.7 [-9,-5] -6.9 [-9,-5]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: The demo's sampled policies that the combined-reward claim covers (best-of-N picks among SFT samples).
POLICIES = ("dpo", "ipo", "kto", "rejection_sampling", "ppo", "grpo", "rloo")
#: Sampling seed of the re-measurement (any fixed one: every policy draws with the same).
SEED = 777


def violations(run: Path, policy: str, world, tokenizer, prompts, samples: int, max_new_tokens: int) -> list[list[float]]:
    """Per prompt, the gold judge's violation (0/1) of each of ``samples`` samples of ``policy``."""
    from alignkit.demo.context import sample
    from alignkit.demo.evaluate import JUDGE_METRICS

    violation = JUDGE_METRICS["safety_violation_rate"][1]  # the report's own value of a judged sample
    _, gens = sample(run / policy, tokenizer, prompts, samples, SEED, max_new_tokens)
    per = [[] for _ in prompts]
    for i, text in enumerate(gens.texts):
        k = gens.prompt_index[i]
        per[k].append(violation(world.judge.score(prompts[k], text)))
    return per


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    from alignkit.demo.config import FULL, QUICK, TINY
    from alignkit.eval.uncertainty import bootstrap_difference
    from alignkit.models.loading import load_tokenizer
    from alignkit.world import World

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished demo run's folder (report.json, sft/, dpo/, ...)")
    parser.add_argument("--samples", type=int, default=8, help="samples per held-out harmful prompt")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    run = Path(args.run)
    if not (run / "report.json").exists() or not (run / "sft").is_dir():
        raise SystemExit(f"{run}: not a finished demo run (it needs report.json and the sft/ model folder)")
    report = json.loads((run / "report.json").read_text())
    torch.set_num_threads(1)
    world = World(seed=report["seed"])
    tokenizer = load_tokenizer(str(run / "sft"))
    prompts = world.prompts("harmful", "heldout")
    max_new_tokens = {"tiny": TINY, "quick": QUICK, "full": FULL}[report["scale"]].max_new_tokens
    sft = violations(run, "sft", world, tokenizer, prompts, args.samples, max_new_tokens)
    rate = lambda per: sum(map(sum, per)) / sum(map(len, per))  # noqa: E731
    rows = [{"policy": "sft", "violation_rate": rate(sft)}]
    print(f"seed {report['seed']}: SFT {100 * rate(sft):.1f}% over {len(prompts)} prompts x {args.samples}")
    for policy in POLICIES:
        if not (run / policy).is_dir():
            continue
        per = violations(run, policy, world, tokenizer, prompts, args.samples, max_new_tokens)
        d = bootstrap_difference(per, sft)
        rows.append({"policy": policy, "violation_rate": rate(per), "vs_sft": d})
        print(f"  {policy}: {100 * rate(per):.1f}%  minus SFT {100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, "
              f"{100 * d['high']:+.1f}]", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
