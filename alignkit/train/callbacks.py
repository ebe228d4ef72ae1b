"""Callbacks: code of yours that the engine runs on each step, evaluation, checkpoint and at the end.

Pass them to any API function (``alignkit.sft(..., callbacks=[EarlyStopping("eval/nll")])``). The
engine (:mod:`alignkit.train.engine`, the one every method drives) calls, on the main process:

===================================  =========================================================
``on_step(step, metrics)``           after every optimizer step offline, every rollout online,
                                     with the metrics row as ``metrics.jsonl`` holds it
``on_evaluate(step, metrics)``       after an evaluation (``run.eval_every``, and the final one),
                                     with its ``eval/...`` metrics
``on_checkpoint(step, path)``        after a resumable checkpoint was written to ``path``
``on_end(step, metrics)``            when the run's logs close: the last step's metrics plus the
                                     final evaluation
===================================  =========================================================

``step`` counts what the run's progress counts: optimizer steps offline, rollouts online.

**Stopping.** ``on_step`` or ``on_evaluate`` returning a truthy value (or :data:`STOP`) asks the run
to stop: the engine writes a resumable checkpoint at that step, the driver leaves its loop, and
the model is saved as at a normal end (its ``alignkit_done.json`` records ``stopped_at``). Running
the same call again with ``run.resume=true`` (and the same settings, max_steps included) continues
from that checkpoint to the same final weights as a run that never stopped. A stop requested
during the last step changes nothing (the run ends there anyway).

Rejection sampling (``rs``) fine-tunes once per round, each round a run of its own: callbacks see
each round's steps, and a stop ends that round's fine-tuning.
"""

from __future__ import annotations

import math
from typing import Any

#: What a callback may return to ask the run to stop (any truthy value does).
STOP = True


class Callback:
    """Base class: override the hooks you need; each returns None to continue, truthy to stop."""

    def on_step(self, step: int, metrics: dict[str, Any]) -> bool | None:
        """After step ``step`` (optimizer step offline, rollout online) with its metrics row."""
        return None

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> bool | None:
        """After an evaluation at ``step``, with its ``eval/...`` metrics."""
        return None

    def on_checkpoint(self, step: int, path: str) -> None:
        """After a resumable checkpoint of ``step`` was written to ``path``."""

    def on_end(self, step: int, metrics: dict[str, Any]) -> None:
        """When the run ends (normally or by a stop request): the last metrics and final evaluation."""


class EarlyStopping(Callback):
    """Stop when an evaluation metric has not improved for ``patience`` evaluations.

    ``metric`` is a name as logged (``eval/nll``, ``eval/accuracy``; the ``eval/`` prefix may be
    left out); ``mode`` is ``min`` (lower is better: losses) or ``max`` (accuracy, reward); an
    improvement must beat the best so far by more than ``min_delta``. Evaluations run every
    ``run.eval_every`` steps, so set it (and the evaluation data) for this to act."""

    def __init__(self, metric: str, patience: int = 3, mode: str = "min", min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        if patience < 1:
            raise ValueError(f"EarlyStopping: patience must be ≥ 1 evaluations, got {patience}")
        if not (math.isfinite(min_delta) and min_delta >= 0):
            raise ValueError(f"EarlyStopping: min_delta must be a finite number ≥ 0, got {min_delta}")
        self.metric = metric if metric.startswith("eval/") else f"eval/{metric}"
        self.patience, self.mode, self.min_delta = patience, mode, min_delta
        self.best: float | None = None
        self.bad = 0
        self.stopped_at: int | None = None

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> bool:
        if self.metric not in metrics:
            raise KeyError(f"EarlyStopping: the evaluation logged {sorted(metrics)}, not {self.metric!r}; "
                           "give one of those names")
        value = float(metrics[self.metric])
        sign = 1.0 if self.mode == "min" else -1.0
        if self.best is None or sign * (self.best - value) > self.min_delta:
            self.best, self.bad = value, 0
            return False
        self.bad += 1
        if self.bad >= self.patience:
            self.stopped_at = step
            print(f"[alignkit] early stopping at step {step}: {self.metric} has not improved on {self.best:g} "
                  f"for {self.bad} evaluations (mode {self.mode})")
            return True
        return False


class Callbacks:
    """The callbacks of one run, called in order; remembers whether one asked to stop."""

    def __init__(self, callbacks: list | None = None):
        self.items = list(callbacks or [])
        for cb in self.items:
            if not any(callable(getattr(cb, h, None)) for h in ("on_step", "on_evaluate", "on_checkpoint", "on_end")):
                raise TypeError(f"callback {cb!r} has none of on_step, on_evaluate, on_checkpoint, on_end; "
                                "subclass alignkit.Callback")
        self.stop_requested = False

    def _call(self, hook: str, *args) -> None:
        for cb in self.items:
            fn = getattr(cb, hook, None)
            if fn is not None and fn(*args) and hook in ("on_step", "on_evaluate"):
                self.stop_requested = True

    def step(self, step: int, metrics: dict) -> None:
        self._call("on_step", step, dict(metrics))
        evals = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        if evals:
            self._call("on_evaluate", step, evals)

    def evaluate(self, step: int, metrics: dict) -> None:
        self._call("on_evaluate", step, dict(metrics))

    def checkpoint(self, step: int, path: str) -> None:
        self._call("on_checkpoint", step, path)

    def end(self, step: int, metrics: dict) -> None:
        self._call("on_end", step, dict(metrics))
