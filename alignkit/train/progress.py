"""Progress bar (rich) and metrics writers (JSONL always; TensorBoard/W&B/MLflow via accelerate)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


class Progress:
    """Progress of a stage: step, loss, tokens/s, ETA. Silent when disabled.

    On a terminal, a one-line live bar (rich). In a log (CI, nohup, a pipe: stdout is not a
    terminal) a bar would re-render hundreds of times into the file, so plain lines are printed
    instead, at most one every ``interval`` seconds, plus the first and the last step."""

    def __init__(self, name: str, total: int, start: int = 0, enabled: bool = True, interval: float = 30.0,
                 live: bool | None = None):
        self.enabled, self.name, self.total, self.start, self.interval = enabled, name, total, start, interval
        if not enabled:
            return
        self.live = sys.stdout.isatty() if live is None else live
        self._t0 = time.monotonic()
        self._last_print: float | None = None
        if not self.live:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._p = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=False,
        )
        self._p.start()
        self._task = self._p.add_task(name, total=total, completed=start, loss="-", tps="-")

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        loss_s = f"{loss:.4f}" if math.isfinite(loss) else str(loss)
        if self.live:
            self._p.update(self._task, completed=step, loss=loss_s, tps=f"{tokens_per_s:,.0f}")
            return
        now = time.monotonic()
        due = self._last_print is None or now - self._last_print >= self.interval or step >= self.total
        if not due:
            return
        self._last_print = now
        elapsed = now - self._t0
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        print(f"[alignkit] {self.name} {step}/{self.total} loss {loss_s} {tokens_per_s:,.0f} tok/s "
              f"elapsed {_clock(elapsed)} ETA {_clock(eta)}", flush=True)

    def close(self) -> None:
        if self.enabled and self.live:
            self._p.stop()


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _keep_rows_up_to(path: Path, step: int) -> None:
    """Drop the rows of ``metrics.jsonl`` after ``step``: a run resumed from step ``step`` writes
    them again, and a fresh run (``step`` 0) starts an empty log. Rewritten atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            row_step = json.loads(line).get("step", 0)
        except ValueError:
            continue  # a row cut short by a kill
        if isinstance(row_step, (int, float)) and row_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


class MetricsWriter:
    """Appends each metrics row to ``output_dir/metrics.jsonl`` and forwards it to accelerate's trackers.
    With ``start`` (the step a run starts or resumes from), rows after it are dropped first, so
    a resumed run never repeats a step."""

    def __init__(self, run, accelerator, config=None, start: int | None = None):
        self.acc = accelerator
        self.main = accelerator.is_main_process
        self.jsonl = None
        names = [n.strip() for n in run.report_to.split(",")]
        if self.main:
            out = Path(run.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            if config is not None:
                # The run's full configuration beside its outputs, to repeat or audit it.
                from alignkit.config import save_config

                save_config(config, out / "alignkit_config.yaml")
            if "jsonl" in names:
                path = out / "metrics.jsonl"
                if start is not None:
                    _keep_rows_up_to(path, start)
                self.jsonl = open(path, "a", encoding="utf-8")
        self.trackers = bool(accelerator.log_with)
        if self.trackers:
            flat = _flatten(_plain(config)) if config is not None else {}
            # The project and run names are options (run.tracker_project, run.run_name).
            names = {"wandb": {"name": run.run_name}, "mlflow": {"run_name": run.run_name}} if run.run_name else {}
            accelerator.init_trackers(run.tracker_project or "alignkit", config=flat, init_kwargs=names)

    def write(self, row: dict, step: int) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
            self.jsonl.flush()
        if self.trackers:
            self.acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.trackers:
            self.acc.end_training()


def _plain(cfg):
    import dataclasses

    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = str(v)
    return out
