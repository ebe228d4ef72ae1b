"""The one training loop every offline algorithm (SFT, reward models, DPO, KTO, ...) runs on.

An algorithm hands the loop a :class:`Task`: tokenised items, a collate function, and a loss that
returns the *sum* of its per-unit losses over a micro-batch (a unit is a token or a weighted
sequence, as the algorithm defines it). The loop divides by the number of units in the whole
global batch (all micro-batches of the step, all processes) before ``backward``, so the gradient
equals the one of a single big batch however the batch is split over accumulation steps and
processes (tested in ``tests/test_loop.py``).

Engine: ``accelerate`` (DDP, FSDP or DeepSpeed from its config). Checkpoints hold model,
optimizer, scheduler, RNG and the data position, and are written atomically (a temporary
directory renamed into place), so ``run.resume=true`` continues a killed run exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignkit.config import OptimConfig, RunConfig
from alignkit.train.flops import FlopCounter, known_peak
from alignkit.train.sampler import epoch_batches, make_units, split_batch

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


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


#: Smallest hidden size for which "auto" picks bf16 on a CPU with native bf16 instructions. A
#: training step of a 4-layer Llama (batch 8 × 200 tokens, one thread, avx512_bf16 CPU, torch
#: 2.13) ran 1.12× faster under bf16 autocast at hidden 64, 1.44× at 128, 1.57× at 256 and 1.75×
#: at 512: below 256 the gain is small and fp32 keeps small runs (tests, the demo) exact.
CPU_BF16_MIN_HIDDEN = 256


def cpu_bf16_instructions() -> str | None:
    """The native bf16 instruction set of this CPU (``amx_bf16`` or ``avx512_bf16``), else None.
    Without them bf16 matmuls are emulated, and slower than fp32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: ask torch's oneDNN build whether the CPU has AMX
        return "amx_bf16" if getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")().startswith("AMX") else None
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)


def _hidden_size(model) -> int | None:
    for module in (model.modules() if model is not None else ()):
        size = getattr(getattr(module, "config", None), "hidden_size", None)
        if size:
            return int(size)
    return None


def choose_mixed_precision(requested: str, model: torch.nn.Module | None = None) -> tuple[str, str]:
    """Pick the autocast dtype: (choice, reason). bf16 only where the hardware runs it fast:
    a CUDA device with bf16, or a CPU with native bf16 instructions and a model of hidden size
    at least :data:`CPU_BF16_MIN_HIDDEN`; fp32 otherwise."""
    if requested != "auto":
        return requested, "as configured"
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:  # accelerate allows one precision per process
        chosen = str(AcceleratorState().mixed_precision)
        return chosen, f"this process's accelerator already runs with mixed_precision={chosen}"
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16", "CUDA device with native bf16"
        return "no", "CUDA device without bf16: fp32 (fp16 needs loss scaling; opt in with mixed_precision=fp16)"
    from accelerate.utils import is_npu_available, is_xpu_available

    if is_xpu_available() or is_npu_available():
        return "no", "XPU/NPU device: fp32 (opt in with mixed_precision=bf16)"
    native = cpu_bf16_instructions()
    if native is None:
        return "no", "CPU without native bf16 instructions: fp32 (bf16 would be emulated, slower)"
    hidden = _hidden_size(model)
    if hidden is None or hidden < CPU_BF16_MIN_HIDDEN:
        return "no", (f"CPU with {native}, but the model is small (hidden size {hidden} < {CPU_BF16_MIN_HIDDEN}): fp32 "
                      f"(bf16 gains ≤ 1.4× there; opt in with mixed_precision=bf16)")
    return "bf16", f"CPU with {native} and hidden size {hidden} ≥ {CPU_BF16_MIN_HIDDEN}: bf16 autocast (1.5-1.8× a step; mixed_precision=no for fp32)"


