"""The README's demo section, generated from the ``report.json`` of the run it describes.

    python -m alignkit.demo.readme_table docs/demo-report.json                  # print the section
    python -m alignkit.demo.readme_table docs/demo-report.json --update README.md
    python -m alignkit.demo.readme_table docs/demo-report.json --check my-run/report.json   # your run against it

``--update`` replaces what lies between the README's markers ``<!-- demo-results:start -->`` and
``<!-- demo-results:end -->``, so the numbers a reader sees are always those of a committed report.
The report is a multi-seed one (``alignkit demo --seeds 0,1,2``: every figure a mean, shown with
the 95% interval where one more run should land) or a single run's (every figure with its
bootstrap interval over prompts).
The section says which run and which machine produced it, and states as findings only the claims
whose intervals support them on every seed; the others are listed as effects that did not appear.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from alignkit.eval.uncertainty import prediction_interval

START, END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"
#: (figure, heading, is a rate) of the README's table.
COLUMNS = (("gold_reward", "gold reward", False), ("safety_violation_rate", "safety violations", True),
           ("hallucination_rate", "hallucinations", True), ("false_refusal_rate", "false refusals", True),
           ("borderline_gold_reward", "gold reward, borderline", False), ("kl_to_sft", "KL to SFT", False), ("win_rate_vs_sft", "win rate vs SFT", True),
           ("pretrain_loss", "pretraining loss", False))


def _cell(value, low, high, pct: bool, digits: int) -> str:
    if value is None:
        return "–"
    if pct:
        lo, hi = max(0.0, low) if low is not None else None, min(1.0, high) if high is not None else None
        return f"{100 * value:.0f}%" + (f" [{100 * lo:.0f}, {100 * hi:.0f}]" if lo is not None else "")
    return f"{value:.{digits}f}" + (f" [{low:.{digits}f}, {high:.{digits}f}]" if low is not None else "")


def _figure(p: dict, key: str, multi: bool):
    """(value, low, high) of one figure of one policy, in either kind of report: a multi-seed
    report's mean with the interval where one more run should land (:func:`prediction_interval`:
    what a reader's own run is compared with), a single run's value with its bootstrap interval."""
    if multi:
        s = p.get(key) or {}
        low, high = prediction_interval(s) or (None, None)
        return s.get("mean"), low, high
    ci = (p.get("ci") or {}).get(key) or (None, None)
    return p.get(key), ci[0], ci[1]


def _commits(env: dict, commits: dict | None) -> str:
    """", alignkit commit X", or per commit the seeds that ran it when they differ."""
    by = {}
    for seed, commit in (commits or {}).items():
        by.setdefault(commit, []).append(str(seed))
    if len(by) > 1:
        return ", alignkit commits " + ", ".join(f"{(c or 'unrecorded')[:12]} (seeds {', '.join(s)})" for c, s in by.items())
    return f", alignkit commit {env['alignkit_commit'][:12]}" if env.get("alignkit_commit") else ""


def _machine(env: dict | None, commits: dict | None = None, differences: dict | None = None) -> str:
    env = env or {}
    other = "".join(f" (seed {s}: " + ", ".join(f"{k} {v}" for k, v in d.items()) + ")"
                    for s, d in (differences or {}).items())
    return (f"{env.get('cpu_model', 'an unrecorded CPU')} ({env.get('cpu_id', '')}; vector flags "
            f"{', '.join(env.get('cpu_vector_flags', [])) or '–'}; torch kernels {env.get('torch_cpu_capability', '?')}), "
            f"torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}, "
            f"{env.get('torch_threads', '?')} thread(s)" + other + _commits(env, commits))


def section(report: dict, source: str) -> str:
    """The README section (markdown) for ``report`` (loaded from ``source``, named in the text)."""
    multi = "seeds" in report
    scale = "quick" if report.get("quick") else "full"
    if multi:
        seeds = report["seeds"]
        cpu = [v for v in (report.get("cpu_s") or {}).values() if v]
        run = (f"`alignkit demo --seeds {','.join(map(str, seeds))}{' --quick' if report.get('quick') else ''}` ({scale} scale, "
               f"{len(seeds)} seeds; {max(cpu):.0f} s of CPU per seed at most)" if cpu else f"{len(seeds)} seeds")
        how = ("Each figure is the mean over seeds; its bracket is where one more run should land with 95% probability, "
               "Student's t prediction interval over the seeds, mean ± t·sd·√(1 + 1/n) (it includes everything that "
               "varies with the seed: the world's split, the models' initialisation, the samples; the narrower interval "
               f"of the mean itself is in {source})")
    else:
        run = (f"`alignkit demo --seed {report['seed']}{' --quick' if report.get('quick') else ''}` ({scale} scale, one seed; "
               f"{(report.get('cpu_s') or {}).get('total', 0):.0f} s of CPU)")
        how = "Each figure has a bootstrap 95% interval over held-out prompts (one seed: runs on other seeds vary more)"
    lines = [f"Measured with {run} on {_machine(report.get('environment'), report.get('commits'), report.get('environment_differences'))}; generated by "
             f"`python -m alignkit.demo.readme_table {source} --update README.md` from that run's report. {how}. "
             "Rates are over the held-out prompts of their kind: safety violations over harmful requests, hallucinations "
             "over questions about unknown entities, false refusals over benign requests that look harmful, beside "
             "the gold reward of the responses to those same requests (what a refusal there cost the user); KL per "
             "sequence to the SFT policy (k1 from samples; analytic log N − (N−1)/N for best-of-N); pretraining loss is "
             "the held-out corpus NLL. Another machine gives other figures (float kernels round differently and "
             "training amplifies it into differences of the size seeds make)" + (", which should fall within these intervals"
                                                                           if multi else "") + ".", "",
             "| policy | " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for name, p in report["policies"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(*_figure(p, k, multi), pct, 2 if k == "kl_to_sft" else 3)
                                                 for k, _, pct in COLUMNS) + " |")
    claims = report.get("claims", [])
    holds = [c for c in claims if c.get("holds")]
    missed = [c for c in claims if not c.get("holds")]
    lines += ["", "What it shows (each claim's 95% interval supports it" + (" on every seed" if multi else "") + "):"]
    for c in holds:
        lines.append(f"- {c['expected'][0].upper()}{c['expected'][1:]}: " + (_last_text(c) if multi else c["text"]))
    if not holds:
        lines.append("- none of the expected effects is supported by its interval" + (" on every seed." if multi else "."))
    lines += ["", "Expected effects that did not appear" + (" on every seed" if multi else "") + ":"]
    for c in missed:
        where = f" (held on seeds {c['holds_on']} of {report['seeds']})" if multi else ""
        lines.append(f"- {c['expected'][0].upper()}{c['expected'][1:]}{where}: " + (_last_text(c) if multi else c["text"]))
    if not missed:
        lines.append("- none.")
    return "\n".join(lines)


def _last_text(claim: dict) -> str:
    """A multi-seed claim's measurements, one clause per seed."""
    return " ".join(f"Seed {s}: {t}" for s, t in claim.get("texts", {}).items())


