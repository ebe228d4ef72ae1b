"""Rejection-sampling fine-tuning (Llama 2, Touvron et al. 2023, §3.2.3).

Each round:

1. sample N responses per prompt from the current policy (temperature T: Llama 2 finds the best
   of N improves with a higher temperature, as the samples are more diverse);
2. score them with the reward and keep the best one per prompt, argmax_i r(x, y_i) (a response
   that never ended has ``reward.unfinished_penalty`` subtracted first);
3. fine-tune the policy on the kept (x, y*) pairs with the SFT loss (the shared offline loop),
   so the next round samples from the improved policy.

The gap between the best and the mean score (``reward/best − reward/mean``) is the improvement
a round can buy; metrics are defined in docs/rl.md.
"""

from __future__ import annotations

from alignkit.context import entry

import os

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from alignkit.data import IGNORE_INDEX
from alignkit.models.loading import load_causal_lm, save_model
from alignkit.rollout.generate import Generations, SamplingConfig, make_generator
from alignkit.rollout.rewards import RewardSource
from alignkit.train.common import choose_logps_path
from alignkit.train.engine import full_weights
from alignkit.train.loop import Trainer
from alignkit.train.online import OnlineResult, RewardConfig, online_inputs, score_responses
from alignkit.train.progress import MetricsWriter
from alignkit.train.sft import build_sft_task


@dataclass
class RSConfig:
    """`alignkit rs`: rejection sampling: sample N responses per prompt, keep the best under the reward, fine-tune on them."""

    UNREAD = {  # not a field: options of the shared sections this command never reads
        "data.eval_path": "rejection sampling does not evaluate", "data.eval_fraction": "rejection sampling does not evaluate",
        "data.eval_size": "rejection sampling does not evaluate", "data.eval_split": "rejection sampling does not evaluate",
        "run.padding_free": "the best samples are fine-tuned padded",
    }

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to start from (usually the SFT model)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts: any data file with a prompt (only the prompts are used)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, epochs=1.0))
    """Optimiser of each round's fine-tuning on the kept responses (epochs = passes over them)."""
    run: RunConfig = field(default_factory=RunConfig)
    """Output and logging; round r's fine-tuning logs go to output_dir/round-r."""
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0))
    """How the N candidates are sampled (temperature: higher gives more diverse candidates)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward models and their combination (command line), penalty for unfinished responses."""
    num_samples: int = 8
    """N: responses sampled per prompt; the best one is kept."""
    rounds: int = 1
    """Sample → select → fine-tune rounds (Llama 2 ran several, each from the latest policy)."""
    prompts_per_round: int = 0
    """Prompts sampled per round (0 = all of them every round)."""

    def validate(self) -> None:
        if self.num_samples < 1 or self.rounds < 1:
            raise ValueError("num_samples and rounds must be >= 1")


def select_best(gens: Generations, scores: torch.Tensor, n: int) -> tuple[list[int], torch.Tensor]:
    """Row index of the best of each prompt's ``n`` consecutive samples, and their scores (G,)."""
    best = scores.view(-1, n).argmax(dim=1)  # (G,) position inside each group
    rows = (torch.arange(best.shape[0]) * n + best).tolist()
    return rows, scores[rows]


def sft_items_from(gens: Generations, rows: list[int]) -> list[dict]:
    """SFT items of the kept samples, built from the sampled token ids themselves (no re-tokenising):
    prompt tokens are context (-100), the response tokens (through EOS) are targets."""
    items = []
    for r in rows:
        prompt, response = gens.prompt_ids[r], gens.response_ids[r]
        items.append({"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response,
                      "length": len(prompt) + len(response)})
    return items


@entry("rs")
def run_rs(cfg: RSConfig, prompts: list[list[dict]] | None = None, reward: RewardSource | None = None) -> OnlineResult:
    """Rejection-sampling fine-tuning of ``cfg.model.path``; saves the policy to ``cfg.run.output_dir``."""
    from alignkit.train.outputs import claim_output_dir

    # Each round's engine checks its own folder (round-r); the final policy's folder is checked
    # here, before any sampling: a finished model in it is refused unless run.overwrite.
    if int(os.environ.get("RANK", "0")) == 0:
        claim_output_dir(cfg.run.output_dir, cfg.run.resume, cfg.run.overwrite)
    tokenizer, prompts, reward = online_inputs(cfg, prompts, reward)
    policy = load_causal_lm(cfg.model)
    choose_logps_path(policy, cfg.run.logps_path)  # the fine-tuning steps' log-probs
    n = cfg.num_samples
    writer_run = replace(cfg.run, report_to="jsonl")  # each round's Trainer reports to the trackers
    history, acc = [], None
    for r in range(cfg.rounds):
        # 1. sample N per prompt
        g = torch.Generator().manual_seed(cfg.run.seed + r)
        count = cfg.prompts_per_round or len(prompts)
        idx = torch.randperm(len(prompts), generator=g)[:count].tolist()
        round_prompts = [prompts[i] for i in idx]
        generator = make_generator(policy, tokenizer, cfg.sampling, cfg.data.max_prompt_length)
        with full_weights(policy):  # FSDP (rounds after the first): gathered for sampling, sharded again after
            gens = generator.generate(round_prompts, n=n, seed=cfg.run.seed * 1_000_003 + r)
        # 2. score and keep the best of each group
        finished = torch.tensor(gens.finished, dtype=torch.bool)
        sample_prompts = [round_prompts[i] for i in gens.prompt_index]
        raw, scores = score_responses(reward, sample_prompts, gens.texts, finished, cfg.reward.unfinished_penalty)
        rows, best = select_best(gens, scores, n)
        # 3. fine-tune on them
        round_run = replace(cfg.run, output_dir=str(Path(cfg.run.output_dir) / f"round-{r + 1}"), resume=False)
        task = build_sft_task(sft_items_from(gens, rows), [], tokenizer.pad_token_id, padding_free=False)
        task.name = f"rs round {r + 1}"
        trainer = Trainer(policy, task, cfg.optim, round_run, accelerator=acc, config=cfg)
        acc = trainer.acc
        result = trainer.fit()
        policy = trainer.unwrapped()
        row = {"round": r + 1, "reward/mean": float(raw.mean()), "reward/best": float(raw[rows].mean()),
               "score/best": float(best.mean()), "unfinished": float((~finished).float().mean()),
               "response_length": float(sum(len(gens.response_ids[i]) for i in rows) / len(rows)),
               "kept": len(rows), "sft/loss": result.history[-1]["loss"] if result.history else float("nan")}
        history.append(row)
        print(f"[alignkit] rs round {r + 1}/{cfg.rounds}: reward mean {row['reward/mean']:.4f} "
              f"best-of-{n} {row['reward/best']:.4f}")
        if acc.is_main_process:
            writer = MetricsWriter(writer_run, acc, config=cfg)  # saves alignkit_config.yaml beside the model
            writer.write(row, r + 1)
            writer.close()
    trainer.save_final(lambda out: save_model(policy, tokenizer, out), cfg.run.output_dir)
    return OnlineResult(output_dir=Path(cfg.run.output_dir), history=history)