def launched_on_cpu_only() -> bool:
    """True when this process belongs to a multi-process launch (torchrun / ``accelerate launch``)
    on a machine with no accelerator. accelerate then needs ``cpu=True`` to join the processes in
    one gloo group; without it each process would silently train alone on the whole data."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or torch.cuda.is_available():
        return False
    from accelerate.utils import is_npu_available, is_xpu_available

    return not (is_xpu_available() or is_npu_available())


def make_accelerator(run: RunConfig, grad_accum: int = 1, model: torch.nn.Module | None = None):
    """The accelerate engine for ``run``; ``model`` (the one to be trained) informs the
    mixed-precision choice (:func:`choose_mixed_precision`)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    mp, why = choose_mixed_precision(run.mixed_precision, model)
    trackers = []
    for name in [n.strip() for n in run.report_to.split(",") if n.strip()]:
        if name == "jsonl":
            continue
        if name == "tensorboard":
            trackers.append("tensorboard")
        elif name in ("wandb", "mlflow"):
            import importlib.util

            if importlib.util.find_spec(name) is None:
                log.warning("report_to=%s but %s is not installed: skipped", name, name)
                continue
            trackers.append(name)
        else:
            raise ValueError(f"run.report_to: unknown logger {name!r}; use jsonl, tensorboard, wandb or mlflow")
    acc = Accelerator(
        cpu=launched_on_cpu_only(),
        mixed_precision=mp,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=run.output_dir, logging_dir=str(Path(run.output_dir) / "tb")),
    )
    if acc.is_main_process:
        print(f"[alignkit] device={acc.device} processes={acc.num_processes} mixed_precision={mp} ({why}); "
              f"gradient_checkpointing={'on' if run.gradient_checkpointing else 'off'}"
              f"{'' if run.gradient_checkpointing else ' (enable with run.gradient_checkpointing=true to save memory)'}")
    return acc


def build_optimizer(model: torch.nn.Module, optim: OptimConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # norms and biases: no weight decay
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.adam_betas)


