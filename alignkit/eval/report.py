"""Reports of policies scored against a gold judge: ``report.json`` (for tools), ``report.md`` (for
people) and PNG plots. Nothing here knows which policies a caller ran: names, columns and the
sentences of findings are arguments.

A policy entry is a dict of figures (``gold_reward``, ``kl_to_sft``...) with, optionally, ``ci``
(figure -> [low, high], a 95% interval), ``n`` (figure -> the prompts or documents it is over),
``n_samples``/``n_prompts`` and ``kl_estimator``. Tables print every figure with its interval
and say how many prompts it is over; a figure without an interval (an exact one, such as an
analytic KL) is marked so.

Plots: gold reward against KL to the reference (the DPO paper's frontier), each point with its
intervals and with a marker saying which KL it is (analytic or estimated from samples); and the
training curves of every stage (the reward for RL stages, the loss otherwise).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Column:
    """One column of a policy table."""

    key: str
    """The figure's key in a policy entry."""
    header: str
    """Column heading."""
    definition: str
    """What the figure is, printed under the table."""
    pct: bool = False
    """Print as a percentage."""
    digits: int = 3
    """Decimals of a non-percentage figure."""


def fmt(x, pct: bool = False, digits: int = 3) -> str:
    """A figure as the tables print it ('–' for a missing one)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if pct:
        return f"{100 * x:.0f}%"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def fmt_ci(x, ci, pct: bool = False, digits: int = 3) -> str:
    """``x [low, high]`` (a percentage's bounds in points), or ``x`` alone without an interval."""
    if ci is None or x is None:
        return fmt(x, pct, digits)
    lo, hi = ci
    if pct:
        return f"{100 * x:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"
    return f"{x:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def fmt_diff(d: dict | None, pct: bool = False, digits: int = 3) -> str:
    """A paired difference ``{"mean", "low", "high"}`` as ``+x [low, high]`` (points for rates)."""
    if not d or d.get("mean") is None:
        return "–"
    k, unit = (100, " pts") if pct else (1, "")
    d_ = digits if not pct else 0
    return f"{k * d['mean']:+.{d_}f}{unit} [{k * d['low']:+.{d_}f}, {k * d['high']:+.{d_}f}]"


def policy_table(policies: dict[str, dict], columns: list[Column]) -> list[str]:
    """A markdown table: one row per policy, each figure with its 95% interval; the headers give
    the prompts each figure is over (``n``), a last column the samples per prompt; the columns'
    definitions follow the table."""
    def n_of(key):
        ns = sorted({p.get("n", {}).get(key) for p in policies.values() if p.get("n", {}).get(key)})
        return "" if not ns else f" (n={ns[0]})" if len(ns) == 1 else f" (n={ns[0]}–{ns[-1]})"

    head = "| policy | " + " | ".join(c.header + n_of(c.key) for c in columns) + " | samples/prompt |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for name, p in policies.items():
        per = p.get("n_samples", 0) / p["n_prompts"] if p.get("n_prompts") else None
        cells = [fmt_ci(p.get(c.key), p.get("ci", {}).get(c.key), c.pct, c.digits) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(per, digits=1) if per is not None else '–'} |")
    lines += [""] + [f"- **{c.header}**: {c.definition}" for c in columns]
    lines += ["- **samples/prompt**: responses sampled per held-out prompt (a best-of-N sample is the best of N)."]
    return lines


def reward_model_table(reward_models: dict[str, dict]) -> list[str]:
    """Held-out pairwise accuracy of reward models with intervals, pairs and prompts, per margin label."""
    lines = ["| reward model | accuracy [95% CI] | pairs | prompts | accuracy by margin label (pairs) |", "|---|---|---|---|---|"]
    for name, r in reward_models.items():
        by = ", ".join(f"{k}: {fmt_ci(v, r.get('ci_by_margin', {}).get(k), True)} ({r['count_by_margin'].get(k, 0)})"
                       for k, v in r.get("accuracy_by_margin", {}).items())
        lines.append(f"| {name} | {fmt_ci(r['accuracy'], r.get('ci'), True)} | {r['n_pairs']} | {r.get('n_prompts', '–')} | {by} |")
    lines += ["", "Accuracy: the fraction of held-out labelled pairs whose chosen response the model scores higher "
              "(a tie counts half); the interval resamples prompts. Margin labels are the labeler's (Llama 2's "
              "four levels); \"negligibly better\" pairs are near ties by construction, so ~50% there is expected."]
    return lines


def timing_table(timings_s: dict[str, float], cpu_s: dict[str, float] | None = None) -> list[str]:
    """Seconds per stage: wall clock and, where given, CPU time of this process."""
    cpu_s = cpu_s or {}
    lines = ["| stage | wall s | CPU s |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {fmt(cpu_s.get(k), digits=1)} |" for k, v in timings_s.items()]
    return lines


def plot_frontier(points: list[dict], path: Path, reference: str = "SFT") -> None:
    """Gold reward against KL(π‖π_ref): ``points`` are dicts ``name, kl, kl_ci, analytic, reward,
    reward_ci``. Analytic KLs (best-of-N's log N − (N−1)/N) are hollow squares, sampled ones
    (k1 estimates) filled circles, so the two kinds of KL are never read as one. Labels are placed
    by :func:`_place_labels` so they do not overlap each other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in points if p.get("reward") is not None and p.get("kl") is not None]
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for p in pts:
        yerr = [[p["reward"] - p["reward_ci"][0]], [p["reward_ci"][1] - p["reward"]]] if p.get("reward_ci") else None
        xerr = [[p["kl"] - p["kl_ci"][0]], [p["kl_ci"][1] - p["kl"]]] if p.get("kl_ci") else None
        style = dict(marker="s", mfc="white", color="tab:orange") if p.get("analytic") else dict(marker="o", color="tab:blue")
        ax.errorbar(p["kl"], p["reward"], yerr=yerr, xerr=xerr, ms=6, lw=0.8, capsize=2, ls="none", **style)
    for p, (x, y) in zip(pts, _place_labels(ax, fig, pts)):
        ax.annotate(p["name"], (p["kl"], p["reward"]), xytext=(x, y), textcoords="data", fontsize=7.5,
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5"))
    from matplotlib.lines import Line2D

    ax.legend(handles=[Line2D([], [], marker="o", color="tab:blue", ls="none", label="KL estimated from samples (k1), 95% CI"),
                       Line2D([], [], marker="s", mfc="white", color="tab:orange", ls="none",
                              label="KL analytic: best-of-N, log N − (N−1)/N")], fontsize=8, loc="lower right")
    ax.set_xlabel(f"KL(π ‖ π_{reference}) per sequence (nats): sampled k1 estimate, or analytic for best-of-N")
    ax.set_ylabel("gold reward, held-out prompts (95% CI)")
    ax.set_title("Reward–KL frontier")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _place_labels(ax, fig, pts: list[dict]) -> list[tuple[float, float]]:
    """Label positions (data coordinates) that do not overlap: each label tries offsets around its
    point, nearest first, and takes the first whose box hits no marker and no label placed before it."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    to_data = ax.transData.inverted()
    out = []
    # The markers are obstacles too: a label never covers a point.
    placed = [(x - 5, y - 5, x + 5, y + 5) for x, y in (ax.transData.transform((p["kl"], p["reward"])) for p in pts)]
    offsets = [(6, 4), (6, -12), (-6, 4), (-6, -12)] + [(dx, dy) for r in (18, 30, 44, 60, 78)
                                                          for dx, dy in ((r, 0), (-r, 0), (0, r), (0, -r), (r, r), (-r, r), (r, -r), (-r, -r))]
    for p in pts:
        x0, y0 = ax.transData.transform((p["kl"], p["reward"]))
        text = ax.text(0, 0, p["name"], fontsize=7.5)
        bb = text.get_window_extent(renderer)
        text.remove()
        w, h = bb.width, bb.height
        chosen = None
        for dx, dy in offsets:
            x = x0 + dx if dx >= 0 else x0 + dx - w
            box = (x, y0 + dy, x + w, y0 + dy + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                chosen = box
                break
        chosen = chosen or (x0 + 6, y0 + 4, x0 + 6 + w, y0 + 4 + h)
        placed.append(chosen)
        out.append(tuple(to_data.transform((chosen[0], chosen[1]))))
    return out


#: metrics.jsonl keys plotted per stage, first present wins: for RL stages what they raise (the gold
#: reward of their rollouts, which the demo records), else the training loss.
CURVE_KEYS = (("gold_reward", "gold reward of the rollouts"), ("loss", "training loss"))
#: Plotted beside the first key on a second axis when a file logs it: the reward the RL stage was trained on.
TWIN_KEY = ("reward", "training reward (reward model)")


def _smooth(ys: list[float], width: int) -> list[float]:
    """Trailing running mean over ``width`` points (the first points average what there is)."""
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= width:
            total -= ys[i - width]
        out.append(total / min(i + 1, width))
    return out


def plot_curves(curves: dict[str, Path], path: Path, keys=CURVE_KEYS, twin=TWIN_KEY) -> None:
    """One panel per stage from its JSONL file: the first of ``keys`` it logs (for RL stages the
    gold reward of each rollout, with the training reward on a second axis; for the others the
    loss), raw in a light line and a running mean over about a tenth of the points on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for name, f in curves.items():
        f = Path(f)
        if not f.exists():
            continue
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        for key, label in keys:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
            if pts:
                extra = [(r["step"], r[twin[0]]) for r in rows if r.get(twin[0]) is not None and "step" in r] if key != "loss" else []
                series[name] = (label, pts, extra)
                break
    if not series:
        return
    n = len(series)
    cols = min(3, n)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 2.9 * rows_n), squeeze=False)
    for ax, (name, (label, pts, extra)) in zip(axes.flat, series.items()):
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        width = max(1, len(ys) // 10)
        ax.plot(xs, ys, lw=0.6, color="tab:blue", alpha=0.35 if width > 1 else 1.0)
        if width > 1:
            ax.plot(xs, _smooth(ys, width), lw=1.4, color="tab:blue")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step" if label == "training loss" else "rollout", fontsize=8)
        ax.set_ylabel(label + (f" (running mean of {width})" if width > 1 else ""), fontsize=7, color="tab:blue")
        ax.grid(alpha=0.3)
        if extra:
            ax2 = ax.twinx()
            ax2.plot([p[0] for p in extra], [p[1] for p in extra], lw=1, ls="--", color="tab:orange")
            ax2.set_ylabel(twin[1], fontsize=7, color="tab:orange")
            ax2.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out: Path, markdown_text: str, frontier: list[dict] | None = None,
                 curves: dict[str, Path] | None = None) -> None:
    """Write ``report.json``, ``report.md`` and, when given, ``frontier.png`` and ``training_curves.png``."""
    out = Path(out)
    slim = json.loads(json.dumps(report, default=str))
    (out / "report.json").write_text(json.dumps(slim, indent=2), encoding="utf-8")
    (out / "report.md").write_text(markdown_text, encoding="utf-8")
    if frontier is not None:
        plot_frontier(frontier, out / "frontier.png")
    if curves is not None:
        plot_curves(curves, out / "training_curves.png")
