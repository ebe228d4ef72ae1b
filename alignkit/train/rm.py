"""Reward models: a scalar head on an LM backbone (InstructGPT step 2, Llama 2 §3.2.2).

Pairwise (Bradley–Terry) loss with an optional margin from the labels (Llama 2 eq. 2):

    L(φ) = − log σ( r_φ(x, y_w) − r_φ(x, y_l) − m(r) )

Regression on scalar ratings: L(φ) = (r_φ(x, y) − s)². Both read r at the last token of the
conversation as the chat template renders it (end of turn and trailer included). The model starts
from an SFT directory: its unembedding is replaced by a one-output head.

Centring is learned, not subtracted: the pairwise loss adds c · (r_w + r_l)² (Eisenstein et al.
2023; ``center_rewards_coefficient``), since the Bradley–Terry term alone leaves the level of the
rewards free. The saved directory scores the same in alignkit and in plain ``transformers``
(``AutoModelForSequenceClassification`` on ``apply_chat_template`` text): ``reward_scale`` is
folded into the head's weights, nothing is subtracted at read time, and the pad token is one that
cannot end a conversation (:func:`save_reward_model`; docs/templates.md). The mean reward of the
training data is stored as ``alignkit_reward_mean`` for information and folded into the head's
bias where it has one (``reward_mean``: the trained model's exact mean over the first 512
training sequences from one prefix-shared, last-token-read pass, or the mean the training forward
passes computed over the last 512, which costs nothing but was measured while the weights moved).
"""

from __future__ import annotations

from alignkit.context import entry

import copy
import re
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from alignkit.data import collate_pairs, collate_rated
from alignkit.losses import pairwise_rm_loss, regression_rm_loss
from alignkit.models.heads import ScalarHead, sequence_rewards
from alignkit.models.identity import reward_model_marker
from alignkit.models.loading import load_scalar_head_model, load_tokenizer, save_model
from alignkit.models.masks import batching_refusal
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
    center_rewards_coefficient: float = 0.01
    """Pairwise only: weight c of the centring term c·(r_chosen + r_rejected)² that pulls the mean reward toward 0 during training (Eisenstein et al. 2023; TRL's value); 0 = off. Nothing is subtracted at read time."""
    reward_scale: float = 1.0
    """Multiplier folded into the saved head's weights, so every reader (alignkit or plain transformers) gets scaled scores."""
    reward_mean: str = "auto"
    """The mean training reward saved as alignkit_reward_mean (and subtracted from the head's bias where it has one): 'final' (the trained model's mean over the first 256 training pairs or 512 rated rows: one no-grad pass, prefix-shared where exact, each reward read at its last token only; exact), 'training' (the mean over the last 512 training sequences as the training forward passes computed them: no extra pass, but the weights moved while it was measured), 'auto' (final where the head has a bias, since the number then changes the saved scores; else training)."""
    batching: str = "auto"
    """Pairwise only: padded, padding_free (pairs packed in one row), prefix_shared (one row prompt ‖ chosen ‖ rejected per pair, the prompt computed once), auto (padding_free if run.padding_free else padded)."""

    def validate(self) -> None:
        if self.objective not in ("auto", "pairwise", "regression"):
            raise ValueError(f"objective must be auto, pairwise or regression; got {self.objective!r}")
        if self.center_rewards_coefficient < 0:
            raise ValueError(f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}")
        if self.reward_mean not in ("auto", *REWARD_MEANS):
            raise ValueError(f"reward_mean must be auto, {', '.join(REWARD_MEANS)}; got {self.reward_mean!r}")
        self.batching_name()

    def batching_name(self) -> str:
        """The pairwise batching actually used (from ``batching`` and ``run.padding_free``)."""
        return resolve_pair_batching(self.batching, self.run.padding_free)


# ---- losses per batch ------------------------------------------------------------------------


class RewardMean:
    """Mean reward over the latest ``window`` training sequences, collected from the training
    forward passes themselves: no extra pass after training."""

    def __init__(self, window: int):
        self.window, self.parts, self.count = max(1, window), deque(), 0

    def add(self, rewards: torch.Tensor) -> None:
        r = rewards.detach().float()
        self.parts.append((float(r.sum()), r.numel()))
        self.count += r.numel()
        while self.count - self.parts[0][1] >= self.window:  # drop what the window no longer covers
            self.count -= self.parts.popleft()[1]

    @property
    def mean(self) -> float:
        return sum(s for s, _ in self.parts) / self.count if self.count else float("nan")