def build_scheduler(optimizer, optim: OptimConfig, total_steps: int):
    from transformers import get_scheduler

    names = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    if optim.schedule not in names:
        raise ValueError(f"optim.schedule must be one of {', '.join(names)}; got {optim.schedule!r}")
    warmup = int(round(optim.warmup_ratio * total_steps))
    return get_scheduler(names[optim.schedule], optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def count_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.exists():
        return None
    done = [p for p in root.glob("step-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


class Trainer:
    """Runs a :class:`Task` on a model with accelerate. ``fit()`` returns a :class:`TrainResult`."""

    def __init__(self, model: torch.nn.Module, task: Task, optim: OptimConfig, run: RunConfig, accelerator=None, config: Any = None):
        self.task, self.optim, self.run = task, optim, run
        self.acc = accelerator or make_accelerator(run, model=model)
        self.config = config
        if not task.items:
            raise ValueError(f"{task.name}: no training examples left after reading and filtering the data")
        world = self.acc.num_processes
        # Examples (sampling units) per optimizer step, over all micro-batches and processes.
        self.global_batch = optim.batch_size * optim.grad_accum * world
        self.units = make_units(len(task.items), task.groups)
        self.lengths = [it.get("length", 0) for it in task.items]
        self.steps_per_epoch = math.ceil(len(self.units) / self.global_batch)
        if optim.max_steps > 0:
            self.total_steps = optim.max_steps
        else:
            self.total_steps = max(1, math.ceil(optim.epochs * self.steps_per_epoch))
        if run.gradient_checkpointing:
            inner = getattr(model, "model", model)
            # transformers 5 renamed it (the old name warns and goes in v6)
            enable = getattr(inner, "activation_checkpointing_enable", None) or getattr(inner, "gradient_checkpointing_enable", None)
            if enable is not None:
                enable()
        optimizer = build_optimizer(model, optim)
        scheduler = build_scheduler(optimizer, optim, self.total_steps)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        # Not prepared: accelerate would step it once per process; total_steps already counts
        # global optimizer steps. Registered so checkpoints still hold its state.
        self.scheduler = scheduler
        self.acc.register_for_checkpointing(scheduler)
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

    # ---- checkpoints -----------------------------------------------------------------------
    def _save_checkpoint(self, step: int) -> None:
        root = Path(self.run.output_dir) / CHECKPOINT_DIR
        final = root / f"step-{step}"
        tmp = root / f".tmp-step-{step}"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        if self.acc.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "total_steps": self.total_steps}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # atomic: a checkpoint directory is complete or absent
            old = sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
            for p in old[: max(0, len(old) - self.run.keep_checkpoints)]:
                shutil.rmtree(p, ignore_errors=True)
        self.acc.wait_for_everyone()

    def _maybe_resume(self) -> int:
        if not self.run.resume:
            return 0
        ckpt = latest_checkpoint(self.run.output_dir)
        if ckpt is None:
            if self.acc.is_main_process:
                print(f"[alignkit] resume: no checkpoint in {self.run.output_dir}; starting from scratch")
            return 0
        self.acc.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if state["total_steps"] != self.total_steps:
            raise ValueError(
                f"resume: {ckpt} was written by a run of {state['total_steps']} steps but this run has "
                f"{self.total_steps}; keep the same data, batch sizes and epochs/max_steps to resume"
            )
        if self.acc.is_main_process:
            print(f"[alignkit] resumed from {ckpt} at step {state['step']}/{self.total_steps}")
        return int(state["step"])

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to ``total_steps`` (or stop after ``stop_after`` steps, to simulate a kill in tests)."""
        from alignkit.train.progress import Progress, MetricsWriter

        acc, task = self.acc, self.task
        start = self._maybe_resume()
        writer = MetricsWriter(self.run, acc, self.config)
        result = TrainResult(steps=start)
        progress = Progress(task.name, self.total_steps, start, enabled=self.run.progress and acc.is_main_process)
        flops, peak = FlopCounter(self.unwrapped()), known_peak()
        t0, tokens, step_flops = time.perf_counter(), 0.0, 0.0
        keys: list[str] | None = None  # metric names, the same on every process
        self.model.train()
        for step in range(start, self.total_steps):
            # Empty slots (a short last batch leaves a process less) run one item with zero weight,
            # so every process makes the same forward/backward calls and collectives.
            slots = self._micro_batches(step)
            batches = [_to_device(task.collate([task.items[i] for i in idx or [0]]), acc.device) for idx in slots]
            weights = [1.0 if idx else 0.0 for idx in slots]
            for batch, idx in zip(batches, slots):
                batch["filler"] = not idx  # a loss with a cross-process statistic leaves filler out of it
            local_units = sum(float(task.units(b)) * w for b, w in zip(batches, weights))
            total_units = acc.reduce(torch.tensor(local_units, device=acc.device), reduction="sum").clamp_min(1e-8)
            loss_total, metric_sums = 0.0, {}
            local_tokens = local_flops = 0.0
            for j, (batch, w) in enumerate(zip(batches, weights)):
                sync = acc.no_sync(self.model) if j < len(batches) - 1 else _null()
                with sync, acc.autocast():
                    loss_sum, metrics = task.loss(self.model, batch)
                    # DDP averages gradients over processes, hence × num_processes: the result is
                    # Σ(all units' losses) / (all units), the single-big-batch gradient.
                    loss = loss_sum * (w * acc.num_processes) / total_units
                acc.backward(loss)
                units = float(task.units(batch)) * w
                loss_total += float(loss_sum.detach()) * w
                for k, v in metrics.items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + float(v) * units
                local_tokens += count_tokens(batch) * w
                local_flops += flops(batch) * w
            grad_norm = None
            if self.optim.max_grad_norm > 0:
                grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.optim.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

            # One all-reduce for the step's loss, metrics, tokens and FLOPs over all processes.
            if keys is None:
                keys = sorted(metric_sums)
                if acc.num_processes > 1:
                    from accelerate.utils import gather_object

                    if any(sorted(other) != keys for other in gather_object([keys])):
                        raise RuntimeError(f"{task.name}: processes log different metric names; a loss must "
                                           "return the same metric keys for every batch")
            sums = acc.reduce(torch.tensor([loss_total, local_tokens, local_flops, *(metric_sums[k] for k in keys)],
                                           dtype=torch.float64, device=acc.device), reduction="sum").tolist()
            tokens += sums[1]
            step_flops += sums[2]
            done = step + 1
            loss_value = sums[0] / float(total_units)
            row = {"step": done, "loss": loss_value, "lr": self.scheduler.get_last_lr()[0]}
            row.update({k: v / float(total_units) for k, v in zip(keys, sums[3:])})
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            elapsed = max(time.perf_counter() - t0, 1e-9)
            row["tokens_per_s"] = tokens / elapsed
            if peak:  # model FLOP/s of all processes over the peak of all processes together
                row["flops_per_s"] = step_flops / elapsed
                row["mfu"] = row["flops_per_s"] / (peak * acc.num_processes)
            if task.evaluate and self.run.eval_every and done % self.run.eval_every == 0 and done < self.total_steps:
                row.update({f"eval/{k}": v for k, v in self._evaluate().items()})
            if done % max(1, self.run.log_every) == 0 or done == self.total_steps:
                writer.write(row, done)
            result.history.append(row)
            progress.update(done, loss_value, row["tokens_per_s"])
            if self.run.save_every and done % self.run.save_every == 0 and done < self.total_steps:
                self._save_checkpoint(done)
            result.steps = done
            if stop_after is not None and done >= stop_after:
                break
        progress.close()
        if result.steps == self.total_steps and task.evaluate:
            result.final_eval = self._evaluate()
            writer.write({f"eval/{k}": v for k, v in result.final_eval.items()}, result.steps)
        writer.close()
        result.wall_s = time.perf_counter() - t0
        result.tokens_per_s = tokens / max(result.wall_s, 1e-9)
        result.flops_per_s = step_flops / max(result.wall_s, 1e-9)
        if peak:
            result.mfu = result.flops_per_s / (peak * acc.num_processes)
        return result

    def _evaluate(self) -> dict[str, float]:
        model = self.acc.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = self.task.evaluate(model)
        model.train(was_training)
        return out

    def unwrapped(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
