"""Reward models: a scalar head on an LM backbone (InstructGPT step 2, Llama 2 §3.2.2).

Pairwise (Bradley–Terry) loss with an optional margin from the labels (Llama 2 eq. 2):

    L(φ) = − log σ( r_φ(x, y_w) − r_φ(x, y_l) − m(r) )

Regression on scalar ratings: L(φ) = (r_φ(x, y) − s)². Both read r at the last token of the
response. The model starts from an SFT directory: its unembedding is replaced by a one-output
head. After training the rewards are centred: the mean raw reward on the training responses is
stored as ``reward_offset`` in ``config.json`` (with ``reward_scale``), and alignkit reports
``(raw − offset) · scale`` so a saved model scores around 0.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from alignkit.data import collate_pairs, collate_rated
from alignkit.losses import pairwise_rm_loss, regression_rm_loss
from alignkit.models.heads import ScalarHead, reward_calibration, sequence_rewards
from alignkit.models.identity import reward_model_marker
from alignkit.models.loading import load_scalar_head_model, load_tokenizer, save_model
from alignkit.train.common import (
    PAIR_COLLATES, check_batching, prepare_data, resolve_pair_batching, seed_everything,
)
from alignkit.train.loop import Task, Trainer


@dataclass
class RMConfig:
    """`alignkit rm`: train a reward model on comparisons (pairwise) or ratings (regression)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone to start from, usually the SFT model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Comparisons (pairwise, hh, ranked, with optional margins) or ratings."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and batch sizes (batch_size counts pairs, or rankings with data.group_rankings)."""
    run: RunConfig = field(default_factory=RunConfig)
    """Output, checkpoints, logging."""
    objective: str = "auto"
    """'pairwise' (Bradley–Terry on comparisons), 'regression' (MSE on ratings) or 'auto' (from the data)."""
    use_margin: bool = True
    """Subtract the labelled margin m(r) inside the pairwise loss (Llama 2); false ignores margins."""
    center_rewards: bool = True
    """After training, store the mean training reward as `reward_offset` so scores centre on 0."""
    reward_scale: float = 1.0
    """Multiplier applied to centred rewards when scoring (stored in config.json)."""
    batching: str = "auto"
    """Pairwise only: padded, padding_free (pairs packed in one row), prefix_shared (one row prompt ‖ chosen ‖ rejected per pair, the prompt computed once), auto (padding_free if run.padding_free else padded)."""

    def validate(self) -> None:
        if self.objective not in ("auto", "pairwise", "regression"):
            raise ValueError(f"objective must be auto, pairwise or regression; got {self.objective!r}")
        self.batching_name()

    def batching_name(self) -> str:
        """The pairwise batching actually used (from ``batching`` and ``run.padding_free``)."""
        return resolve_pair_batching(self.batching, self.run.padding_free)


# ---- losses per batch ------------------------------------------------------------------------


def pairwise_batch_loss(use_margin: bool):
    def loss(head, batch):
        # (2B,): chosen block then rejected block; packed rows name each sequence's last token.
        rewards = sequence_rewards(head, batch, ends=batch.get("last_index"))
        b = rewards.shape[0] // 2
        margin = batch["margin"] if use_margin else None
        losses, metrics = pairwise_rm_loss(rewards[:b], rewards[b:], margin)  # (B,)
        weight = batch["weight"]
        return (losses * weight).sum(), {k: float(v) for k, v in metrics.items()}

    return loss


def regression_batch_loss(head, batch):
    rewards = sequence_rewards(head, batch)  # (B,)
    losses, metrics = regression_rm_loss(rewards, batch["score"])
    return losses.sum(), {k: float(v) for k, v in metrics.items()}


# ---- evaluation -------------------------------------------------------------------------------


