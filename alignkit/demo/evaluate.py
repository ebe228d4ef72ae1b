"""Scoring every policy on the held-out prompts with the world's gold judge (which no stage
trains on), each figure with a bootstrap 95% interval over prompts.

Every policy is sampled on every held-out prompt (several samples per prompt), so a figure is a
mean over samples whose unit of independence is the prompt: intervals resample prompts
(:func:`alignkit.eval.uncertainty.bootstrap_mean`), and differences between two policies
resample the prompts once for both (paired; :func:`~alignkit.eval.uncertainty.bootstrap_difference`).
The pretraining loss is a mean over held-out corpus documents, resampled per document.
"""

from __future__ import annotations

from collections.abc import Callable

from .context import Context

#: Figure -> (prompt kinds it is measured on, None = all; the value of one judged sample).
JUDGE_METRICS: dict[str, tuple[tuple[str, ...] | None, Callable]] = {
    "gold_reward": (None, lambda j: j.reward),
    "helpfulness": (None, lambda j: j.helpfulness),
    "accuracy": (("arithmetic", "fact"), lambda j: float(j.correct)),
    "safety_violation_rate": (("harmful",), lambda j: float(j.safety_violation)),
    "hallucination_rate": (("unknown",), lambda j: float(j.hallucination)),
    "false_refusal_rate": (("borderline",), lambda j: float(j.false_refusal)),
    # What a refusal there costs the user: a refusal may replace a good answer or only junk.
    "borderline_gold_reward": (("borderline",), lambda j: j.reward),
}
#: Figures compared with SFT's on the same prompts (paired intervals in ``vs_sft``).
VS_SFT = ("gold_reward", "helpfulness", "accuracy", "safety_violation_rate", "hallucination_rate",
          "false_refusal_rate", "borderline_gold_reward")

def _groups(prompts, values) -> dict[str, list[float]]:
    """prompt text -> the values of its samples, in order."""
    out: dict[str, list[float]] = {}
    for p, v in zip(prompts, values):
        out.setdefault(p.text, []).append(float(v))
    return out


def _interval(stat: dict | None) -> list | None:
    return None if stat is None else [stat["low"], stat["high"]]


def _wins(world, pol: dict, sft_texts: dict[str, list[str]]) -> list[float]:
    """1 / 0.5 / 0 per sample: the j-th sample of a policy on a prompt against the j-th SFT sample
    on it (cycling when the policy has more samples per prompt)."""
    seen: dict[str, int] = {}
    out = []
    for p, t in zip(pol["prompts"], pol["texts"]):
        j = seen.get(p.text, 0)
        seen[p.text] = j + 1
        opp = sft_texts[p.text][j % len(sft_texts[p.text])]
        a, b = world.reward(p, t), world.reward(p, opp)
        out.append(1.0 if a > b else 0.5 if a == b else 0.0)
    return out


def measure(ctx: Context) -> dict[str, dict]:
    """Per policy, per figure: prompt text -> values (the raw material of every interval), plus
    the pretraining loss's per-document (sums, counts)."""
    w = ctx.world
    sft_texts: dict[str, list[str]] = {}
    for p, t in zip(ctx.policies["sft"]["prompts"], ctx.policies["sft"]["texts"]):
        sft_texts.setdefault(p.text, []).append(t)
    raw = {}
    for name, pol in ctx.policies.items():
        judged = [(p, w.judge.score(p, t)) for p, t in zip(pol["prompts"], pol["texts"])]
        groups = {}
        for metric, (kinds, value) in JUDGE_METRICS.items():
            sel = [(p, j) for p, j in judged if kinds is None or p.kind in kinds]
            groups[metric] = _groups([p for p, _ in sel], [value(j) for _, j in sel])
        extra = pol.get("violation_extra")
        if extra:  # further samples of the harmful prompts count in the violation rate only
            violation = JUDGE_METRICS["safety_violation_rate"][1]
            for p, t in zip(extra["prompts"], extra["texts"]):
                groups["safety_violation_rate"].setdefault(p.text, []).append(violation(w.judge.score(p, t)))
        groups["win_rate_vs_sft"] = _groups(pol["prompts"], _wins(w, pol, sft_texts))
        if pol.get("kl_values") is not None:
            groups["kl_to_sft"] = _groups(pol["prompts"], pol["kl_values"])
        raw[name] = {"groups": groups, "pretrain_nll": pol.get("pretrain_nll", ctx.policies["sft"].get("pretrain_nll"))}
    return raw


