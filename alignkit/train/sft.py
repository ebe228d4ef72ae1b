"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

    L_SFT(θ) = − Σ_t log π_θ(y_t | x, y_<t) / (number of response tokens)

The loss covers response tokens only (the prompt is context, not a target), averaged per token
over the whole global batch. With ``run.padding_free`` the examples of a micro-batch are packed
into one row (position ids restart per example; attention never crosses examples), so no compute
goes to padding; a model that cannot be served exactly that way is refused (docs/batching.md).
"""

from __future__ import annotations

from alignkit.context import entry

import math
from dataclasses import dataclass, field

import torch

from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from alignkit.models.heads import forward_logps
from alignkit.models.loading import load_causal_lm, load_tokenizer, save_model
from alignkit.train.common import check_batching, choose_logps_path, prepare_data, seed_everything
from alignkit.train.loop import Task, Trainer


@dataclass
class SFTConfig:
    """`alignkit sft`: supervised fine-tuning on prompt/completion or chat `messages` records."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to fine-tune."""
    data: DataConfig = field(default_factory=DataConfig)
    """Demonstrations."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and batch sizes."""
    run: RunConfig = field(default_factory=RunConfig)
    """Output, checkpoints, logging."""


def sft_batch_loss(model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of response-token NLL in the batch (the loop divides by the global token count)."""
    logps, mask = forward_logps(model, batch)  # (B, T-1) each
    n = mask.sum().clamp_min(1)
    nll_sum = -(logps * mask).sum()
    return nll_sum, {"nll": float(nll_sum.detach() / n)}


def response_tokens(batch: dict) -> float:
    return float((batch["labels"][:, 1:] != -100).sum())


def heldout_nll(model, items: list[dict], pad_id: int, batch_size: int = 16) -> dict[str, float]:
    """Mean per-token NLL and perplexity of the responses of ``items``."""
    from alignkit.data import collate_sft

    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    for i in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate_sft(items[i : i + batch_size], pad_id).items() if torch.is_tensor(v)}
        with torch.no_grad():
            logps, mask = forward_logps(model, batch)
        total += float(-(logps * mask).sum())
        count += float(mask.sum())
    nll = total / max(count, 1.0)
    return {"nll": nll, "ppl": math.exp(min(nll, 50.0))}


def build_sft_task(items: list[dict], eval_items: list[dict], pad_id: int, padding_free: bool) -> Task:
    from alignkit.data import collate_sft, pack_sft

    if padding_free:
        def collate(batch_items):
            # The whole micro-batch becomes one padding-free row.
            (row,) = pack_sft(batch_items, max_tokens=sum(len(it["input_ids"]) for it in batch_items))
            return row
    else:
        def collate(batch_items):
            return collate_sft(batch_items, pad_id)
    evaluate = (lambda m: heldout_nll(m, eval_items, pad_id)) if eval_items else None
    return Task(items=items, collate=collate, loss=sft_batch_loss, units=response_tokens, evaluate=evaluate, name="sft")


@entry("sft")
def run_sft(cfg: SFTConfig):
    """Fine-tune ``cfg.model.path`` on ``cfg.data`` and save a plain HF directory to ``cfg.run.output_dir``."""
    seed_everything(cfg.run.seed)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, cfg.run.seed, expect=("SFTExample",), name="sft")
    model = load_causal_lm(cfg.model)
    check_batching("padding_free" if cfg.run.padding_free else "padded", model)
    choose_logps_path(model, cfg.run.logps_path)
    task = build_sft_task(data.train, data.eval, tokenizer.pad_token_id, cfg.run.padding_free)
    trainer = Trainer(model, task, cfg.optim, cfg.run, config=cfg)
    result = trainer.fit()
    trainer.save_final(lambda out: save_model(trainer.unwrapped(), tokenizer, out))
    return result


def text_items(tokenizer, texts: list[str], max_length: int = 256) -> list[dict]:
    """Plain-text items for causal-LM training on every token (pretraining, PPO-ptx): the data
    layer's ``text`` format (each text followed by EOS, cut to ``max_length`` tokens). Same item
    shape as SFT items, so the same collate and loss apply."""
    from alignkit.data import TextExample, tokenize_records

    return tokenize_records([TextExample(t) for t in texts], tokenizer, max_length=max_length)[0]
