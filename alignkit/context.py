"""What one run was given and what it read: the invocation, in-memory inputs, callbacks, data reports.

Every command's run function (``run_sft``, ``run_dpo``, ...) runs inside a :class:`RunContext`
(:func:`entry` opens one, or joins the one its caller opened). The context carries what does not
belong in a saved config but shapes or explains the run:

- **in-memory inputs** given through the Python API (:mod:`alignkit.api`): a ``datasets.Dataset``,
  a list of dicts, a model or tokenizer object. The config names each by a ``memory:NAME`` path
  (``data.path: memory:data``, ``model.path: memory:model``), and the one seam that reads that
  kind of path resolves the name here: :func:`alignkit.data.readers.read_rows` for rows,
  :mod:`alignkit.models.loading` for models and tokenizers. So in-memory rows go through exactly
  the validation, tokenisation and data report that file rows do, and the saved config still says
  where everything came from;
- **callbacks** (:mod:`alignkit.train.callbacks`), which the engine calls on each step,
  evaluation, checkpoint and at the end;
- **the invocation** (the command line, or the API call) and the **data reports** the data layer
  wrote, both stated in the model card of the output folder (:mod:`alignkit.train.card`).

Nothing here imports the training machinery, so the data and model layers may consult it.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

#: Prefix of a path that names an in-memory input of the current run.
MEMORY_PREFIX = "memory:"


@dataclass
class RunContext:
    """The inputs and records of one run (one API call or command line)."""

    command: str = ""
    """The command run (sft, dpo, ...): the method the model card names."""
    invocation: str = ""
    """How the run was started: the command line, or the API call; stated in the model card."""
    sources: dict[str, Any] = field(default_factory=dict)
    """In-memory inputs by name: ``memory:NAME`` paths in the config resolve here."""
    callbacks: list = field(default_factory=list)
    """Callbacks the engine calls (:class:`alignkit.train.callbacks.Callback`)."""
    data_reports: list[tuple[str, Any]] = field(default_factory=list)
    """(role, DataReport) of every data source the run read, in reading order."""
    saved: list[tuple[Any, Any]] = field(default_factory=list)
    """(model, tokenizer) of every final save, newest last: what the API returns."""


_CURRENT: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar("alignkit_run", default=None)


def current() -> RunContext | None:
    """The context of the run in progress, or None outside a run."""
    return _CURRENT.get()


@contextmanager
def run_context(ctx: RunContext | None = None) -> Iterator[RunContext]:
    """Run the body inside ``ctx`` (a fresh one if None); nested calls keep the outer one."""
    outer = _CURRENT.get()
    if outer is not None:
        yield outer
        return
    token = _CURRENT.set(ctx or RunContext())
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def entry(command: str) -> Callable:
    """Decorator of a command's run function: the run gets a :class:`RunContext` (its caller's,
    when an API call or the command line opened one; else a fresh one naming the Python call)."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(cfg, *args, **kwargs):
            with run_context(RunContext(command=command, invocation=f"{fn.__module__}.{fn.__name__}(cfg)")) as ctx:
                ctx.command = ctx.command or command
                ctx.invocation = ctx.invocation or f"{fn.__module__}.{fn.__name__}(cfg)"
                return fn(cfg, *args, **kwargs)

        run.command = command
        return run

    return wrap


def is_memory(path: Any) -> bool:
    """True for a ``memory:NAME`` path (an in-memory input of the current run)."""
    return isinstance(path, str) and path.startswith(MEMORY_PREFIX)


def memory_source(path: str) -> Any:
    """The in-memory input a ``memory:NAME`` path names; a clear error outside its API call."""
    ctx = current()
    if ctx is None or path not in ctx.sources:
        known = ", ".join(sorted(ctx.sources)) if ctx and ctx.sources else "none"
        raise ValueError(f"{path} names an in-memory input, which exists only inside the alignkit API call that was "
                         f"given it (inputs of this run: {known}); pass the object to the API function again "
                         "(e.g. alignkit.sft(data=rows, ...)), or give a file path")
    return ctx.sources[path]


def note_data_report(role: str, report: Any) -> None:
    """Record the data report of a source the run read (for the model card)."""
    ctx = current()
    if ctx is not None:
        ctx.data_reports.append((role, report))


def note_saved(model: Any, tokenizer: Any) -> None:
    """Record a finished model as saved (the API returns the last one)."""
    ctx = current()
    if ctx is not None:
        ctx.saved.append((model, tokenizer))
