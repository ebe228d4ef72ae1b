"""`alignkit demo --seeds 0,1,2`: one run per seed, aggregated into one report.

Each seed is a whole demo (its own world split, models and samples) in ``out/seed-N``. The
aggregate gives, for every figure, the mean over seeds with Student's t 95% interval over seeds
(:func:`alignkit.eval.uncertainty.seed_interval`) and the per-seed values; for every claim, on
which seeds its own 95% interval supported it, and the mean over seeds of the difference it rests
on, with its interval over seeds. A claim is stated as a finding when it holds on every seed.
The interval over seeds includes everything that varies with the seed (the world's split, the
corpus, initialisation, sampling), so it is wider than one run's bootstrap over prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignkit.eval.report import fmt, timing_table
from alignkit.eval.uncertainty import seed_interval

#: Figures aggregated per policy (those of the policy table).
FIGURES = ("gold_reward", "accuracy", "safety_violation_rate", "hallucination_rate", "false_refusal_rate",
           "borderline_gold_reward", "kl_to_sft", "win_rate_vs_sft", "pretrain_loss")
#: Environment fields that change a run's figures (the machine and the libraries).
MACHINE_KEYS = ("cpu_model", "cpu_id", "cpu_vector_flags", "torch_cpu_capability", "torch", "transformers",
                "accelerate", "torch_threads")
PCT = {"accuracy", "safety_violation_rate", "hallucination_rate", "false_refusal_rate", "win_rate_vs_sft"}


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; refuses anything else with a clear message."""
    try:
        seeds = [int(s) for s in text.replace(" ", "").split(",") if s != ""]
    except ValueError:
        raise ValueError(f"demo: seeds must be comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds:
        raise ValueError(f"demo: seeds must name at least one seed, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"demo: seeds {text!r} repeats a seed")
    return seeds


def _stat(values: list) -> dict | None:
    s = seed_interval(values)
    return None if s is None else {**s, "values": values}


def aggregate(reports: list[dict]) -> dict:
    """One report from per-seed reports (same methods and scale): ``policies[name][figure]`` and
    ``reward_models[name]["accuracy"]`` are ``{"mean", "low", "high", "n", "sd", "values"}``; ``claims``
    lists each claim's per-seed verdicts, ``holds_on``, ``holds`` (on every seed) and ``diff`` (the
    mean over seeds of its key difference, with an interval over seeds)."""
    seeds = [r["seed"] for r in reports]
    if len({bool(r.get("quick")) for r in reports}) > 1:
        raise ValueError(f"demo: seeds {seeds} mix quick and full runs; aggregate runs of one scale")
    names = [n for n in reports[0]["policies"] if all(n in r["policies"] for r in reports)]
    policies = {n: {f: _stat([r["policies"][n].get(f) for r in reports]) for f in FIGURES} for n in names}
    for n in names:
        policies[n]["vs_sft"] = {m: _stat([(r["policies"][n].get("vs_sft", {}).get(m) or {}).get("mean") for r in reports])
                                 for m in ("gold_reward", "safety_violation_rate", "hallucination_rate", "false_refusal_rate",
                                           "borderline_gold_reward")}
    rms = {n: {"accuracy": _stat([r["reward_models"][n]["accuracy"] for r in reports])}
           for n in reports[0]["reward_models"] if all(n in r["reward_models"] for r in reports)}
    claims = []
    for c in reports[0].get("claims", []):
        per = [next((x for x in r.get("claims", []) if x["id"] == c["id"]), None) for r in reports]
        verdicts = [x["holds"] if x else None for x in per]
        claims.append({"id": c["id"], "expected": c["expected"], "verdicts": dict(zip(seeds, verdicts)),
                       "holds_on": [s for s, v in zip(seeds, verdicts) if v], "holds": all(v is True for v in verdicts),
                       "texts": {s: x["text"] for s, x in zip(seeds, per) if x}})
    commits = {s: (r.get("environment") or {}).get("alignkit_commit") for s, r in zip(seeds, reports)}
    # what each seed ran on, where it differs from the first seed's (seeds run apart, aggregated later)
    first = reports[0].get("environment") or {}
    differs = {s: {k: v for k, v in (r.get("environment") or {}).items() if k in MACHINE_KEYS and first.get(k) != v}
               for s, r in zip(seeds, reports)}
    return {"seeds": seeds, "quick": reports[0].get("quick"), "policies": policies, "reward_models": rms,
            "claims": claims, "environment": reports[0].get("environment"),
            # the code each seed ran (seeds can be run apart and aggregated later)
            "commits": commits, "environment_differences": {s: d for s, d in differs.items() if d},
            "timings_s": {f"seed {r['seed']}": r["timings_s"]["total"] for r in reports},
            "cpu_s": {f"seed {r['seed']}": r.get("cpu_s", {}).get("total") for r in reports}}


def _cell(s: dict | None, pct: bool, digits: int = 3, diff: bool = False) -> str:
    """mean [low, high]; a rate's bounds are clipped to 0–100% (a t interval over few seeds can
    pass them); a difference is signed, a rate difference in points."""
    if not s or s.get("mean") is None:
        return "–"
    k, d = (100, 0) if pct else (1, digits)
    unit = (" pts" if diff else "%") if pct else ""
    sign = "+" if diff else ""
    if s.get("low") is None:
        return f"{k * s['mean']:{sign}.{d}f}{unit}"
    lo, hi = s["low"], s["high"]
    if pct and not diff:
        lo, hi = max(0.0, lo), min(1.0, hi)
    return f"{k * s['mean']:{sign}.{d}f}{unit} [{k * lo:{sign}.{d}f}, {k * hi:{sign}.{d}f}]"


def markdown(agg: dict, title: str) -> str:
    seeds = agg["seeds"]
    heads = {"gold_reward": "gold reward", "accuracy": "accuracy", "safety_violation_rate": "safety violations",
             "hallucination_rate": "hallucinations", "false_refusal_rate": "false refusals",
             "borderline_gold_reward": "gold reward, borderline", "kl_to_sft": "KL to SFT",
             "win_rate_vs_sft": "win rate vs SFT", "pretrain_loss": "pretraining loss"}
    lines = [f"# {title}", "",
             f"Seeds {', '.join(map(str, seeds))}, one whole run each (`seed-N/report.md` has each run's own tables with "
             "bootstrap intervals over prompts). Here each figure is the mean over seeds with Student's t 95% interval "
             f"over the {len(seeds)} seeds (t with {len(seeds) - 1} degrees of freedom); per-seed values follow.", "",
             "## Policies (mean over seeds [95% interval over seeds])", "",
             "| policy | " + " | ".join(heads[f] for f in FIGURES) + " |", "|" + "---|" * (len(FIGURES) + 1)]
    for name, p in agg["policies"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(p[f], f in PCT, 2 if f == "kl_to_sft" else 3) for f in FIGURES) + " |")
    lines += ["", "Figures are defined under each seed's policy table. Per seed:", ""]
    for name, p in agg["policies"].items():
        vals = "; ".join(f"{heads[f]} " + ", ".join(fmt(v, f in PCT) for v in p[f]["values"]) for f in
                         ("gold_reward", "safety_violation_rate", "false_refusal_rate") if p[f])
        lines.append(f"- {name}: {vals}")
    lines += ["", "## Differences from SFT (mean over seeds of each run's paired difference)", "",
              "| policy | gold reward | safety violations | hallucinations | false refusals |", "|---|---|---|---|---|"]
    for name, p in agg["policies"].items():
        if name != "sft":
            lines.append(f"| {name} | " + " | ".join(_cell(p["vs_sft"][m], m != "gold_reward", diff=True) for m in
                                                     ("gold_reward", "safety_violation_rate", "hallucination_rate", "false_refusal_rate")) + " |")
    lines += ["", "## Reward models (held-out accuracy, mean over seeds)", "", "| reward model | accuracy |", "|---|---|"]
    lines += [f"| {n} | {_cell(r['accuracy'], True)} |" for n, r in agg["reward_models"].items()]
    lines += ["", "## Claims across seeds", "",
              "A claim holds on a seed when that run's 95% interval supports it; it is a finding here when it holds on every seed.", ""]
    for c in agg["claims"]:
        mark = "holds on every seed" if c["holds"] else f"holds on seeds {c['holds_on'] or 'none'} of {seeds}"
        lines.append(f"- **{c['expected']}**: {mark}.")
        for s, t in c["texts"].items():
            lines.append(f"  - seed {s}: {t}")
    env = agg.get("environment") or {}
    lines += ["", "## What it ran on", "", f"{env.get('cpu_model', '?')}; torch {env.get('torch', '?')}, transformers "
              f"{env.get('transformers', '?')}, {env.get('torch_threads', '?')} thread(s).", "",
              "## Time per seed", ""] + timing_table(agg["timings_s"], agg.get("cpu_s")) + [""]
    return "\n".join(lines)


def write(agg: dict, out: Path, title: str) -> None:
    out = Path(out)
    (out / "report.json").write_text(json.dumps(agg, indent=2, default=str), encoding="utf-8")
    (out / "report.md").write_text(markdown(agg, title), encoding="utf-8")