def pairwise_batch_loss(use_margin: bool, center_coef: float = 0.0, seen: RewardMean | None = None):
    def loss(head, batch):
        # (2B,): chosen block then rejected block; packed rows name each sequence's last token.
        rewards = sequence_rewards(head, batch, ends=batch.get("last_index"))
        if seen is not None:
            seen.add(rewards)
        b = rewards.shape[0] // 2
        margin = batch["margin"] if use_margin else None
        losses, metrics = pairwise_rm_loss(rewards[:b], rewards[b:], margin, center_coef)  # (B,)
        weight = batch["weight"]
        return (losses * weight).sum(), {k: float(v) for k, v in metrics.items()}

    return loss


def regression_batch_loss(seen: RewardMean | None = None):
    def loss(head, batch):
        rewards = sequence_rewards(head, batch)  # (B,)
        if seen is not None:
            seen.add(rewards)
        losses, metrics = regression_rm_loss(rewards, batch["score"])
        return losses.sum(), {k: float(v) for k, v in metrics.items()}

    return loss


# ---- evaluation -------------------------------------------------------------------------------


def scoring_batching(model, batching: str = "auto") -> str:
    """The pair batching for scoring (no gradient) with ``model``: ``auto`` is prefix_shared
    (each prompt computed once, each distinct response once: :func:`score_pairs`) where the model's family and attention
    implementation are served exactly (:func:`~alignkit.models.masks.batching_refusal`), else
    padded; an explicit name is checked and refused if it cannot be exact."""
    if batching == "auto":
        return "prefix_shared" if batching_refusal("prefix_shared", model) is None else "padded"
    resolve_pair_batching(batching, False)  # rejects unknown names
    check_batching(batching, model)
    return batching


