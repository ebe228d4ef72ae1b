"""Plumbing the online methods share: prompts → rollouts → scores → minibatch updates.

``ppo.py``, ``grpo.py`` (GRPO and RLOO) and ``rejection_sampling.py`` read top to bottom like
their papers' pseudo-code; what they have in common lives here:

- config sections: :class:`RolloutConfig`, :class:`RewardConfig`, :class:`KLConfig`;
- the prompts (from any data file with a prompt) and their order over rollouts;
- the reward (reward models from paths, weighted, safety-gated, whitened, clipped) and the
  penalty for responses that never end;
- the forward over a :class:`~alignkit.rollout.batch.RolloutBatch` (policy log-probs of the
  sampled tokens under the sampling temperature);
- :class:`OnlineLoop`: the accelerate engine, optimizer, schedule, timers, logging, checkpoints,
  and the minibatch update ("several epochs over each rollout batch in minibatches").

Batch sizes (one definition each, see docs/rl.md): a *rollout* holds
``prompts_per_rollout × samples_per_prompt`` episodes; a *minibatch* is
``optim.batch_size × optim.grad_accum × processes`` episodes and makes one optimizer step;
``optim.batch_size`` episodes go through the model per forward pass.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from alignkit.advantages import AdaptiveKLController, FixedKLController
from alignkit.config import DataConfig, OptimConfig, RunConfig
from alignkit.ops import KL_ESTIMATORS, masked_sum, token_logps
from alignkit.rollout.batch import RolloutBatch
from alignkit.rollout.rewards import Clipped, RewardModel, RewardSource, SafetyGated, WeightedSum, Whitened
from alignkit.train.loop import CHECKPOINT_DIR, build_optimizer, build_scheduler, latest_checkpoint, make_accelerator
from alignkit.train.progress import MetricsWriter, Progress

Messages = list[dict]


# --------------------------------------------------------------------------------------------
# Config sections
# --------------------------------------------------------------------------------------------


@dataclass
class RolloutConfig:
    """How many episodes one rollout holds, how many rollouts a run makes, how often each is reused."""

    prompts_per_rollout: int = 16
    """Prompts per rollout; the rollout batch holds prompts_per_rollout × samples_per_prompt episodes."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt (the group size of GRPO and RLOO; 1 for PPO)."""
    num_rollouts: int = 0
    """Rollout → update iterations (0 = derive from optim.epochs passes over the prompts)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch (PPO's K epochs, GRPO's μ); each pass is cut into minibatches of optim.batch_size × optim.grad_accum episodes, one optimizer step each."""


@dataclass
class RewardConfig:
    """Where scores come from on the command line (a Python caller may pass any RewardSource instead)."""

    reward_models: list[str] = field(default_factory=list)
    """Reward-model directories (outputs of `alignkit rm`); their scores are summed with `weights`."""
    weights: list[float] = field(default_factory=list)
    """One weight per reward model (empty = all 1)."""
    safety_model: str = ""
    """Safety reward model for Llama 2 gating: its score replaces the others' when below `safety_threshold`."""
    safety_threshold: float = 0.15
    """Gate of `safety_model` (Llama 2 eq. 4 uses 0.15)."""
    whiten: bool = False
    """Whiten scores with a mean and std fitted on the first rollout and then kept fixed."""
    clip: float = 0.0
    """Clamp scores to [−clip, clip] after whitening (0 = off)."""
    unfinished_penalty: float = 1.0
    """Subtracted from the score of a response that reaches sampling.max_new_tokens without EOS."""


