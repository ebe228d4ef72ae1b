"""Critique (generative) reward models: an LM instruction-tuned to write an evaluative critique of
two responses, or of one, ending in a verdict (the third reward-model architecture beside the
scalar classifier and the regression model). See docs/critic.md.

Training is SFT (the shared loop, :mod:`alignkit.train.sft`'s loss) on critique records rendered
with one template (:class:`CritiqueTemplate`):

    prompt (a user turn)                                    completion (the target)
    -----------------------------------------------------   -----------------------
    Critique responses A and B, then give a verdict: A or B.  {critique}
                                                              Verdict: {A|B}
    Conversation: {conversation}
    Response A: {response_a}
    Response B: {response_b}

and for one response ``Critique the response, then give a verdict: a score from 1 to
{max_score}.`` with ``Response: {response}`` and ``Verdict: {score}``. The loss covers the
critique and the verdict, so the model reasons first and decides last; ``verdict_weight`` weights
the verdict's tokens (L = Σ_t w_t·NLL_t / Σ_t w_t). At scoring time
(:class:`alignkit.rollout.critique.CritiqueReward`) the critique is generated, cut at ``Verdict:``,
and the verdict read from the probabilities the model gives each verdict option there.

The template is saved next to the model (``critic.json``) so a scorer always uses the one the
critic was trained with. ``extend_vocab`` adds whole-word tokens for the critiques' frequent words
when the tokenizer splits them into many pieces (tiny tokenizers trained on other text).
"""

from __future__ import annotations

from alignkit.context import entry

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig
# The template lives with the data (its scorer in rollout/ reads it too); re-exported here.
from alignkit.data.critique_template import TEMPLATE_FILE, CritiqueTemplate, conversation_text  # noqa: F401
from alignkit.data.records import CritiquePair, CritiquePoint, SFTExample
from alignkit.data.report import DataError

if TYPE_CHECKING:
    from alignkit.train.loop import Task

_WORD = re.compile(r"[A-Za-z]{4,}")


def critique_sft_example(record: CritiquePair | CritiquePoint, template: CritiqueTemplate) -> SFTExample:
    """One critique record as the SFT demonstration the critic is trained on."""
    if isinstance(record, CritiquePair):
        prompt = template.pair_prompt(record.prompt, record.response_a, record.response_b)
        return SFTExample(prompt, template.completion(record.critique, record.verdict), source=record.source)
    if isinstance(record, CritiquePoint):
        if not 1 <= record.score <= template.max_score:
            raise DataError(f"{record.source}: score {record.score} is outside the critic's scale 1..{template.max_score}; "
                            "set max_score to the top of your scale")
        prompt = template.point_prompt(record.prompt, record.response)
        return SFTExample(prompt, template.completion(record.critique, str(record.score)), source=record.source)
    raise TypeError(f"expected a CritiquePair or CritiquePoint, got {type(record).__name__}")


# --------------------------------------------------------------------------------------------
# `alignkit critic`
# --------------------------------------------------------------------------------------------


@dataclass
class CriticConfig:
    """`alignkit critic`: train a critique (generative) reward model by SFT on written critiques
    (formats critique_pair: prompt, response_a, response_b, critique, verdict; critique_point:
    prompt, response, critique, score)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The LM to fine-tune into a critic, usually the SFT policy."""
    data: DataConfig = field(default_factory=DataConfig)
    """Critique records (critique_pair or critique_point); eval_path / eval_size hold some out."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and batch sizes (an example is one critique)."""
    run: RunConfig = field(default_factory=RunConfig)
    """Output, checkpoints, logging."""
    template: CritiqueTemplate = field(default_factory=CritiqueTemplate)
    """The critic's prompt template and verdict options (saved with the critic as critic.json)."""
    mix_path: str = ""
    """A second training file in a critique format whose records are added to data.path's (e.g. pointwise critiques beside pairwise ones)."""
    extend_vocab: int = 0
    """Add up to this many whole-word tokens to the tokenizer (the critiques' frequent words it splits into 3+ pieces) and learn their embeddings; for small tokenizers trained without the critique vocabulary (0 = keep the tokenizer)."""
    verdict_weight: float = 1.0
    """Loss weight of the verdict tokens relative to the critique's (a verdict is one token among dozens; > 1 teaches the decision faster)."""
    eval_verdicts: int = 64
    """After training, generate critiques for up to this many held-out records of each form and report verdict accuracy and position bias (0 = skip)."""
    max_new_tokens: int = 96
    """Longest generated critique (tokens) when evaluating verdicts."""

    def validate(self) -> None:
        self.template.validate()
        if self.extend_vocab and self.model.lora:
            raise ValueError("extend_vocab needs trainable embeddings: use it without model.lora")
        if self.verdict_weight <= 0:
            raise ValueError(f"verdict_weight must be > 0, got {self.verdict_weight}")