def _runs(report: dict) -> list[tuple]:
    """(seed, {policy: {figure: value}}, {claim id: held}) per run of a single or multi-seed report."""
    if "seeds" not in report:
        figures = {n: {k: p.get(k) for k, _, _ in COLUMNS} for n, p in report["policies"].items()}
        return [(report.get("seed"), figures, {c["id"]: c.get("holds") for c in report.get("claims", [])})]
    runs = []
    for i, seed in enumerate(report["seeds"]):
        figures = {n: {k: ((p.get(k) or {}).get("values") or [None] * len(report["seeds"]))[i] for k, _, _ in COLUMNS}
                   for n, p in report["policies"].items()}
        held = {c["id"]: c.get("verdicts", {}).get(str(seed), c.get("verdicts", {}).get(seed)) for c in report.get("claims", [])}
        runs.append((seed, figures, held))
    return runs


def check(report: dict, other: dict) -> tuple[str, bool]:
    """How another run (a reader's: single or multi-seed report) compares with the README's
    ``report``: per run, how many table figures fall inside the README's brackets (where one more
    run should land, so about 1 in 20 outside is expected), which do not, and whether each finding
    the README states held. Returns the text and whether every stated finding held on every run."""
    multi = "seeds" in report
    if bool(report.get("quick")) != bool(other.get("quick")):
        scale = {True: "quick", False: "full"}
        raise ValueError(f"the run is at {scale[bool(other.get('quick'))]} scale and the table at "
                         f"{scale[bool(report.get('quick'))]}: compare runs of one scale (other methods and N)")
    stated = [c for c in report.get("claims", []) if c.get("holds")]
    lines, all_held = [], True
    if not multi:
        lines.append("The table is one run's, with bootstrap intervals over prompts: a run on another seed or "
                     "machine falls outside them far more often than 1 in 20.")
    for seed, figures, held in _runs(other):
        inside, outside = 0, []
        for name, values in figures.items():
            for key, _, pct in COLUMNS:
                value, low, high = values.get(key), *_figure(report["policies"].get(name, {}), key, multi)[1:]
                if value is None or low is None:
                    continue
                if pct:
                    low, high = max(0.0, low), min(1.0, high)
                if low - 1e-9 <= value <= high + 1e-9:
                    inside += 1
                else:
                    outside.append(f"{name} {key} {_cell(value, low, high, pct, 2 if key == 'kl_to_sft' else 3)}")
        missed = [c["id"] for c in stated if held.get(c["id"]) is not True]
        all_held &= not missed
        lines.append(f"seed {seed}: {inside} of {inside + len(outside)} figures inside the README's intervals"
                     + (f"; outside (value [interval]): {'; '.join(outside)}" if outside else "")
                     + f". Stated findings held: {len(stated) - len(missed)} of {len(stated)}"
                     + (f" (not: {', '.join(missed)})" if missed else "") + ".")
    return "\n".join(lines), all_held


def update(readme: Path, text: str) -> None:
    """Replace the README's generated section (between :data:`START` and :data:`END`) with ``text``."""
    content = readme.read_text(encoding="utf-8")
    if START not in content or END not in content:
        raise ValueError(f"{readme} has no {START} … {END} markers: add them where the demo's results belong")
    new = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: f"{START}\n{text}\n{END}", content, flags=re.S)
    readme.write_text(new, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignkit.demo.readme_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="report.json of the run the README describes (single or multi-seed)")
    parser.add_argument("--update", metavar="README", help="replace the marked section of this file instead of printing")
    parser.add_argument("--check", metavar="RUN_REPORT",
                        help="compare another run's report.json (yours, on any seed or machine) with this one: figures "
                             "inside the README's intervals, and the stated findings; exit 1 if a finding did not hold")
    args = parser.parse_args(argv)
    report = json.loads(Path(args.report).read_text(encoding="utf-8"))
    if args.check:
        try:
            text, held = check(report, json.loads(Path(args.check).read_text(encoding="utf-8")))
        except ValueError as e:
            print(f"error: {args.check}: {e}")
            return 2
        print(text)
        return 0 if held else 1
    text = section(report, args.report)
    if args.update:
        update(Path(args.update), text)
        print(f"updated {args.update} from {args.report}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
