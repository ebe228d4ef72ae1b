"""The online driver: which prompts and sampling seed each rollout gets, the minibatch update
("several epochs over each rollout batch in minibatches"), per-rollout logs and checkpoints.

Everything below the minibatch (accumulation, clipping, the optimizer step and its non-finite
guard, checkpoint files, resume, the metrics writer) is the shared
:class:`~alignkit.train.engine.Engine`'s, the one the offline methods drive too.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor

from alignkit.config import OptimConfig, RunConfig
from alignkit.ops import masked_sum
from alignkit.rollout.batch import RolloutBatch
from alignkit.train.engine import Engine, full_weights, make_accelerator
from alignkit.train.online.collectives import all_reduce_max, all_reduce_sum, whiten_over_processes
from alignkit.train.online.config import RolloutConfig
from alignkit.train.online.prompts import load_prompts, rollout_prompt_indices
from alignkit.train.online.reductions import LOSS_REDUCTIONS
from alignkit.train.online.rewards import build_reward

#: Added per process index to the sampling seed (:meth:`OnlineLoop.sampling_seed`).
PROCESS_SEED_STRIDE = 100_000_007


def online_inputs(cfg, prompts=None, reward=None):
    """The start of every online run (PPO, GRPO, RLOO, rejection sampling): check ``cfg``, seed,
    and return (tokenizer, prompts, reward): ``prompts`` and ``reward`` as given in Python, else
    from ``cfg.data`` and ``cfg.reward`` (reward models read at the data section's lengths)."""
    from alignkit.models.loading import load_tokenizer
    from alignkit.train.common import seed_everything

    cfg.validate()
    seed_everything(cfg.run.seed)
    tokenizer = load_tokenizer(cfg.model)
    prompts = prompts if prompts is not None else load_prompts(cfg.data, cfg.run.seed, tokenizer)
    reward = build_reward(cfg.reward, reward, max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
    return tokenizer, prompts, reward


class OnlineLoop:
    """One online run over the shared engine: rollouts, the minibatch :meth:`update` every online
    method uses, timers, per-rollout logs and checkpoints. ``evaluate(model) -> metrics``, if
    given, runs every ``run.eval_every`` rollouts and after the last (``eval/`` metrics).
    ``prompts`` (the prompts themselves) go into the settings a resume must match."""

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, run: RunConfig, rollout: RolloutConfig,
                 n_prompts: int, name: str, config=None, evaluate: Callable[[torch.nn.Module], dict] | None = None,
                 prompts=None):
        if n_prompts == 0:
            raise ValueError(f"{name}: no prompts")
        self.optim, self.run, self.rollout, self.name, self.n_prompts = optim, run, rollout, name, n_prompts
        acc = make_accelerator(run, model=model)
        self.num_rollouts = rollout.num_rollouts or max(1, math.ceil(optim.epochs * n_prompts / rollout.prompts_per_rollout))
        self.minibatch = optim.batch_size * optim.grad_accum  # episodes per optimizer step, per process
        # Episodes of the largest share (prompts_for deals prompts out in turn, with all their
        # samples); every process runs the steps and micro-batches this share needs.
        self.max_local = math.ceil(rollout.prompts_per_rollout / acc.num_processes) * rollout.samples_per_prompt
        self.steps_per_rollout = rollout.ppo_epochs * math.ceil(self.max_local / self.minibatch)
        # Dropout off: the ratio π_θ/π_old compares the policy with itself (alignkit.models.dropout).
        self.engine = Engine(model, optim, run, self.num_rollouts, self.num_rollouts * self.steps_per_rollout,
                             name=name, config=config, accelerator=acc, dropout=False, unit="rollout",
                             resume_hint="keep the same prompts and rollout settings", data=prompts)
        self.acc, self.model, self.scheduler = acc, self.engine.model, self.engine.scheduler
        self.evaluate = evaluate
        self.times: dict[str, float] = defaultdict(float)
        self.cpu_times: dict[str, float] = defaultdict(float)  # the same phases in CPU time (shared cores)
        self.history: list[dict] = []
        self._episodes = 1

    @property
    def device(self):
        return self.acc.device

    def unwrapped(self):
        return self.engine.unwrapped()

    def gathered(self):
        """Under FSDP the policy's full weights for the block (sampling, scoring: every process makes
        its own number of forward calls), sharded again at its end; elsewhere nothing
        (:func:`alignkit.train.engine.full_weights`)."""
        return full_weights(self.engine.unwrapped())

    def prompts_for(self, k: int) -> list[int]:
        """This process's prompt indices for rollout ``k``."""
        idx = rollout_prompt_indices(self.n_prompts, self.rollout.prompts_per_rollout, self.run.seed, k)
        return idx[self.acc.process_index :: self.acc.num_processes]

    def sampling_seed(self, k: int) -> int:
        """Seed of rollout ``k``'s sampling on this process: a function of (run seed, k) so that a
        resumed run draws the same samples, and of the process index so that processes sampling
        their prompt shares do not reuse one random stream (process 0 keeps the single-process seed)."""
        return self.run.seed * 1_000_003 + k + self.acc.process_index * PROCESS_SEED_STRIDE

    @contextmanager
    def timed(self, phase: str):
        """Accumulate wall and CPU time of a phase (generation, scoring, update) for this rollout.
        CPU time (this process, all threads) is logged too: on shared cores wall time also counts
        the time other work held the CPU."""
        t0, c0 = time.perf_counter(), time.process_time()
        yield
        self.times[phase] += time.perf_counter() - t0
        self.cpu_times[phase] += time.process_time() - c0

    # ---- the minibatch update ----------------------------------------------------------------
    def update(self, batch: RolloutBatch, loss_fn: Callable, reduction: str = "token", k: int = 0,
               extra_loss: Callable | None = None, group_size: int = 1) -> dict[str, float]:
        """``ppo_epochs`` passes over ``batch`` in shuffled minibatches, one optimizer step each.

        ``group_size`` G > 1: rows come in groups of G consecutive rows (a prompt's samples) and
        the shuffle moves whole groups, so a group stays in one minibatch (and in one forward
        pass where ``optim.batch_size`` is a multiple of G) for layouts that share its prompt.

        ``loss_fn(model, minibatch) -> (losses (b, T), metrics)`` gives per-token losses; they are
        weighted with :data:`LOSS_REDUCTIONS` ``[reduction]`` and divided by the units of the whole
        minibatch (over its micro-batches and processes), so splitting it changes nothing.
        ``extra_loss(model) -> (loss, metrics)`` (PPO-ptx) is added once per optimizer step.
        Returns the metrics averaged over the steps (weighted by units).
        """
        reduce = LOSS_REDUCTIONS[reduction]

        def units(mb: RolloutBatch) -> float:
            return float(reduce(mb.response_mask)[1])

        def loss(model, mb: RolloutBatch):
            losses, metrics = loss_fn(model, mb)  # (b, T) per token
            weights, _ = reduce(mb.response_mask)
            return masked_sum(losses * weights, mb.response_mask), metrics

        batch = batch.to(self.device)
        gen = torch.Generator().manual_seed(self.run.seed * 7919 + k)  # minibatch order: reproducible on resume
        sums: dict[str, float] = defaultdict(float)
        weight = 0.0
        bs = self.optim.batch_size
        largest = int(all_reduce_max(len(batch)))  # the most episodes any process holds this rollout
        self._episodes = len(batch)  # this process's share, the weight of its figures in log()
        self.model.train()
        for _ in range(self.rollout.ppo_epochs):
            if group_size > 1 and len(batch) % group_size == 0:
                groups = torch.randperm(len(batch) // group_size, generator=gen)
                perm = (groups[:, None] * group_size + torch.arange(group_size)).flatten()
            else:
                perm = torch.randperm(len(batch), generator=gen)
            for start in range(0, largest, self.minibatch):
                idx = perm[start : start + self.minibatch]
                # Micro-batches of the largest share at this position: a process with fewer
                # episodes fills its missing slots with a zero-weighted row, so every process
                # makes the same forward/backward calls (DDP pairs them up) and optimizer steps.
                slots = math.ceil(min(self.minibatch, largest - start) / bs)
                micro = [(batch.select(idx[j : j + bs]), 1.0) if j < len(idx) else (batch.select([0]), 0.0)
                         for j in range(0, slots * bs, bs)]
                stats = self.engine.step(micro, units, loss, extra_loss, where=f"rollout {k + 1}")
                for name, v in stats.metrics.items():
                    sums[name] += v
                sums["loss"] += stats.loss_sum
                weight += stats.local_units
                if self.optim.max_grad_norm > 0:
                    sums["grad_norm"] += stats.grad_norm * stats.local_units
        names = sorted(sums)  # the same names on every process: the same loss and options
        *totals, weight = all_reduce_sum([sums[n] for n in names] + [weight])
        return {name: v / max(weight, 1e-8) for name, v in zip(names, totals)}

    def whiten(self, x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
        """Whitening over the whole rollout, all processes' shares (:func:`whiten_over_processes`)."""
        return whiten_over_processes(x, mask, eps)

    # ---- logging and checkpoints ---------------------------------------------------------------
    def register_state(self, state: dict) -> None:
        """Objects with state_dict()/load_state_dict() kept in checkpoints (KL controller, λ);
        call before :meth:`start`."""
        self.engine.register_state(state)

    def start(self) -> int:
        """Resume if asked; returns the first rollout to run. Opens the logs and progress bar."""
        start, saved = self.engine.resume()
        self.history = saved.get("history", [])
        self.engine.open_logs(start)
        self._t0 = time.perf_counter()
        return start

    def rollouts(self):
        """The rollout indices to run: from :meth:`start` (resume) to the last, ending early when a
        callback asked to stop (after :meth:`maybe_save` checkpointed that rollout)."""
        for k in range(self.start(), self.num_rollouts):
            yield k
            if self.engine.stop_requested:
                return

    def log(self, k: int, row: dict, tokens: int) -> dict:
        """Write the metrics row of rollout ``k`` (plus timings, lr, tokens/s, evaluation when due)
        and reset the timers."""
        total = sum(self.times.values())
        if self.acc.num_processes > 1:
            # Each process measured its share of the rollout: per-episode means over all processes
            # (weighted by each one's episodes), tokens summed; time is the slowest process's.
            names = sorted(key for key, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
            w = float(self._episodes)
            *sums, episodes, tokens = all_reduce_sum([float(row[key]) * w for key in names] + [w, float(tokens)])
            row = {**row, **{key: v / max(episodes, 1e-9) for key, v in zip(names, sums)}}
            total = all_reduce_max(total)
        done = k + 1
        row = {"rollout": done, "optimizer_steps": done * self.steps_per_rollout, **row,
               "lr": self.scheduler.get_last_lr()[0], "skipped_nonfinite": self.engine.skipped_nonfinite,
               **{f"time/{p}": t for p, t in self.times.items()}, "time/step": total,
               **{f"cpu/{p}": t for p, t in self.cpu_times.items()}, "cpu/step": sum(self.cpu_times.values()),
               "tokens_per_s": tokens / max(total, 1e-9)}
        if self.evaluate is not None and self.engine.due_evaluation(done):
            row.update({f"eval/{key}": v for key, v in self.engine.evaluate(self.evaluate).items()})
        self.engine.log(row, done, row["tokens_per_s"])
        self.history.append(row)
        self.times.clear()
        self.cpu_times.clear()
        return row

    def maybe_save(self, k: int) -> None:
        """Checkpoint after rollout ``k`` every ``run.save_every`` rollouts, and where a callback
        asked to stop (the engine's checkpoint, plus the metrics history so far)."""
        if self.engine.due_checkpoint(k + 1):
            self.engine.save_checkpoint(k + 1, {"history": self.history})

    def close(self) -> float:
        """Close the progress bar, run the final evaluation (if any), close the logs; returns the wall time."""
        self.engine.close_progress()
        if self.evaluate is not None and self.history and self.history[-1]["rollout"] == self.num_rollouts:
            final = {f"eval/{key}": v for key, v in self.engine.evaluate(self.evaluate).items()}
            self.history[-1].update(final)
            self.engine.write(final, self.num_rollouts)
        self.engine.close_logs()
        return time.perf_counter() - self._t0

    def save_final(self, write: Callable, output_dir=None):
        """The finished policy through :meth:`Engine.save_final <alignkit.train.engine.Engine.save_final>`."""
        return self.engine.save_final(write, output_dir)
