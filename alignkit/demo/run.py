"""`alignkit demo`: the stages in order, the methods table, and the report."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from .methods import (best_of_n, dpo, grpo, ipo, kto, ppo, ppo_ptx, ppo_safety_constrained, rejection_sampling,
                      rloo)
from .config import STAGE_SECONDS, DemoConfig, budget_line, report_scale, scale_of
from .context import Context, Stages
from .critic import critic_stage
from .evaluate import evaluate
from .iterate import iterative
from .labels import comparisons
from .pipeline import build_base, reward_models, sft, sft_policy
from .report import COMPARISONS, write


#: Keys of report.json that measure time, not results: two runs with the same seed, software and
#: machine give the same report apart from these (tests/test_demo.py checks it).
TIMING_KEYS = ("timings_s", "cpu_s")


def without_timings(report: dict) -> dict:
    """``report`` without its timings: what must be identical between two runs of one seed on one machine."""
    return {k: v for k, v in report.items() if k not in TIMING_KEYS}


#: method name -> stage function, run in this order, each from the same SFT policy.
METHODS: dict[str, Callable[[Context], None]] = {
    "best_of_n": best_of_n,
    "dpo": dpo,
    "ipo": ipo,
    "kto": kto,
    "rejection_sampling": rejection_sampling,
    "iterative": iterative,
    "ppo": ppo,
    "ppo_ptx": ppo_ptx,
    "ppo_safety_constrained": ppo_safety_constrained,
    "grpo": grpo,
    "rloo": rloo,
    # Last, so that its training does not shift the random streams of the stages above.
    "critic": critic_stage,
}

#: What `--quick` runs by default, to stay within 3 minutes of one core: one method of each family
#: (best-of-N, direct preference optimisation, PPO, critic-free RL). The others run in the full demo
#: (or with methods=all).
QUICK_METHODS = ("best_of_n", "dpo", "ppo", "grpo")


def run_demo(cfg: DemoConfig) -> dict:
    """Run the demo (once, or once per seed of ``cfg.seeds`` and aggregated); return the report."""
    if cfg.seeds:
        return run_seeds(cfg)
    return run_once(cfg)


def run_seeds(cfg: DemoConfig) -> dict:
    """One run per seed of ``cfg.seeds`` into ``out/seed-N``, then the aggregate report in ``out``."""
    from dataclasses import replace

    from .aggregate import aggregate, parse_seeds
    from .aggregate import write as write_aggregate

    seeds = parse_seeds(cfg.seeds)
    out = Path(cfg.out)
    t0 = time.perf_counter()
    reports = []
    for i, seed in enumerate(seeds):
        print(f"\n[demo] seed {seed} ({i + 1} of {len(seeds)})", flush=True)
        reports.append(run_once(replace(cfg, seed=seed, seeds="", out=str(out / f"seed-{seed}"))))
    agg = aggregate(reports)
    write_aggregate(agg, out, f"alignkit demo report: seeds {', '.join(map(str, seeds))} ({report_scale(cfg)})")
    print(f"\n[demo] {len(seeds)} seeds done in {time.perf_counter() - t0:.0f}s: {out / 'report.md'}")
    return agg


def run_once(cfg: DemoConfig) -> dict:
    """One run of the demo with ``cfg.seed``."""
    # The demo loads and saves some 50 tiny models: transformers' per-file progress bars would bury
    # the stage lines and ETAs (real-model commands keep them: there a load takes a while).
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _run_once(cfg)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _run_once(cfg: DemoConfig) -> dict:
    from alignkit.eval.environment import run_environment
    from alignkit.train.common import seed_everything
    from alignkit.world import World

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    scale = scale_of(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.methods == "all" or (cfg.methods == "default" and not cfg.quick):
        wanted = list(METHODS)
    elif cfg.methods == "default":
        wanted = list(QUICK_METHODS)
    else:
        wanted = [name.strip() for name in cfg.methods.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in METHODS]
    if unknown:
        raise ValueError(f"demo: unknown method(s) {unknown}; available: {', '.join(METHODS)}")
    ctx = Context(cfg=cfg, scale=scale, world=World(seed=cfg.seed), out=out)
    shared = {"pretraining": build_base, "supervised fine-tuning": sft, "comparison data": comparisons,
              "reward models": reward_models, "sample the SFT policy": sft_policy}
    stages = Stages([*shared, *wanted, "gold-judge evaluation"], STAGE_SECONDS.get(report_scale(cfg), {}))
    t0, c0 = time.perf_counter(), time.process_time()
    for name, fn in shared.items():
        stages.run(name, fn, ctx)
    for name in wanted:
        stages.run(name, METHODS[name], ctx)
    scored = stages.run("gold-judge evaluation", evaluate, ctx, COMPARISONS)
    report = {
        "seed": cfg.seed,
        "quick": cfg.quick,
        "scale": report_scale(cfg),
        "methods": wanted,
        "environment": run_environment(cfg.seed),
        "reward_models": ctx.rm_report,
        "policies": scored["policies"],
        "comparisons": scored["comparisons"],
        "timings_s": {**stages.timings, "total": round(time.perf_counter() - t0, 2)},
        "cpu_s": {**stages.cpu, "total": round(time.process_time() - c0, 2)},
        "methods_default": cfg.methods == "default",
        "world": ctx.world.summary(),
        "labels": ctx.extra.get("labels", {}),
        "model_parameters": ctx.extra.get("model_parameters"),
        "critic": ctx.extra.get("critic"),
    }
    title = f"alignkit demo report (seed {cfg.seed}{', quick' if cfg.quick else ''})"
    write(report, out, ctx.curves, title)
    budget = budget_line(report["scale"], report["methods_default"], report["cpu_s"]["total"])
    print(f"\n[demo] done in {report['timings_s']['total']:.0f}s wall, {report['cpu_s']['total']:.0f}s CPU "
          f"({report_scale(cfg)} scale{'; ' + budget if budget else ''}; per stage in report.md): {out / 'report.md'}")
    return report