@dataclass
class KLConfig:
    """The KL(π‖π_ref) penalty: its weight β, estimator, where it enters, and how β is controlled."""

    kl_coef: float = 0.05
    """β, the weight of the KL penalty (the starting value under the adaptive controller)."""
    kl_estimator: str = "k1"
    """Per-token estimator: k1 (log π − log π_ref), k2 (½(log r)²) or k3 ((r − 1) − log r), r = π_ref/π; logged as kl_estimator."""
    kl_penalty: str = "reward"
    """Where the KL enters: 'reward' (−β·KL_t in the per-token reward, InstructGPT) or 'loss' (β·KL_t as a loss term: PPO-penalty, GRPO)."""
    kl_control: str = "fixed"
    """'fixed' β, or 'adaptive' (Ziegler et al. 2019): β moves so the sequence KL approaches `target_kl`."""
    target_kl: float = 6.0
    """Target KL per sequence (nats, summed over tokens) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon in episodes of the adaptive controller (larger = β moves more slowly)."""

    def validate(self) -> None:
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl.kl_estimator must be one of {', '.join(KL_ESTIMATORS)}; got {self.kl_estimator!r}")
        if self.kl_penalty not in ("reward", "loss"):
            raise ValueError(f"kl.kl_penalty must be 'reward' or 'loss'; got {self.kl_penalty!r}")
        if self.kl_control not in KL_CONTROLLERS:
            raise ValueError(f"kl.kl_control must be one of {', '.join(KL_CONTROLLERS)}; got {self.kl_control!r}")
        if self.kl_penalty == "loss" and self.kl_estimator == "k1" and self.kl_coef > 0:
            raise ValueError("kl.kl_estimator=k1 as a loss term has zero expected gradient (docs/losses.md); "
                             "use k3 (GRPO) or k2 with kl.kl_penalty=loss")


#: β controllers by name: (KLConfig) -> object with .value and .update(sequence_kl, n_episodes).
KL_CONTROLLERS: dict[str, Callable[[KLConfig], object]] = {
    "fixed": lambda kl: FixedKLController(kl.kl_coef),
    "adaptive": lambda kl: AdaptiveKLController(kl.kl_coef, kl.target_kl, kl.kl_horizon),
}


def validate_online(optim: OptimConfig, rollout: RolloutConfig) -> None:
    if optim.max_steps > 0:
        raise ValueError("online methods count rollouts, not optimizer steps: set rollout.num_rollouts "
                         "instead of optim.max_steps")
    if rollout.prompts_per_rollout < 1 or rollout.samples_per_prompt < 1 or rollout.ppo_epochs < 1:
        raise ValueError("rollout.prompts_per_rollout, samples_per_prompt and ppo_epochs must be >= 1")


@dataclass
class OnlineResult:
    """What an online run returns: the saved policy (a plain HF directory) and its metrics."""

    output_dir: Path
    history: list[dict] = field(default_factory=list)
    wall_s: float = 0.0


# --------------------------------------------------------------------------------------------
# Prompts and rewards
# --------------------------------------------------------------------------------------------


def load_prompts(data: DataConfig, seed: int = 0, tokenizer=None) -> list[Messages]:
    """The distinct prompts of ``data.path``, in file order; any format with a prompt will do
    (prompt-only, SFT, pairwise, HH, ranked, ratings, unpaired): only the prompts are used."""
    from alignkit.train.common import prepare_prompts

    return prepare_prompts(data, tokenizer)  # prints the read/kept/skipped/truncated report


def rollout_prompt_indices(n_prompts: int, per_rollout: int, seed: int, k: int) -> list[int]:
    """Prompt indices of rollout ``k``: consecutive slices of a stream of shuffled epochs.

    A pure function of (seed, k), so a resumed run draws the same prompts.
    """
    out: list[int] = []
    pos = k * per_rollout
    while len(out) < per_rollout:
        epoch, i = divmod(pos, n_prompts)
        order = list(range(n_prompts))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        take = order[i : i + per_rollout - len(out)]
        out += take
        pos += len(take)
    return out