def load_critique_records(data: DataConfig, seed: int, mix_path: str = "") -> tuple[list, list, object]:
    """Train and held-out critique records of ``data`` (plus ``mix_path``'s, added to training)."""
    from alignkit.data import load_dataset_records
    from alignkit.train.common import eval_source

    if not data.path:
        raise ValueError("critic: set data.path to a file of critiques (see `alignkit critic --help`)")
    common = dict(format=None if data.format == "auto" else data.format, split=data.split, limit=data.limit or None,
                  shuffle=data.shuffle, seed=seed, strict=data.strict)
    eval_path, eval_split = eval_source(data)
    train, evals, report = load_dataset_records(
        data.path, eval_fraction=0.0 if eval_path else data.eval_fraction,
        eval_size=None if eval_path or not data.eval_size else data.eval_size, **common)
    print(f"[alignkit] critic data:\n{report.summary()}")
    if eval_path:
        evals, _, eval_report = load_dataset_records(eval_path, **{**common, "split": eval_split})
        print(f"[alignkit] critic eval data:\n{eval_report.summary()}")
    if mix_path:
        mixed, _, mix_report = load_dataset_records(mix_path, **{**common, "format": None})
        print(f"[alignkit] critic extra data:\n{mix_report.summary()}")
        train = train + mixed
    wrong = {type(r).__name__ for r in train + evals} - {"CritiquePair", "CritiquePoint"}
    if wrong:
        raise ValueError(f"critic: the data holds {', '.join(sorted(wrong))} records but `alignkit critic` trains on "
                         "critiques (formats critique_pair, critique_point); set data.format or use the matching command")
    return train, evals, report


def vocabulary_additions(texts: list[str], tokenizer, k: int, min_pieces: int = 3) -> list[str]:
    """The ``k`` words of ``texts`` whose own token would save the most tokens: words the tokenizer
    splits into ``min_pieces`` or more pieces, ranked by count × (pieces − 2) (as a whole-word
    token a word costs 2: the space and the word)."""
    counts = Counter(w for t in texts for w in _WORD.findall(t))
    saved = {}
    for word, count in counts.items():
        pieces = len(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
        if pieces >= min_pieces:
            saved[word] = count * (pieces - 2)
    return sorted(saved, key=lambda w: (-saved[w], w))[:k]


def extend_tokenizer(tokenizer, words: list[str]) -> int:
    """Add ``words`` as whole-word tokens (matched only as whole words); returns how many were new."""
    from tokenizers import AddedToken

    return tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=False) for w in words])


def mark_verdicts(items: list[dict], examples: list[SFTExample], tokenizer, template: CritiqueTemplate) -> list[dict]:
    """Add ``verdict_tokens`` to each tokenised SFT item: how many of its label tokens just before
    the end of turn are the verdict (0 when truncation cut the verdict off), and
    ``end_tokens``: how many label tokens follow the verdict (the end of turn and trailer)."""
    from alignkit.data.tokenize import encode_responses

    # the responses as the data layer tokenised them, and their starts up to the verdict prefix (each
    # with the end of turn): their common start precedes the verdict, the head's rest is the end
    prompts = [ex.prompt for ex in examples]
    fulls = encode_responses(tokenizer, prompts, [ex.completion for ex in examples])
    heads = encode_responses(tokenizer, prompts, [ex.completion.rsplit(template.verdict_prefix, 1)[0]
                                                  + template.verdict_prefix for ex in examples])
    for item, full, head in zip(items, fulls, heads):
        n = 0
        while n < min(len(full), len(head)) and full[n] == head[n]:
            n += 1
        end = len(head) - n
        labelled = sum(t != -100 for t in item["labels"])
        whole = labelled == len(full) and full[len(full) - end:] == head[n:]  # not truncated
        item["verdict_tokens"] = len(full) - n - end if whole else 0
        item["end_tokens"] = end
    return items