def _score_distinct_sequences(head, items: list[dict], pad_id: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`score_pairs` under prefix sharing: (chosen (N,), rejected (N,)) from one reward per
    distinct sequence; ``batch_size`` counts sequences."""
    from alignkit.models.scoring import score_sequences

    index: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}  # (prompt, response) -> row of `distinct`
    distinct: list[dict] = []
    sides = []  # per pair: (index of chosen, index of rejected) in `distinct`
    for it in items:
        pair = []
        for side in ("chosen_ids", "rejected_ids"):
            key = (tuple(it["prompt_ids"]), tuple(it[side]))
            if key not in index:
                index[key] = len(distinct)
                distinct.append({"prompt_ids": it["prompt_ids"], "response_ids": it[side]})
            pair.append(index[key])
        sides.append(pair)
    rewards = score_sequences(head, distinct, pad_id, batch_size, share_prompts=True)  # (S,)
    which = torch.tensor(sides, dtype=torch.long).view(-1, 2)  # (N, 2)
    return rewards[which[:, 0]], rewards[which[:, 1]]


@torch.no_grad()
def score_pairs(head, items: list[dict], pad_id: int, batch_size: int = 16,
                batching: str = "padded") -> tuple[torch.Tensor, torch.Tensor]:
    """Raw rewards of the chosen and rejected responses of pair items: two ``(N,)`` tensors, in
    the order of ``items``.

    Pairs are scored in order of length (less padding per batch) through ``batching`` (see
    :data:`~alignkit.train.common.PAIR_COLLATES`; the caller checks it with
    :func:`scoring_batching`), each reward read at its sequence's last token only. Under
    ``prefix_shared`` each distinct (prompt, response) sequence of the pairs is scored once, all
    responses to a prompt in one row where that is cheaper
    (:func:`~alignkit.models.scoring.score_sequences`): a pair costs its prompt once and its two
    responses, and a ranking of K responses expanded into K(K−1)/2 pairs costs one prompt and K
    responses instead of K(K−1)/2 prompts and K(K−1) responses."""
    if batching == "prefix_shared":
        return _score_distinct_sequences(head, items, pad_id, 2 * batch_size)
    device = next(head.parameters()).device
    collate = PAIR_COLLATES[batching]
    order = sorted(range(len(items)), key=lambda i: items[i]["length"])
    chosen, rejected = torch.empty(len(items)), torch.empty(len(items))
    for i in range(0, len(items), batch_size):
        idx = order[i : i + batch_size]
        batch = {k: v.to(device) for k, v in collate([items[j] for j in idx], pad_id).items() if torch.is_tensor(v)}
        r = sequence_rewards(head, batch, ends=batch.get("last_index")).float().cpu()  # (2b,) chosen then rejected
        chosen[idx], rejected[idx] = r[: len(idx)], r[len(idx) :]
    return chosen, rejected


def score_rated(head, items: list[dict], pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """Raw rewards of rated (or any prompt/response) items, ``(N,)`` in the order of ``items``:
    length-sorted batches, each reward read at its sequence's last token only, a prompt shared by
    several responses computed once where exact and cheaper (:mod:`alignkit.models.scoring`)."""
    from alignkit.models.scoring import score_sequences

    return score_sequences(head, items, pad_id, batch_size)


# ---- the mean training reward --------------------------------------------------------------------

#: Sequences the 'final' mean covers: the first 256 training pairs (512 sequences) or 512 rated rows.
FINAL_MEAN_SEQUENCES = 512


def final_reward_mean(head, items: list[dict], pad_id: int, objective: str, batch_size: int = 16) -> float:
    """The trained model's mean raw reward over the first :data:`FINAL_MEAN_SEQUENCES` training
    sequences (chosen and rejected both): one no-grad pass, pairs prefix-shared where the model is
    served exactly, each reward read at its sequence's last token only. Equal to the mean of
    ``AutoModelForSequenceClassification`` on each sequence alone (tests/test_rm_fast.py). It costs what
    eval-rm costs per pair, not a padded forward (``benchmarks/bench_rm_scoring.py``, docs/batching.md)."""
    if objective == "pairwise":
        sample = items[: FINAL_MEAN_SEQUENCES // 2]
        chosen, rejected = score_pairs(head, sample, pad_id, batch_size, scoring_batching(head.model))
        return float(torch.cat([chosen, rejected]).double().mean())
    return float(score_rated(head, items[:FINAL_MEAN_SEQUENCES], pad_id, batch_size).double().mean())


#: reward_mean -> (head, seen, items, pad_id, objective, batch_size) -> the mean training reward
REWARD_MEANS = {
    "training": lambda head, seen, items, pad_id, objective, batch_size: seen.mean,
    "final": lambda head, seen, items, pad_id, objective, batch_size: final_reward_mean(
        head, items, pad_id, objective, batch_size),
}


def reward_mean_choice(option: str, model) -> str:
    """The ``reward_mean`` actually used for ``model``: ``auto`` is ``final`` where the head has a
    bias (the mean is subtracted from it, so it changes every saved score and must be the final
    model's), else ``training`` (only recorded, for information)."""
    if option != "auto":
        return option
    return "final" if any(linear.bias is not None for linear in _head_linears(model)) else "training"


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


def _evaluator(objective: str, items: list[dict], pad_id: int, batching: str = "padded"):
    if not items:
        return None
    if objective == "pairwise":
        def evaluate(head):
            c, r = score_pairs(head, items, pad_id, batching=batching)
            m = pairwise_metrics(c, r, [it["margin"] for it in items])
            return {"accuracy": m["accuracy"], "margin_mean": m["margin_mean"]}
    else:
        def evaluate(head):
            pred = score_rated(head, items, pad_id)
            target = torch.tensor([it["score"] for it in items])
            return {"mse": float(((pred - target) ** 2).mean())}
    return evaluate


@entry("rm")
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
    # the latest sequences of training (with several processes, of this process's shard): recent
    # enough to describe the final model, many enough to average out the batches
    seen = RewardMean(min(512, (2 if objective == "pairwise" else 1) * len(data.train)))
    if objective == "pairwise":
        batching = PAIR_COLLATES[cfg.batching_name()]
        check_batching(cfg.batching_name(), head.model)
        task = Task(
            items=data.train, collate=lambda b: batching(b, pad),
            loss=pairwise_batch_loss(cfg.use_margin, cfg.center_rewards_coefficient, seen),
            units=lambda b: float(b["weight"].sum()), evaluate=_evaluator("pairwise", data.eval, pad, cfg.batching_name()),
            groups=[it.get("group", -1) for it in data.train] if cfg.data.group_rankings else None, name="rm",
        )
    else:
        if cfg.run.padding_free or cfg.batching not in ("auto", "padded"):
            print("[alignkit] rm: run.padding_free and batching apply to pairwise reward models; ratings use padded batches")
        task = Task(
            items=data.train, collate=lambda b: collate_rated(b, pad), loss=regression_batch_loss(seen),
            units=lambda b: float(b["score"].numel()), evaluate=_evaluator("regression", data.eval, pad), name="rm",
        )
    trainer = Trainer(head, task, cfg.optim, cfg.run, config=cfg)
    result = trainer.fit()
    head = trainer.unwrapped()
    head.eval()
    source = reward_mean_choice(cfg.reward_mean, head.model)
    # On every process, before the main process saves: a sharded model (FSDP) runs a forward only
    # with every process taking part.
    raw_mean = REWARD_MEANS[source](head, seen, data.train, pad, objective, cfg.optim.batch_size)

    def write(out):
        mean = save_reward_model(head.model, tokenizer, out, cfg.reward_scale, raw_mean,
                                 extra_config={"alignkit_objective": objective, "alignkit_reward_mean_from": source,
                                               **reward_model_marker(objective=objective)})
        print(f"[alignkit] saved reward model to {cfg.run.output_dir} (mean training reward {mean:.4f} "
              f"[reward_mean={source}], reward_scale {cfg.reward_scale:g} folded into the head)")

    trainer.save_final(write)
    return result


# ---- saving: one score everywhere -----------------------------------------------------------------

#: Names of special tokens that never occur in text and can serve as padding.
_SPARE = re.compile(r"pad|reserved|unused", re.IGNORECASE)
_PAD = "<|pad|>"


def _head_linears(model) -> list[torch.nn.Linear]:
    """The head's output projection(s): every one-output linear under ``score`` (decoders) or
    ``classifier`` (encoders), the copies a peft wrapper keeps included."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "score", None) or getattr(base, "classifier", None)
    if head is None:
        raise ValueError(f"{type(base).__name__} has neither a `score` nor a `classifier` head")
    return [m for m in head.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1]


def _terminator_ids(tokenizer) -> set[int]:
    """Ids that can end a rendered conversation: EOS and the template's end of turn and trailer."""
    from alignkit.data.tokenize import chat_format

    fmt = chat_format(tokenizer)
    ids = set(tokenizer(fmt.end_of_turn + fmt.trailer, add_special_tokens=False)["input_ids"])
    return ids | {fmt.end_of_turn_id} | ({tokenizer.eos_token_id} - {None})


def reward_pad_token(tokenizer) -> tuple[str, bool]:
    """A pad token for a saved reward model that cannot end a conversation: ``(token, added)``.

    transformers' ``*ForSequenceClassification`` reads the reward at the rightmost token that is
    not ``pad_token_id``; if padding were EOS or the end of turn (pad == eos is common), it would
    read one token early. The tokenizer's own pad token when it is not such a token; else an
    unused special token of the vocabulary (its name says pad, reserved or unused); else a new
    ``<|pad|>`` (``added``: the embeddings need one more row)."""
    taken = _terminator_ids(tokenizer)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in taken:
        return tokenizer.pad_token, False
    reserved = {tokenizer.bos_token_id, tokenizer.unk_token_id} | taken
    spare = sorted((("pad" not in t.lower(), i, t) for t, i in tokenizer.get_added_vocab().items()
                    if _SPARE.search(t) and i not in reserved))
    if spare:
        return spare[0][2], False
    return _PAD, True


def save_reward_model(model, tokenizer, out_dir: str | Path, reward_scale: float = 1.0,
                      reward_mean: float | None = None, extra_config: dict | None = None) -> float:
    """Save a reward model so that plain transformers scores exactly as alignkit does.

    Given ``AutoModelForSequenceClassification`` and the saved tokenizer's
    ``apply_chat_template(conversation)`` text, transformers reads the head at the last
    non-pad token; alignkit reads it at the last token of the same rendering. To make those the
    same number (docs/templates.md):

    - the pad token (config and tokenizer) is one that cannot end a conversation
      (:func:`reward_pad_token`; a new one grows the embeddings by a row);
    - ``reward_scale`` is folded into the head's weights (and bias);
    - the mean training reward ``reward_mean`` (already centred by the training loss) is stored
      as ``alignkit_reward_mean`` after scaling, for information; where the head has a bias it is
      also subtracted from the bias (``alignkit_reward_mean_folded``), which centres exactly when
      ``reward_mean`` is the final model's (``RMConfig.reward_mean``: ``final``, the ``auto``
      choice for such heads);
    - a tokenizer without a chat template gets the plain layout's template
      (``alignkit.models.factory.CHAT_TEMPLATE``), which renders what alignkit trained on;
    - an older alignkit's ``reward_offset``/``reward_scale`` keys (read-time calibration that
      other tools ignore) are removed.

    The model is changed in place (scaled head, maybe a new embedding row); the tokenizer is
    copied. Returns the scaled mean training reward (nan when unknown).
    """
    from alignkit.models.factory import CHAT_TEMPLATE
    from alignkit.models.loading import save_model

    tokenizer = copy.deepcopy(tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    pad, added = reward_pad_token(tokenizer)
    if added:
        tokenizer.add_special_tokens({"pad_token": pad})
    else:
        tokenizer.pad_token = pad
    if tokenizer.pad_token_id >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(tokenizer.pad_token_id + 1)
    mean = float("nan") if reward_mean is None else float(reward_mean) * reward_scale
    folded = False
    with torch.no_grad():
        for linear in _head_linears(model):
            linear.weight.mul_(reward_scale)
            if linear.bias is not None:
                linear.bias.mul_(reward_scale)
                if mean == mean:  # not nan
                    linear.bias.sub_(mean)
                    folded = True
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    for legacy in ("reward_offset", "reward_scale"):
        if hasattr(config, legacy):
            delattr(config, legacy)
    config.pad_token_id = tokenizer.pad_token_id
    info = {"alignkit_reward_mean": None if mean != mean else mean, "alignkit_reward_mean_folded": folded}
    save_model(model, tokenizer, out_dir, extra_config={**info, **(extra_config or {})})
    return mean