class _WhitenOnFirstCall(Whitened):
    """Whitened scores with μ, σ fitted on the first batch scored, then fixed."""

    fitted = False

    def __call__(self, prompts, responses):
        raw = self.source(prompts, responses)
        if not self.fitted:
            # Over every process's scores (each scores only its share of the rollout).
            n, total, squares = all_reduce_sum([float(len(raw)), float(raw.sum()), float((raw.double() ** 2).sum())])
            self.mean = total / n
            var = (squares - n * self.mean**2) / max(n - 1.0, 1.0)  # unbiased, as torch.std
            self.std = max(math.sqrt(max(var, 0.0)), 1e-6) if n > 1 else 1.0
            self.fitted = True
        return (raw - self.mean) / self.std


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over all processes (the values themselves in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def build_reward(cfg: RewardConfig, reward: RewardSource | None = None, device="cpu") -> RewardSource:
    """``reward`` if given, else the reward models of ``cfg`` (weighted sum, optional Llama 2
    safety gating); then whitening and clipping if configured."""
    if reward is None:
        if not cfg.reward_models:
            raise ValueError("no reward: set reward.reward_models to reward-model directories, or pass a RewardSource")
        weights = cfg.weights or [1.0] * len(cfg.reward_models)
        if len(weights) != len(cfg.reward_models):
            raise ValueError(f"reward.weights has {len(weights)} entries for {len(cfg.reward_models)} reward models")
        models = [(RewardModel(p, name=Path(p).name, device=device), w) for p, w in zip(cfg.reward_models, weights)]
        reward = models[0][0] if len(models) == 1 and weights[0] == 1.0 else WeightedSum(models)
        if cfg.safety_model:
            reward = SafetyGated(reward, RewardModel(cfg.safety_model, name="safety", device=device), cfg.safety_threshold)
    if cfg.whiten:
        reward = _WhitenOnFirstCall(reward)
    if cfg.clip > 0:
        reward = Clipped(reward, -cfg.clip, cfg.clip)
    return reward


def score_responses(reward: RewardSource, prompts: list[Messages], texts: list[str], finished: Tensor,
                    unfinished_penalty: float) -> tuple[Tensor, Tensor]:
    """(raw scores (B,), scores (B,) with ``unfinished_penalty`` subtracted where ``finished`` is False)."""
    raw = reward(prompts, texts).float().cpu()
    return raw, raw - unfinished_penalty * (~finished.cpu()).float()


# --------------------------------------------------------------------------------------------
# Forward passes over a rollout batch
# --------------------------------------------------------------------------------------------


def response_slice(x: Tensor, batch: RolloutBatch) -> Tensor:
    """Columns of a (B, P+T, ...) model output that predict / evaluate the response: (B, T, ...).

    Position P−1+t sees x and a_<t, i.e. the state s_t, and predicts a_t.
    """
    P, T = batch.prompt_width, batch.response_ids.shape[1]
    return x[:, P - 1 : P - 1 + T]


def policy_forward(model, batch: RolloutBatch, temperature: float, **kwargs):
    """One forward of ``model`` over [x | y]: (response logits (B, T, V) divided by the sampling
    temperature, log π(a_t|s_t) (B, T) zero outside the mask, the raw model output)."""
    out = model(**batch.model_inputs(), use_cache=False, **kwargs)
    logits = response_slice(out.logits, batch)  # (B, T, V)
    if temperature > 0:  # the distribution the tokens were sampled from
        logits = logits / temperature
    logps = token_logps(logits, batch.response_ids) * batch.response_mask
    return logits, logps, out


@torch.no_grad()
def rollout_logps(model, batch: RolloutBatch, temperature: float, batch_size: int, **kwargs) -> tuple[Tensor, list]:
    """log π(a_t|s_t) for a whole rollout in forward batches of ``batch_size``: ((B, T), outputs)."""
    logps, outs = [], []
    for start in range(0, len(batch), batch_size):
        mb = batch.select(slice(start, start + batch_size))
        _, lp, out = policy_forward(model, mb, temperature, **kwargs)
        logps.append(lp.float())
        outs.append(out)
    return torch.cat(logps), outs


from alignkit.models.dropout import disable_dropout  # noqa: E402,F401  π_old and π_θ must be one function


def sequence_kl(kl: Tensor, mask: Tensor) -> Tensor:
    """(B,) Σ_t KL_t over each response: the sequence-level KL the logs and controllers use."""
    return masked_sum(kl, mask, dim=1)


# --------------------------------------------------------------------------------------------
# Loss reductions (explicit, and invariant to how a minibatch is split)
# --------------------------------------------------------------------------------------------


def _token_weights(mask: Tensor) -> tuple[Tensor, Tensor]:
    return mask, mask.sum()


def _sequence_weights(mask: Tensor) -> tuple[Tensor, Tensor]:
    per_token = mask / mask.sum(dim=1, keepdim=True).clamp_min(1)  # (B, T): 1/|y_i| on sequence i's tokens
    return per_token, mask.new_tensor(float(mask.shape[0]))


#: name -> mask (B, T) -> (per-token weights w (B, T), number of units). The minibatch loss is
#: Σ w·ℓ / (units of the whole minibatch), so the reduction does not depend on how it is split.
#: 'token': mean over all response tokens of the minibatch (PPO implementations, DAPO, Dr. GRPO);
#: 'sequence': mean over sequences of each one's token mean (GRPO, Shao et al. 2024, eq. 3).
LOSS_REDUCTIONS: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "token": _token_weights,
    "sequence": _sequence_weights,
}


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