def build_critic_task(items: list[dict], eval_items: list[dict], pad_id: int, verdict_weight: float) -> Task:
    """SFT on critiques with the verdict tokens weighted ``verdict_weight``:

        L = Σ_t w_t · (− log π(y_t | x, y_<t)) / Σ_t w_t,   w_t = verdict_weight on verdict tokens, else 1

    summed over the response tokens of the global batch (the loop divides by Σ w_t), so with weight
    1 it is exactly SFT's per-token loss."""
    import torch

    from alignkit.data import collate_sft
    from alignkit.models.heads import forward_logps
    from alignkit.train.loop import Task
    from alignkit.train.sft import heldout_nll

    def collate(batch_items):
        batch = collate_sft(batch_items, pad_id)
        verdict = torch.zeros(batch["labels"].shape, dtype=torch.bool)  # (B, T)
        for i, it in enumerate(batch_items):
            end = len(it["input_ids"]) - it.get("end_tokens", 1)  # end of turn; the verdict comes right before it
            verdict[i, end - it.get("verdict_tokens", 0) : end] = True
        batch["verdict_mask"] = verdict
        batch["loss_weights"] = (batch["labels"] != -100).float() * torch.where(verdict, verdict_weight, 1.0)
        return batch

    def loss(model, batch):
        logps, mask = forward_logps(model, batch)  # (B, T-1): position t scores token t+1
        w = batch["loss_weights"][:, 1:]  # (B, T-1) aligned with the predicted tokens
        verdict = batch["verdict_mask"][:, 1:] & mask
        nll = -logps.detach()
        metrics = {"nll": float((nll * mask).sum() / mask.sum().clamp_min(1))}
        if verdict.any():
            metrics["verdict_nll"] = float((nll * verdict).sum() / verdict.sum())
        return -(logps * w).sum(), metrics

    def units(batch):
        return float(batch["loss_weights"][:, 1:].sum())

    evaluate = (lambda m: heldout_nll(m, eval_items, pad_id)) if eval_items else None
    return Task(items=items, collate=collate, loss=loss, units=units, evaluate=evaluate, name="critic")


def critic_metrics(reward, records: list, limit: int = 0) -> dict[str, float]:
    """Verdict quality of a :class:`~alignkit.rollout.critique.CritiqueReward` on held-out records.

    Pairwise records are judged in both orders: ``verdict_accuracy`` is the accuracy of the verdict
    in the order given, ``verdict_accuracy_averaged`` with both orders averaged, ``position_bias``
    and ``order_consistency`` as in :func:`alignkit.rollout.critique.order_stats`. Pointwise
    records give ``score_accuracy`` (most probable score = label) and ``score_mae`` (|expected
    score − label|). ``limit`` > 0 uses at most that many records of each form.
    """
    from alignkit.rollout.critique import order_stats

    pairs = [r for r in records if isinstance(r, CritiquePair)]
    points = [r for r in records if isinstance(r, CritiquePoint)]
    if limit:
        pairs, points = pairs[:limit], points[:limit]
    out: dict[str, float] = {}
    if pairs:
        results = reward.judge([r.prompt for r in pairs], [r.response_a for r in pairs],
                               [r.response_b for r in pairs], both_orders=True)
        labels = [r.verdict for r in pairs]
        out["verdict_accuracy"] = sum((x["p_first"] >= 0.5) == (y == "A") for x, y in zip(results, labels)) / len(pairs)
        out["verdict_accuracy_averaged"] = sum(x["verdict"] == y for x, y in zip(results, labels)) / len(pairs)
        out.update(order_stats(results))
        out["n_pairs"] = len(pairs)
    if points:
        rated = reward.rate([r.prompt for r in points], [r.response for r in points])
        out["score_accuracy"] = sum(x["verdict"] == str(r.score) for x, r in zip(rated, points)) / len(points)
        out["score_mae"] = sum(abs(x["score"] - r.score) for x, r in zip(rated, points)) / len(points)
        out["n_points"] = len(points)
    return out


