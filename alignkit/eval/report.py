"""A report of policies scored against a gold judge: ``report.json`` (for tools), ``report.md`` (for people) and PNG plots.

Plots: gold reward against KL to the SFT policy (the DPO paper's frontier plot), and the training
curves of every stage (loss per optimizer step, from each stage's ``metrics.jsonl``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path


def _fmt(x, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if pct:
        return f"{100 * x:.0f}%"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def markdown(report: dict, findings: list[str], title: str = "alignkit report") -> str:
    """``report.md``: the policy table, the reward-model table, the critic section if any, the
    ``findings`` (sentences the caller states from the numbers) and the time per stage."""
    lines = [f"# {title}", ""]
    lines += ["Every policy starts from the same SFT policy and is scored on held-out prompts by the world's",
              "gold judge, which no training stage reads. KL is KL(π‖π_SFT) per sequence.", ""]
    lines += ["## Policies", "",
              "| policy | gold reward | helpfulness | accuracy | safety violations | hallucinations | false refusals | KL to SFT | win rate vs SFT | pretraining loss |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in report["policies"].items():
        lines.append(
            f"| {name} | {_fmt(p['gold_reward'])} | {_fmt(p['helpfulness'])} | {_fmt(p.get('accuracy'), True)} | "
            f"{_fmt(p['safety_violation_rate'], True)} | {_fmt(p['hallucination_rate'], True)} | "
            f"{_fmt(p['false_refusal_rate'], True)} | {_fmt(p['kl_to_sft'])} | {_fmt(p['win_rate_vs_sft'], True)} | "
            f"{_fmt(p.get('pretrain_loss'))} |")
    lines += ["", "Rates are over the prompts of their kind: safety violations over harmful requests, hallucinations",
              "over questions about unknown entities, false refusals over benign requests that look harmful;",
              "accuracy over arithmetic and knowledge-base questions. KL estimators: "
              + "; ".join(sorted({f"{n}: {p.get('kl_estimator', '')}" for n, p in report['policies'].items() if p.get('kl_estimator')})), ""]
    lines += ["## Reward models (held-out comparisons)", "", "| reward model | accuracy | pairs | accuracy by margin label |", "|---|---|---|---|"]
    for name, r in report["reward_models"].items():
        by = ", ".join(f"{k}: {_fmt(v, True)} ({r['count_by_margin'].get(k, 0)})" for k, v in r["accuracy_by_margin"].items())
        lines.append(f"| {name} | {_fmt(r['accuracy'], True)} | {r['n_pairs']} | {by} |")
    lines += _critic_section(report.get("critic"))
    lines += ["", "## Findings", ""]
    lines += [f"- {f}" for f in findings]
    lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["timings_s"].items()]
    lines += ["", "Plots: `frontier.png` (gold reward against KL to SFT), `training_curves.png`.", ""]
    return "\n".join(lines)


def _critic_section(critic: dict | None) -> list[str]:
    """The critique model: verdict accuracy on both held-out sets, position bias, failure naming and
    three critiques to read."""
    if not critic:
        return []
    clean = critic.get("clean", {})
    lines = ["", "## Critique reward model (held-out pairs, each judged in both orders)", "",
             "| pairs | accuracy (orders averaged) | one order | vs gold | position bias | order consistency | names the failure |",
             "|---|---|---|---|---|---|---|"]
    for label, m in (("SFT samples (as the reward models)", critic), ("reference responses", clean)):
        if m:
            lines.append(f"| {label} ({m['n_pairs']}) | {_fmt(m['accuracy'], True)} | {_fmt(m['accuracy_one_order'], True)} | "
                         f"{_fmt(m['accuracy_vs_gold'], True)} | {_fmt(m['position_bias'])} | "
                         f"{_fmt(m['order_consistency'], True)} | {_fmt(m['naming_rate'], True)} ({m['naming_n']}) |")
    for ex in critic.get("examples", [])[:2]:
        lines += ["", f"> **Prompt:** {ex['prompt']}  ", f"> **A:** {ex['response_a']}  ", f"> **B:** {ex['response_b']}  ",
                  f"> **Critique:** {ex['critique']} (P(A) = {ex['p_a']}, label {ex['label']})"]
    return lines


def _plot_frontier(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, p in report["policies"].items():
        if p["gold_reward"] is None:
            continue
        ax.scatter(p["kl_to_sft"], p["gold_reward"], s=50)
        ax.annotate(name, (p["kl_to_sft"], p["gold_reward"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("KL(π ‖ π_SFT) per sequence (nats)")
    ax.set_ylabel("gold reward (held-out prompts)")
    ax.set_title("Reward–KL frontier")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_curves(curves: dict[str, Path], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for name, f in curves.items():
        f = Path(f)
        if not f.exists():
            continue
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        if pts:
            series[name] = pts
    if not series:
        return
    n = len(series)
    cols = min(3, n)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 2.8 * rows_n), squeeze=False)
    for ax, (name, pts) in zip(axes.flat, series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: Path, curves: dict[str, Path], findings: list[str], title: str = "alignkit report") -> None:
    """Write ``report.json``, ``report.md`` (with ``findings``), ``frontier.png`` and ``training_curves.png``."""
    out = Path(out)
    slim = json.loads(json.dumps(report, default=str))
    (out / "report.json").write_text(json.dumps(slim, indent=2), encoding="utf-8")
    (out / "report.md").write_text(markdown(report, findings, title), encoding="utf-8")
    _plot_frontier(report, out / "frontier.png")
    _plot_curves(curves, out / "training_curves.png")
