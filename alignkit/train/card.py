"""The model card: a ``README.md`` in every output folder saying what the model is, how it was
made, on what data, and how it scored.

It opens with the Hugging Face card header (YAML between ``---`` lines: ``base_model``,
``library_name: alignkit``, ``tags`` with the method, ``datasets``), so the hub shows it, then
states the command line or API call, the data report of every source read (read / kept / skipped /
truncated), the final metrics and every evaluation, and the full configuration.

The figures are the run's own records, never recomputed: the metrics are the rows of the folder's
``metrics.jsonl`` (numbers written with ``repr``, so they read back equal), the data figures the
:class:`~alignkit.data.report.DataReport` the data layer filled in. The engine writes the card
inside its atomic final save (:meth:`alignkit.train.engine.Engine.save_final`), so a finished
folder always has one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

CARD_FILE = "README.md"

#: The data report's figures, in the card's column order: (column, DataReport attribute).
DATA_COLUMNS = (("read", "read"), ("kept", "kept"), ("skipped", "total_skipped"), ("train", "train"),
                ("eval", "eval"), ("tokenized", "tokenized"), ("truncated", "truncated"))


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (rows cut short by a kill are left out)."""
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def final_metrics(rows: list[dict]) -> tuple[int, dict]:
    """(last step, every metric logged at it): the last training row merged with the final
    evaluation, written as a separate row at the same step."""
    if not rows:
        return 0, {}
    last = max(r.get("step", 0) for r in rows)
    merged: dict = {}
    for r in rows:
        if r.get("step", 0) == last:
            merged.update({k: v for k, v in r.items() if k != "step"})
    return last, merged


def evaluations(rows: list[dict]) -> list[tuple[int, dict]]:
    """(step, eval/ metrics) of every row that has any, in log order."""
    out = []
    for r in rows:
        ev = {k: v for k, v in r.items() if k.startswith("eval/")}
        if ev:
            out.append((r.get("step", 0), ev))
    return out


def _num(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def _base_model(config: Any, ctx) -> str:
    path = getattr(getattr(config, "model", None), "path", "") or ""
    if path.startswith("memory:") and ctx is not None and path in ctx.sources:
        obj = ctx.sources[path]
        return str(getattr(obj, "name_or_path", "") or getattr(getattr(obj, "config", None), "_name_or_path", "") or path)
    return path


def _datasets(config: Any) -> list[str]:
    data = getattr(config, "data", None)
    paths = [getattr(data, "path", ""), getattr(data, "eval_path", "")] if data is not None else []
    return [p for p in paths if p and not p.startswith("memory:")]


def model_card(command: str, config: Any, ctx, rows: list[dict], stopped_at: int | None = None) -> str:
    """The text of the card of a run of ``command`` with ``config``; ``ctx`` is the run's
    :class:`~alignkit.context.RunContext` (invocation, data reports; may be None), ``rows`` its
    ``metrics.jsonl`` rows."""
    from alignkit.config import config_yaml

    base = _base_model(config, ctx)
    header = {"library_name": "alignkit", "tags": ["alignkit", command]}
    if base:
        header["base_model"] = base
    datasets = _datasets(config)
    if datasets:
        header["datasets"] = datasets
    lines = ["---", yaml.safe_dump(header, sort_keys=True).strip(), "---", "",
             f"# {command} model trained with alignkit", ""]
    lines += [f"Method: `{command}`" + (f", starting from `{base}`" if base else "") + "."]
    if stopped_at is not None:
        lines += ["", f"The run was stopped by a callback after step {stopped_at}; its checkpoint there resumes it "
                      "(`run.resume=true`)."]
    lines += ["", "## How it was made", "", "```", (ctx.invocation if ctx is not None and ctx.invocation else
                                                    f"alignkit {command}"), "```", ""]
    lines += ["## Data", ""]
    reports = ctx.data_reports if ctx is not None else []
    if reports:
        lines += ["| source | format | " + " | ".join(c for c, _ in DATA_COLUMNS) + " |",
                  "|---|---|" + "---|" * len(DATA_COLUMNS)]
        for source, rep in reports:
            figures = " | ".join(str(getattr(rep, attr)) for _, attr in DATA_COLUMNS)
            lines.append(f"| {source} | {rep.format or '?'} | {figures} |")
        skips = [(source, reason, n) for source, rep in reports for reason, n in sorted(rep.skipped.items())]
        if skips:
            lines += ["", "Skipped rows by reason:", ""] + [f"- {s}: {reason}: {n}" for s, reason, n in skips]
    else:
        lines.append("No data file was read (prompts or records given in Python).")
    lines += ["", "## Metrics", ""]
    step, final = final_metrics(rows)
    if final:
        lines += [f"Final (step {step}), as in `metrics.jsonl`:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_num(v)} |" for k, v in final.items()]
    else:
        lines.append("No metrics were logged to `metrics.jsonl` (run.report_to without jsonl).")
    evals = evaluations(rows)
    if evals:
        lines += ["", "Evaluations:", "", "| step | metric | value |", "|---|---|---|"]
        lines += [f"| {s} | {k} | {_num(v)} |" for s, ev in evals for k, v in ev.items()]
    if config is not None:
        lines += ["", "## Configuration", "", "```yaml", config_yaml(config).strip(), "```"]
    lines.append("")
    return "\n".join(lines)


def write_model_card(folder: Path, command: str, config: Any, metrics_path: Path, stopped_at: int | None = None) -> Path:
    """Write ``folder/README.md`` for a run (see :func:`model_card`)."""
    from alignkit.context import current

    text = model_card(command, config, current(), read_metrics(metrics_path), stopped_at)
    path = Path(folder) / CARD_FILE
    path.write_text(text, encoding="utf-8")
    return path
