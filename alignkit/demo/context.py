"""What the demo's stages share: the :class:`Context`, the stage runner, and small I/O and
sampling helpers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.config import ModelConfig, RunConfig

from .config import DemoConfig, Scale


class Stages:
    """Runs the stages in order: prints each one's number, the time so far and the ETA of the whole
    run, and records each stage's wall and CPU time.

    ``expected`` holds each stage's typical seconds (measured; :data:`~alignkit.demo.config.STAGE_SECONDS`).
    The ETA is the expected seconds of the stages still to run, scaled by how this run's finished
    stages compare with their expectation (a slower machine or a loaded one scales them all)."""

    def __init__(self, names: list[str], expected: dict[str, float] | None = None):
        self.names, self.expected = list(names), dict(expected or {})
        self.total, self.n, self.timings, self.cpu = len(self.names), 0, {}, {}
        self.t_start = time.perf_counter()

    def eta(self) -> float | None:
        """Seconds still to go (from the stage about to start), or None when a remaining stage has no
        expectation."""
        left = self.names[self.n :]
        if any(name not in self.expected for name in left):
            return None
        done = [name for name in self.timings if name in self.expected]
        pace = (sum(self.timings[n] for n in done) / sum(self.expected[n] for n in done)) if done else 1.0
        return pace * sum(self.expected[n] for n in left)

    def run(self, name: str, fn: Callable, *args, **kwargs):
        eta = self.eta()
        self.n += 1
        elapsed = time.perf_counter() - self.t_start
        print(f"\n[demo] stage {self.n}/{self.total}: {name}  (elapsed {elapsed:.0f}s"
              + (f"; ETA: about {eta:.0f}s more, the whole run done near {elapsed + eta:.0f}s)" if eta is not None else ")"),
              flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - t0, 2)
        self.cpu[name] = round(time.process_time() - c0, 2)
        print(f"[demo] {name}: {self.timings[name]:.0f}s wall, {self.cpu[name]:.0f}s CPU", flush=True)
        return out


@dataclass
class Context:
    """What the stages share."""

    cfg: DemoConfig
    scale: Scale
    world: object
    out: Path
    tokenizer: object = None
    base_dir: Path | None = None
    sft_dir: Path | None = None
    reward_models: dict[str, Path] = field(default_factory=dict)
    data: dict[str, Path] = field(default_factory=dict)
    policies: dict[str, dict] = field(default_factory=dict)  # name -> {"prompts", "texts", "kl"...}
    rm_report: dict = field(default_factory=dict)
    curves: dict[str, Path] = field(default_factory=dict)  # stage -> metrics.jsonl
    extra: dict = field(default_factory=dict)


def messages(text: str) -> list[dict]:
    """A one-turn chat: the user's ``text``."""
    return [{"role": "user", "content": text}]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def run_config(out: Path, name: str, seed: int) -> RunConfig:
    """The run section of a stage that trains into ``out/name``."""
    # The demo owns its folder: running it again replaces its stages (run.overwrite).
    return RunConfig(output_dir=str(out / name), seed=seed, report_to="jsonl", progress=True, overwrite=True)


#: Sequences generated together when the demo samples a policy. A tiny model's generation step costs
#: little beside its per-step overhead: 612 samples took 2.6 s in batches of 64 and 2.1 s in batches
#: of 256 on one core.
GENERATION_BATCH = 256


def sample(model_dir: Path, tokenizer, prompts, n: int, seed: int, max_new_tokens: int, temperature: float = 1.0):
    """``n`` samples per prompt (consecutive) from the policy in ``model_dir``: (model, generations)."""
    from alignkit.models.loading import load_causal_lm

    model = load_causal_lm(ModelConfig(path=str(model_dir)), trainable=False)
    return model, generate(model, tokenizer, prompts, n, seed, max_new_tokens, temperature)


def generate(model, tokenizer, prompts, n: int, seed: int, max_new_tokens: int, temperature: float = 1.0):
    """``n`` samples per prompt (consecutive) from a loaded policy ``model``: its generations."""
    from alignkit.rollout.generate import SamplingConfig, make_generator

    gen = make_generator(model, tokenizer, SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                                                       generation_batch_size=GENERATION_BATCH))
    return gen.generate([messages(p.text) for p in prompts], n=n, seed=seed)


def sft_samples(ctx: Context, n: int):
    """The SFT policy's ``n`` samples per held-out prompt (seed + 101), the ones best-of-N picks
    from: drawn once and kept, since best-of-N under the critique model judges the same samples."""
    key = ("sft_samples", n)
    if key not in ctx.extra:
        s = ctx.scale
        ctx.extra[key] = sample(ctx.sft_dir, ctx.tokenizer, ctx.world.prompts(split="heldout"), n, ctx.cfg.seed + 101,
                                s.max_new_tokens)[1]
    return ctx.extra[key]
