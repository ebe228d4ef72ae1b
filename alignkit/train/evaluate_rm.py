"""`alignkit eval-rm` (reward-model accuracy on comparisons) and `alignkit score` (score rows)."""

from __future__ import annotations

from alignkit.context import entry

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config import DataConfig, ModelConfig


@dataclass
class EvalRMConfig:
    """`alignkit eval-rm`: accuracy of a reward model on a pairwise file, overall and per margin bucket."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The reward model directory (output of `alignkit rm`)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(shuffle=False))
    """Comparisons to evaluate on (any pairwise format): `data.eval_path` / `data.eval_split` if set (the held-out data `alignkit rm` used), else `data.path`."""
    split_eval: bool = False
    """Evaluate only the held-out part of `data.path` that `data.eval_fraction`/`eval_size` carves out (with `seed`), as `alignkit rm` did."""
    seed: int = 0
    """Seed of the shuffle that made the train/eval split (must match the one `alignkit rm` used)."""
    batch_size: int = 16
    """Pairs scored per forward pass."""
    batching: str = "auto"
    """How pairs go through the model: prefix_shared (one row prompt ‖ chosen ‖ rejected per pair, the prompt computed once), padded, padding_free; auto = prefix_shared where the model is served exactly (docs/batching.md), else padded. Every batching gives the same scores."""
    output: str = ""
    """Write the metrics as JSON here (empty = print only)."""


@dataclass
class ScoreConfig:
    """`alignkit score`: score (prompt, response) rows with a reward model; writes JSONL with a `score` field."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The reward model directory (output of `alignkit rm`)."""
    data: DataConfig = field(default_factory=lambda: DataConfig(shuffle=False))
    """Rows with `prompt` and `response` (a `score` field, if present, is not used: it is written out as `label`)."""
    batch_size: int = 32
    """About this many rows scored per forward pass (rows are length-sorted; responses to one prompt share one row prompt ‖ y_1 ‖ … ‖ y_K where exact and cheaper, docs/batching.md). Every batching gives the same scores."""
    output: str = "scores.jsonl"
    """Output JSONL file: each input row's prompt and response with its `score`."""


@entry("eval-rm")
def run_eval_rm(cfg: EvalRMConfig) -> dict:
    from alignkit.data import load_dataset_records, tokenize_records
    from alignkit.data.formats import DEFAULT_MARGIN_LABELS
    from alignkit.models.heads import ScalarHead, check_reward_convention
    from alignkit.models.loading import load_reward_model, load_tokenizer
    from alignkit.train.common import eval_source
    from alignkit.train.rm import pairwise_metrics, score_pairs, scoring_batching

    tokenizer = load_tokenizer(cfg.model)
    head = ScalarHead(load_reward_model(cfg.model))
    check_reward_convention(head, cfg.model.path)
    d = cfg.data
    eval_path, eval_split = eval_source(d)
    if eval_path and cfg.split_eval:
        raise ValueError("eval-rm: split_eval=true carves the evaluation pairs out of data.path, and data.eval_path / "
                         "eval_split name other ones: give only one")
    train, held, report = load_dataset_records(
        eval_path or d.path, format=None if d.format == "auto" else d.format, split=eval_split or d.split,
        limit=d.limit or None, shuffle=d.shuffle or cfg.split_eval, seed=cfg.seed,
        eval_fraction=d.eval_fraction if cfg.split_eval else 0.0,
        eval_size=(d.eval_size or None) if cfg.split_eval else None,
        margin_labels=d.margin_labels or None, strict=d.strict,
    )
    records = held if cfg.split_eval else train
    if cfg.split_eval and not records:
        raise ValueError("eval-rm: split_eval=true but data.eval_fraction/eval_size leave no held-out pairs")
    items, _ = tokenize_records(records, tokenizer, max_length=d.max_length, max_prompt_length=d.max_prompt_length, report=report)
    print(report.summary())
    batching = scoring_batching(head.model, cfg.batching)
    print(f"[alignkit] eval-rm: {len(items)} pairs, batching {batching}")
    chosen, rejected = score_pairs(head, items, tokenizer.pad_token_id, cfg.batch_size, batching)
    # Bucket names: the numeric margin, with the label(s) that map to it (0 is also "no margin").
    names: dict[float, list[str]] = {}
    for k, v in {**DEFAULT_MARGIN_LABELS, **(d.margin_labels or {})}.items():
        names.setdefault(float(v), []).append(k)
    labels = {m: f"margin={m:g} ({'/'.join(ks)})" if m != 0 else "margin=0" for m, ks in names.items()}
    metrics = pairwise_metrics(chosen, rejected, [it["margin"] for it in items], labels)
    print(json.dumps(metrics, indent=2))
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(json.dumps(metrics, indent=2))
    return metrics


@entry("score")
def run_score(cfg: ScoreConfig) -> Path:
    from alignkit.data import RatedExample, ResponseExample, load_dataset_records
    from alignkit.rollout.rewards import RewardModel

    d = cfg.data
    if not d.path:
        raise ValueError("score: set data.path to a file of (prompt, response) rows")
    # Rows with and without a score may mix: the score is not used, only passed through as `label`.
    records, _, report = load_dataset_records(d.path, format=None if d.format == "auto" else d.format,
                                              split=d.split, limit=d.limit or None, shuffle=False, strict=d.strict,
                                              kinds=(RatedExample, ResponseExample))
    wrong = sorted({type(r).__name__ for r in records} - {"RatedExample", "ResponseExample"})
    if wrong:
        raise ValueError(f"score: {d.path} is format '{report.format}', which gives {', '.join(wrong)} records; `alignkit "
                         "score` scores rows with `prompt` and `response` (formats response, or ratings whose score is "
                         "passed through as `label`)")
    print(report.summary())
    rm = RewardModel(cfg.model.path, batch_size=cfg.batch_size,
                     max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
    scores = rm([r.prompt for r in records], [r.response for r in records]) if records else torch.zeros(0)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for r, s in zip(records, scores.tolist()):
            label = r.score if isinstance(r, RatedExample) else None
            f.write(json.dumps({"prompt": r.prompt, "response": r.response, "score": s, "label": label, "source": r.source}) + "\n")
    print(f"[alignkit] wrote {len(records)} scores to {out} (mean {float(scores.mean()) if len(scores) else float('nan'):.4f})")
    return out