@torch.no_grad()
def score_pairs(head, items: list[dict], pad_id: int, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw rewards of the chosen and rejected responses of pair items: two ``(N,)`` tensors."""

    device = next(head.parameters()).device
    chosen, rejected = [], []
    for i in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(items[i : i + batch_size], pad_id).items() if torch.is_tensor(v)}
        r = sequence_rewards(head, batch)
        b = r.shape[0] // 2
        chosen.append(r[:b].float().cpu())
        rejected.append(r[b:].float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


@torch.no_grad()
def score_rated(head, items: list[dict], pad_id: int, batch_size: int = 16) -> torch.Tensor:

    device = next(head.parameters()).device
    out = []
    for i in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate_rated(items[i : i + batch_size], pad_id).items() if torch.is_tensor(v)}
        out.append(sequence_rewards(head, batch).float().cpu())
    return torch.cat(out)


def pairwise_metrics(chosen: torch.Tensor, rejected: torch.Tensor, margins: list[float], labels: dict[float, str] | None = None) -> dict:
    """Accuracy overall and per margin bucket, and the mean/spread of rewards.

    A pair counts as correct when r(chosen) > r(rejected); ties count half.
    """
    correct = (chosen > rejected).float() + 0.5 * (chosen == rejected).float()
    by_bucket: dict[str, list[float]] = defaultdict(list)
    for c, m in zip(correct.tolist(), margins):
        name = (labels or {}).get(m, f"margin={m:g}")
        by_bucket[name].append(c)
    both = torch.cat([chosen, rejected])
    return {
        "accuracy": float(correct.mean()) if len(correct) else float("nan"),
        "n_pairs": len(correct),
        "accuracy_by_margin": {k: sum(v) / len(v) for k, v in sorted(by_bucket.items())},
        "count_by_margin": {k: len(v) for k, v in sorted(by_bucket.items())},
        "reward_mean": float(both.mean()),
        "reward_std": float(both.std()) if len(both) > 1 else 0.0,
        "margin_mean": float((chosen - rejected).mean()),
    }


def _evaluator(objective: str, items: list[dict], pad_id: int):
    if not items:
        return None
    if objective == "pairwise":
        def evaluate(head):
            c, r = score_pairs(head, items, pad_id)
            m = pairwise_metrics(c, r, [it["margin"] for it in items])
            return {"accuracy": m["accuracy"], "margin_mean": m["margin_mean"]}
    else:
        def evaluate(head):
            pred = score_rated(head, items, pad_id)
            target = torch.tensor([it["score"] for it in items])
            return {"mse": float(((pred - target) ** 2).mean())}
    return evaluate


def run_rm(cfg: RMConfig):
    """Train a reward model and save it (plain HF ``*ForSequenceClassification`` directory)."""
    seed_everything(cfg.run.seed)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, cfg.run.seed, expect=("PreferencePair", "RatedExample"), name="rm")
    kinds = {type(r).__name__ for r in data.train_records}
    objective = cfg.objective
    if objective == "auto":
        objective = "regression" if kinds == {"RatedExample"} else "pairwise"
    needed = "RatedExample" if objective == "regression" else "PreferencePair"
    if kinds != {needed}:
        raise ValueError(f"rm: objective={objective} needs {needed} records, but {cfg.data.path} gave {sorted(kinds)}")
    pad = tokenizer.pad_token_id
    head = ScalarHead(load_scalar_head_model(cfg.model))
    if objective == "pairwise":
        batching = PAIR_COLLATES[cfg.batching_name()]
        check_batching(cfg.batching_name(), head.model)
        task = Task(
            items=data.train, collate=lambda b: batching(b, pad), loss=pairwise_batch_loss(cfg.use_margin),
            units=lambda b: float(b["weight"].sum()), evaluate=_evaluator("pairwise", data.eval, pad),
            groups=[it.get("group", -1) for it in data.train] if cfg.data.group_rankings else None, name="rm",
        )
    else:
        if cfg.run.padding_free or cfg.batching not in ("auto", "padded"):
            print("[alignkit] rm: run.padding_free and batching apply to pairwise reward models; ratings use padded batches")
        task = Task(
            items=data.train, collate=lambda b: collate_rated(b, pad), loss=regression_batch_loss,
            units=lambda b: float(b["score"].numel()), evaluate=_evaluator("regression", data.eval, pad), name="rm",
        )
    trainer = Trainer(head, task, cfg.optim, cfg.run, config=cfg)
    result = trainer.fit()
    if trainer.acc.is_main_process:
        head = trainer.unwrapped()
        head.eval()
        offset = 0.0
        if cfg.center_rewards:
            sample = data.train[:512]
            if objective == "pairwise":
                c, r = score_pairs(head, sample, pad)
                offset = float(torch.cat([c, r]).mean())
            else:
                offset = float(score_rated(head, sample, pad).mean())
        save_model(head.model, tokenizer, cfg.run.output_dir,
                   extra_config={"reward_offset": offset, "reward_scale": cfg.reward_scale, "alignkit_objective": objective,
                                 **reward_model_marker(objective=objective)})
        print(f"[alignkit] saved reward model to {cfg.run.output_dir} (reward_offset={offset:.4f}, reward_scale={cfg.reward_scale})")
    return result


def calibrated(raw: torch.Tensor, head) -> torch.Tensor:
    """Centred and scaled reward from raw head outputs."""
    offset, scale = reward_calibration(head)
    return (raw - offset) * scale