#: Added per process index to the sampling seed (:meth:`OnlineLoop.sampling_seed`).
PROCESS_SEED_STRIDE = 100_000_007


class OnlineLoop:
    """Engine, optimizer, schedule, timers, logging and checkpoints of one online run, plus
    :meth:`update`, the minibatch loop every online method shares."""

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, run: RunConfig, rollout: RolloutConfig,
                 n_prompts: int, name: str, config=None):
        if n_prompts == 0:
            raise ValueError(f"{name}: no prompts")
        self.optim, self.run, self.rollout, self.name, self.n_prompts = optim, run, rollout, name, n_prompts
        self.acc = make_accelerator(run, model=model)
        self.num_rollouts = rollout.num_rollouts or max(1, math.ceil(optim.epochs * n_prompts / rollout.prompts_per_rollout))
        self.minibatch = optim.batch_size * optim.grad_accum  # episodes per optimizer step, per process
        # Episodes of the largest share (prompts_for deals prompts out in turn, with all their
        # samples); every process runs the steps and micro-batches this share needs.
        self.max_local = math.ceil(rollout.prompts_per_rollout / self.acc.num_processes) * rollout.samples_per_prompt
        self.steps_per_rollout = rollout.ppo_epochs * math.ceil(self.max_local / self.minibatch)
        optimizer = build_optimizer(model, optim)
        self.scheduler = build_scheduler(optimizer, optim, self.num_rollouts * self.steps_per_rollout)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.acc.register_for_checkpointing(self.scheduler)
        self.writer = MetricsWriter(run, self.acc, config)
        self.progress: Progress | None = None
        self.times: dict[str, float] = defaultdict(float)
        self.history: list[dict] = []
        self._state: dict = {}
        self._episodes = 1

    @property
    def device(self):
        return self.acc.device

    def unwrapped(self):
        return self.acc.unwrap_model(self.model)

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
        """Accumulate wall time of a phase (generation, scoring, update) for this rollout."""
        t0 = time.perf_counter()
        yield
        self.times[phase] += time.perf_counter() - t0

    # ---- the minibatch update ----------------------------------------------------------------
    def update(self, batch: RolloutBatch, loss_fn: Callable, reduction: str = "token", k: int = 0,
               extra_loss: Callable | None = None) -> dict[str, float]:
        """``ppo_epochs`` passes over ``batch`` in shuffled minibatches, one optimizer step each.

        ``loss_fn(model, minibatch) -> (losses (b, T), metrics)`` gives per-token losses; they are
        weighted with :data:`LOSS_REDUCTIONS` ``[reduction]`` and divided by the units of the whole
        minibatch (over its micro-batches and processes), so splitting it changes nothing.
        ``extra_loss(model) -> (loss, metrics)`` (PPO-ptx) is added once per optimizer step.
        Returns the metrics averaged over the steps (weighted by units).
        """
        acc, reduce = self.acc, LOSS_REDUCTIONS[reduction]
        batch = batch.to(self.device)
        gen = torch.Generator().manual_seed(self.run.seed * 7919 + k)  # minibatch order: reproducible on resume
        sums: dict[str, float] = defaultdict(float)
        weight = 0.0
        bs = self.optim.batch_size
        largest = self._largest_share(len(batch))
        self._episodes = len(batch)  # this process's share, the weight of its figures in log()
        self.model.train()
        for _ in range(self.rollout.ppo_epochs):
            perm = torch.randperm(len(batch), generator=gen)
            for start in range(0, largest, self.minibatch):
                idx = perm[start : start + self.minibatch]
                # Micro-batches of the largest share at this position: a process with fewer
                # episodes fills its missing slots with a zero-weighted row, so every process
                # makes the same forward/backward calls (DDP pairs them up) and optimizer steps.
                slots = math.ceil(min(self.minibatch, largest - start) / bs)
                micro = [(batch.select(idx[j : j + bs]), 1.0) if j < len(idx) else (batch.select([0]), 0.0)
                         for j in range(0, slots * bs, bs)]
                local_units = sum(float(reduce(m.response_mask)[1]) * w for m, w in micro)
                total_units = acc.reduce(torch.tensor(local_units, device=self.device), reduction="sum").clamp_min(1e-8)
                for j, (mb, w) in enumerate(micro):
                    sync = acc.no_sync(self.model) if j < len(micro) - 1 else nullcontext()
                    with sync, acc.autocast():
                        losses, metrics = loss_fn(self.model, mb)  # (b, T) per token
                        weights, units = reduce(mb.response_mask)
                        loss_sum = masked_sum(losses * weights, mb.response_mask)
                        # × processes: DDP averages gradients; the result is Σ(unit losses)/(all units)
                        loss = loss_sum * (w * acc.num_processes) / total_units
                    acc.backward(loss)
                    u = float(units) * w
                    for name, v in metrics.items():
                        sums[name] += float(v) * u
                    sums["loss"] += float(loss_sum.detach()) * w
                    weight += u
                if extra_loss is not None:
                    with acc.autocast():
                        loss, metrics = extra_loss(self.model)
                    acc.backward(loss)
                    for name, v in metrics.items():
                        sums[name] += float(v) * local_units
                if self.optim.max_grad_norm > 0:
                    norm = acc.clip_grad_norm_(self.model.parameters(), self.optim.max_grad_norm)
                    sums["grad_norm"] += float(norm) * local_units
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        names = sorted(sums)  # the same names on every process: the same loss and options
        *totals, weight = all_reduce_sum([sums[n] for n in names] + [weight])
        return {name: v / max(weight, 1e-8) for name, v in zip(names, totals)}

    def whiten(self, x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
        """:func:`~alignkit.ops.masked_whiten` with μ and σ² (unbiased) over the masked elements of
        *every* process's share of the rollout: the whole-batch statistic, whatever the split.
        With fewer than two masked elements in all there is no variance: ``x`` is returned masked."""
        x64, m64 = x.double(), mask.double()
        n, total, squares = all_reduce_sum([float(m64.sum()), float((x64 * m64).sum()), float((x64**2 * m64).sum())])
        if n <= 1:
            return x * mask
        mean = total / n
        var = (squares - n * mean**2) / (n - 1)
        return (x - mean) * (1.0 / math.sqrt(max(var, 0.0) + eps)) * mask

    def _largest_share(self, n: int) -> int:
        """The most episodes any process holds this rollout (``n`` in a single process)."""
        if self.acc.num_processes == 1:
            return n
        import torch.distributed as dist

        t = torch.tensor([n], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    # ---- logging and checkpoints ---------------------------------------------------------------
    def start(self) -> int:
        """Resume if asked; returns the first rollout to run. Opens the progress bar."""
        start = self._resume() if self.run.resume else 0
        self.progress = Progress(self.name, self.num_rollouts, start, enabled=self.run.progress and self.acc.is_main_process)
        self._t0 = time.perf_counter()
        return start

    def log(self, k: int, row: dict, tokens: int) -> dict:
        """Write the metrics row of rollout ``k`` (plus timings, lr, tokens/s) and reset the timers."""
        total = sum(self.times.values())
        if self.acc.num_processes > 1:
            # Each process measured its share of the rollout: per-episode means over all processes
            # (weighted by each one's episodes), tokens summed; time is the slowest process's.
            names = sorted(key for key, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
            w = float(self._episodes)
            *sums, episodes, tokens = all_reduce_sum([float(row[key]) * w for key in names] + [w, float(tokens)])
            row = {**row, **{key: v / max(episodes, 1e-9) for key, v in zip(names, sums)}}
            import torch.distributed as dist

            slowest = torch.tensor([total], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            total = float(slowest)
        row = {"rollout": k + 1, "optimizer_steps": (k + 1) * self.steps_per_rollout, **row,
               "lr": self.scheduler.get_last_lr()[0],
               **{f"time/{p}": t for p, t in self.times.items()},
               "time/step": total, "tokens_per_s": tokens / max(total, 1e-9)}
        if (k + 1) % max(1, self.run.log_every) == 0 or k + 1 == self.num_rollouts:
            self.writer.write(row, k + 1)
        self.history.append(row)
        self.progress.update(k + 1, float(row.get("loss", float("nan"))), row["tokens_per_s"])
        self.times.clear()
        return row

    def maybe_save(self, k: int) -> None:
        """Checkpoint after rollout ``k`` every ``run.save_every`` rollouts (model, optimizer,
        scheduler, RNG via accelerate, and the :meth:`register_state` objects), written atomically."""
        done = k + 1
        if not self.run.save_every or done % self.run.save_every or done >= self.num_rollouts:
            return
        root = Path(self.run.output_dir) / CHECKPOINT_DIR
        final, tmp = root / f"step-{done}", root / f".tmp-step-{done}"
        if self.acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        if self.acc.is_main_process:
            plain = {name: obj.state_dict() for name, obj in self._state.items()}
            (tmp / "trainer_state.json").write_text(json.dumps(
                {"rollout": done, "num_rollouts": self.num_rollouts, "state": plain, "history": self.history}))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # a checkpoint directory is complete or absent
            old = sorted(root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
            for p in old[: max(0, len(old) - self.run.keep_checkpoints)]:
                shutil.rmtree(p, ignore_errors=True)
        self.acc.wait_for_everyone()

    def register_state(self, state: dict) -> None:
        """Objects with state_dict()/load_state_dict() kept in checkpoints (KL controller, λ);
        call before :meth:`start`."""
        self._state = {k: v for k, v in state.items() if v is not None}

    def _resume(self) -> int:
        ckpt = latest_checkpoint(self.run.output_dir)
        if ckpt is None:
            print(f"[alignkit] resume: no checkpoint in {self.run.output_dir}; starting from scratch")
            return 0
        self.acc.load_state(str(ckpt))
        saved = json.loads((ckpt / "trainer_state.json").read_text())
        if saved["num_rollouts"] != self.num_rollouts:
            raise ValueError(f"resume: {ckpt} was written by a run of {saved['num_rollouts']} rollouts, this run has "
                             f"{self.num_rollouts}; keep the same prompts and rollout settings to resume")
        for name, obj in self._state.items():
            obj.load_state_dict(saved["state"][name])
        self.history = saved.get("history", [])
        print(f"[alignkit] resumed from {ckpt} at rollout {saved['rollout']}/{self.num_rollouts}")
        return int(saved["rollout"])

    def close(self) -> float:
        if self.progress is not None:
            self.progress.close()
        self.writer.close()
        return time.perf_counter() - self._t0