@entry("critic")
def run_critic(cfg: CriticConfig):
    """Fine-tune ``cfg.model.path`` into a critic on ``cfg.data``; save it with its template to
    ``cfg.run.output_dir``; report held-out verdict accuracy and position bias."""
    from alignkit.data import tokenize_records
    from alignkit.models.loading import load_causal_lm, load_tokenizer, save_model
    from alignkit.rollout.critique import CritiqueReward
    from alignkit.train.common import check_batching, choose_logps_path, seed_everything
    from alignkit.train.loop import Trainer
    from alignkit.train.sft import build_sft_task

    seed_everything(cfg.run.seed)
    template = cfg.template
    template.validate()
    tokenizer = load_tokenizer(cfg.model)
    train_records, eval_records, report = load_critique_records(cfg.data, cfg.run.seed, cfg.mix_path)
    lengths = dict(max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
    train_examples = [critique_sft_example(r, template) for r in train_records]
    added = 0
    if cfg.extend_vocab:
        texts = [e.prompt[-1]["content"] + "\n" + e.completion for e in train_examples]
        words = vocabulary_additions(texts, tokenizer, cfg.extend_vocab)
        added = extend_tokenizer(tokenizer, words)
        print(f"[alignkit] critic: added {added} whole-word tokens to the tokenizer: {' '.join(words[:12])}"
              + (" ..." if len(words) > 12 else ""))
    train, _ = tokenize_records(train_examples, tokenizer, report=report, **lengths)
    train = mark_verdicts(train, train_examples, tokenizer, template)
    evals, _ = tokenize_records([critique_sft_example(r, template) for r in eval_records], tokenizer, **lengths)
    print(f"[alignkit] critic: {len(train)} train / {len(evals)} eval critiques; truncated {report.truncated} "
          "(truncation keeps the end of the critic's prompt: raise data.max_length / max_prompt_length if many)")
    model = load_causal_lm(cfg.model)
    if added:
        model.resize_token_embeddings(len(tokenizer))  # the new rows are learned with the rest
    choose_logps_path(model, cfg.run.logps_path)
    if cfg.run.padding_free and cfg.verdict_weight != 1.0:
        raise ValueError("critic: run.padding_free needs verdict_weight=1 (the verdict weights need padded batches)")
    if cfg.run.padding_free:
        check_batching("padding_free", model)
        task = build_sft_task(train, evals, tokenizer.pad_token_id, padding_free=True)
        task.name = "critic"
    else:
        task = build_critic_task(train, evals, tokenizer.pad_token_id, cfg.verdict_weight)
    trainer = Trainer(model, task, cfg.optim, cfg.run, config=cfg)
    result = trainer.fit()
    critic = trainer.unwrapped()

    def write(out):
        save_model(critic, tokenizer, out)
        template.save(out)

    trainer.save_final(write)
    if not trainer.acc.is_main_process:
        return result
    if cfg.eval_verdicts and eval_records:
        reward = CritiqueReward(critic, tokenizer, template=template, max_new_tokens=cfg.max_new_tokens,
                                max_prompt_length=cfg.data.max_prompt_length)
        metrics = critic_metrics(reward, eval_records, cfg.eval_verdicts)
        result.final_eval.update({f"eval/{k}": v for k, v in metrics.items()})
        (Path(cfg.run.output_dir) / "critic_eval.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        print("[alignkit] critic held-out: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in metrics.items()))
    return result
