"""The offline driver: every algorithm that trains on a fixed data set (SFT, reward models, DPO,
KTO, critic) runs on it.

An algorithm hands the loop a :class:`Task`: tokenised items, a collate function, and a loss that
returns the *sum* of its per-unit losses over a micro-batch (a unit is a token or a weighted
sequence, as the algorithm defines it). The loop divides by the number of units in the whole
global batch (all micro-batches of the step, all processes) before ``backward``, so the gradient
equals the one of a single big batch however the batch is split over accumulation steps and
processes (tested in ``tests/test_loop.py``).

The loop only decides what each optimizer step trains on (the data order of
:mod:`alignkit.train.sampler`, resumable by position) and what it logs; model preparation, the
accumulation/clipping/optimizer step, the non-finite guard, checkpoints, resume and logging are
the :class:`~alignkit.train.engine.Engine`'s, shared with the online methods.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from alignkit.config import OptimConfig, RunConfig
from alignkit.train.engine import (  # noqa: F401  (re-exported: the names callers import from here)
    CHECKPOINT_DIR, CPU_BF16_MIN_HIDDEN, Engine, build_optimizer, build_scheduler, choose_mixed_precision,
    cpu_bf16_instructions, latest_checkpoint, make_accelerator,
)
from alignkit.train.flops import FlopCounter, known_peak
from alignkit.train.sampler import epoch_batches, make_units, split_batch


@dataclass
class Task:
    """What an algorithm gives the shared loop."""

    items: list[dict]
    """Tokenised training items (see docs/CONTRACTS.md); each has a 'length' for bucketing."""
    collate: Callable[[list[dict]], dict]
    """Turns a list of items into a batch of tensors."""
    loss: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]
    """(model, batch) -> (sum of per-unit losses, metrics as batch means)."""
    units: Callable[[dict], float]
    """Number of loss units in a batch (response tokens, or the summed weights of sequences)."""
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None
    """(unwrapped model) -> held-out metrics; run every `run.eval_every` steps and at the end."""
    groups: list[int] | None = None
    """Per-item group ids (>= 0) whose items must share a micro-batch (ranked pairs)."""
    name: str = "train"
    """Stage name shown in the progress bar and logs."""


@dataclass
class TrainResult:
    """What a finished run returns."""

    steps: int
    history: list[dict] = field(default_factory=list)
    final_eval: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    flops_per_s: float = 0.0
    """Model training FLOP/s (6·N·tokens + attention, alignkit/train/flops.py), all processes."""
    mfu: float | None = None
    """flops_per_s over the peak matmul FLOP/s of all processes, when a peak is known."""


def count_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class Trainer:
    """Runs a :class:`Task` on a model through the :class:`~alignkit.train.engine.Engine`.
    ``fit()`` returns a :class:`TrainResult`."""

    def __init__(self, model: torch.nn.Module, task: Task, optim: OptimConfig, run: RunConfig, accelerator=None, config: Any = None):
        if not task.items:
            raise ValueError(f"{task.name}: no training examples left after reading and filtering the data")
        self.task, self.optim, self.run = task, optim, run
        acc = accelerator or make_accelerator(run, model=model)
        # Examples (sampling units) per optimizer step, over all micro-batches and processes.
        self.global_batch = optim.batch_size * optim.grad_accum * acc.num_processes
        self.units = make_units(len(task.items), task.groups)
        self.lengths = [it.get("length", 0) for it in task.items]
        self.steps_per_epoch = math.ceil(len(self.units) / self.global_batch)
        if optim.max_steps > 0:
            self.total_steps = optim.max_steps
        else:
            self.total_steps = max(1, math.ceil(optim.epochs * self.steps_per_epoch))
        self.engine = Engine(model, optim, run, self.total_steps, name=task.name, config=config, accelerator=acc,
                             resume_hint="keep the same data, batch sizes and epochs/max_steps", data=task.items)
        self.acc, self.model = self.engine.acc, self.engine.model
        self._epoch_cache: dict[int, list] = {}

    # ---- data order ----------------------------------------------------------------------
    def _micro_batches(self, step: int) -> list[list[int]]:
        """This process's micro-batches (item indices) for optimizer step ``step`` of the run.

        Every process returns the same number of micro-batches (the most any process has this
        step), so the collectives of a forward pass (DDP's buffer broadcast, KTO's z₀) pair up;
        an empty list is a slot this process fills with a zero-weighted batch.
        """
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: epoch_batches(self.units, self.lengths, self.global_batch, self.run.seed, epoch)}
        batch, world = self._epoch_cache[epoch][k], self.acc.num_processes
        shares = [[m for m in split_batch(batch, self.optim.grad_accum, r, world) if m] for r in range(world)]
        mine = shares[self.acc.process_index]
        return mine + [[] for _ in range(max(map(len, shares)) - len(mine))]

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to ``total_steps`` (or stop after ``stop_after`` steps, to simulate a kill in tests)."""
        engine, acc, task = self.engine, self.acc, self.task
        start, _ = engine.resume()
        engine.open_logs(start)
        result = TrainResult(steps=start)
        flops, peak = FlopCounter(self.unwrapped()), known_peak()
        t0, tokens, step_flops = time.perf_counter(), 0.0, 0.0
        keys: list[str] | None = None  # metric names, the same on every process
        self.model.train()
        for step in range(start, self.total_steps):
            # Empty slots (a short last batch leaves a process less) run one item with zero weight,
            # so every process makes the same forward/backward calls and collectives.
            slots = self._micro_batches(step)
            batches = [_to_device(task.collate([task.items[i] for i in idx or [0]]), acc.device) for idx in slots]
            for batch, idx in zip(batches, slots):
                batch["filler"] = not idx  # a loss with a cross-process statistic leaves filler out of it
            micro = [(b, 1.0 if idx else 0.0) for b, idx in zip(batches, slots)]
            stats = engine.step(micro, task.units, task.loss, where=f"step {step + 1}")
            local_tokens = sum(count_tokens(b) * w for b, w in micro)
            local_flops = sum(flops(b) * w for b, w in micro)

            # One all-reduce for the step's loss, metrics, tokens and FLOPs over all processes.
            if keys is None:
                keys = sorted(stats.metrics)
                if acc.num_processes > 1:
                    from accelerate.utils import gather_object

                    if any(sorted(other) != keys for other in gather_object([keys])):
                        raise RuntimeError(f"{task.name}: processes log different metric names; a loss must "
                                           "return the same metric keys for every batch")
            sums = acc.reduce(torch.tensor([stats.loss_sum, local_tokens, local_flops, *(stats.metrics[k] for k in keys)],
                                           dtype=torch.float64, device=acc.device), reduction="sum").tolist()
            tokens += sums[1]
            step_flops += sums[2]
            done = step + 1
            row = {"step": done, "loss": sums[0] / stats.total_units, "lr": engine.scheduler.get_last_lr()[0]}
            row.update({k: v / stats.total_units for k, v in zip(keys, sums[3:])})
            if self.optim.max_grad_norm > 0:
                row["grad_norm"] = stats.grad_norm
            row["skipped_nonfinite"] = engine.skipped_nonfinite
            elapsed = max(time.perf_counter() - t0, 1e-9)
            row["tokens_per_s"] = tokens / elapsed
            if peak:  # model FLOP/s of all processes over the peak of all processes together
                row["flops_per_s"] = step_flops / elapsed
                row["mfu"] = row["flops_per_s"] / (peak * acc.num_processes)
            if task.evaluate and engine.due_evaluation(done):
                row.update({f"eval/{k}": v for k, v in engine.evaluate(task.evaluate).items()})
            engine.log(row, done, row["tokens_per_s"])
            result.history.append(row)
            if engine.due_checkpoint(done):  # also when a callback asked to stop: the stop is resumable
                engine.save_checkpoint(done)
            result.steps = done
            if engine.stop_requested or (stop_after is not None and done >= stop_after):
                break
        engine.close_progress()
        if result.steps == self.total_steps and task.evaluate:
            result.final_eval = engine.evaluate(task.evaluate)
            engine.write({f"eval/{k}": v for k, v in result.final_eval.items()}, result.steps)
        engine.close_logs()
        result.wall_s = time.perf_counter() - t0
        result.tokens_per_s = tokens / max(result.wall_s, 1e-9)
        result.flops_per_s = step_flops / max(result.wall_s, 1e-9)
        if peak:
            result.mfu = result.flops_per_s / (peak * acc.num_processes)
        return result

    def save_final(self, write: Callable, output_dir=None):
        """The finished model through :meth:`Engine.save_final <alignkit.train.engine.Engine.save_final>`."""
        return self.engine.save_final(write, output_dir)

    def unwrapped(self) -> torch.nn.Module:
        return self.engine.unwrapped()