def evaluate(ctx: Context, comparisons: tuple = ()) -> dict:
    """The report's ``policies``: every figure with ``ci`` (bootstrap 95% interval over prompts),
    ``n`` (prompts it is over) and ``vs_sft`` (paired difference to SFT with its interval); and
    ``comparisons``: ``(a, b, figure)`` differences the caller asks for, keyed ``"a − b: figure"``."""
    from alignkit.eval.uncertainty import bootstrap_mean, bootstrap_ratio, bootstrap_ratio_difference

    w = ctx.world
    raw = measure(ctx)
    sft = raw["sft"]["groups"]
    report = {}
    for name, pol in ctx.policies.items():
        groups = raw[name]["groups"]
        ev = w.evaluate(pol["prompts"], pol["texts"])
        entry = {"ci": {}, "n": {}, "vs_sft": {}}
        for metric, by_prompt in groups.items():
            stat = bootstrap_mean(list(by_prompt.values()))
            entry[metric] = stat["mean"] if stat else None
            entry["ci"][metric], entry["n"][metric] = _interval(stat), stat["n"] if stat else 0
        if "kl_to_sft" not in groups:  # analytic (best-of-N) or SFT itself: exact, no interval
            entry["kl_to_sft"], entry["ci"]["kl_to_sft"], entry["n"]["kl_to_sft"] = pol["kl"], None, 0
        if name == "sft":
            entry["win_rate_vs_sft"], entry["ci"]["win_rate_vs_sft"] = 0.5, None
        nll = raw[name]["pretrain_nll"]
        if nll is not None:
            stat = bootstrap_ratio(*nll)
            entry["pretrain_loss"], entry["ci"]["pretrain_loss"], entry["n"]["pretrain_loss"] = stat["mean"], _interval(stat), stat["n"]
        else:
            entry["pretrain_loss"] = None
        if name != "sft":
            for metric in VS_SFT:
                entry["vs_sft"][metric] = _paired(groups[metric], sft[metric])
            if nll is not None and raw["sft"]["pretrain_nll"] is not None:
                entry["vs_sft"]["pretrain_loss"] = bootstrap_ratio_difference(*nll, *raw["sft"]["pretrain_nll"])
        entry.update({
            "kl_estimator": pol.get("kl_kind", ""),
            "n_prompts": len({p.text for p in pol["prompts"]}),
            "n_samples": len(pol["texts"]),
            "per_kind": {k: {"gold_reward": v["gold_reward"], "n": v["n"]} for k, v in ev["per_kind"].items()},
            "categories": ev["categories"],
            "examples": [{"prompt": p.text, "response": t} for p, t in list(zip(pol["prompts"], pol["texts"]))[::37][:5]],
        })
        entry.update({k: pol[k] for k in ("cost_threshold", "initial_cost", "final_cost") if k in pol})
        report[name] = entry
    compared = {}
    for a, b, metric in comparisons:
        if a in raw and b in raw:
            if metric == "pretrain_loss":
                na, nb = raw[a]["pretrain_nll"], raw[b]["pretrain_nll"]
                stat = bootstrap_ratio_difference(*na, *nb) if na and nb else None
            else:
                stat = _paired(raw[a]["groups"].get(metric, {}), raw[b]["groups"].get(metric, {}))
            compared[f"{a} − {b}: {metric}"] = {"a": a, "b": b, "metric": metric, **(stat or {})}
    return {"policies": report, "comparisons": compared}


def _paired(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict | None:
    """Paired bootstrap of mean(a) − mean(b) over the prompts both were measured on."""
    from alignkit.eval.uncertainty import bootstrap_difference

    common = sorted(set(a) & set(b))
    return bootstrap_difference([a[t] for t in common], [b[t] for t in common]) if common else None
