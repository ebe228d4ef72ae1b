"""Direct preference optimisation (Rafailov et al. 2023) and its variants, on the shared loop.

    L_DPO(θ) = − log σ( β·log π_θ(y_w|x)/π_ref(y_w|x) − β·log π_θ(y_l|x)/π_ref(y_l|x) )

averaged over pairs (weighted by each pair's ``weight``). ``loss_type`` picks the loss from
:data:`alignkit.losses.PREFERENCE_LOSSES` by name: ``sigmoid`` (DPO), ``ipo``, ``cdpo``
(conservative, ``label_smoothing`` = ε), ``robust`` (rDPO), ``hinge`` (SLiC), and the
reference-free ``simpo`` and ``orpo``; ``sft_weight`` adds λ·NLL(y_w) (per-token mean) to any.

One optimizer step, in the order of the code below:

1. **Log-probs of both responses in one forward pass** (``batching``):
   ``padded``: 2B rows ``prompt ‖ chosen`` and ``prompt ‖ rejected``, right padded;
   ``padding_free``: the same 2B sequences packed in one row, no padding;
   ``prefix_shared``: one row ``prompt ‖ chosen ‖ rejected`` per pair, the prompt computed once
   (:mod:`alignkit.data.prefix_sharing`). All three give the same log-probs up to float rounding.
2. **Reference log-probs** (``reference``): a frozen ``copy`` of the initial policy; with LoRA the
   ``adapter``-disabled base (no second copy of the weights); or ``precomputed`` once before
   training in a pass over the data with the same batching (training then holds one model).
3. **Loss per pair** from the table; the loop divides the weighted sum by the total pair weight
   of the global batch, so the update does not depend on how the batch is split.

Metrics (defined in docs/dpo.md): ``rewards/{chosen,rejected,margins,accuracies}``,
``logps/{chosen,rejected}``, ``nll`` and ``kl`` (k1 on the data set's responses, per sequence).
"""

from __future__ import annotations

from alignkit.context import entry

import inspect
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from alignkit.data.prefix_sharing import response_sums
from alignkit.losses import PREFERENCE_LOSSES, preference_loss
from alignkit.models.heads import forward_logps, position_logps
from alignkit.models.loading import Reference, load_causal_lm, load_tokenizer, save_model
from alignkit.ops import sequence_logps
from alignkit.train.common import (
    PAIR_COLLATES, check_batching, check_reference_choice, choose_logps_path, prepare_data, resolve_pair_batching,
    seed_everything,
)
from alignkit.train.loop import Task, Trainer, make_accelerator

REFERENCE_FREE = ("simpo", "orpo")
"""Losses defined without π_ref, on length-normalised (mean per token) log-probs."""


@dataclass
class DPOConfig:
    """`alignkit dpo`: direct preference optimisation (and IPO, cDPO, rDPO, SLiC, SimPO, ORPO) on comparisons."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to train, usually the SFT model; it is also the reference π_ref."""
    data: DataConfig = field(default_factory=DataConfig)
    """Comparisons (pairwise, hh or ranked records)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and batch sizes (batch_size counts pairs)."""
    run: RunConfig = field(default_factory=RunConfig)
    """Output, checkpoints, logging."""
    beta: float = 0.1
    """β: strength of the implicit KL constraint to π_ref (smaller lets the policy move further)."""
    loss_type: str = "sigmoid"
    """Loss by name: sigmoid (DPO), ipo, cdpo, robust, hinge (SLiC), simpo or orpo (the last two reference-free)."""
    label_smoothing: float = 0.0
    """ε, the assumed label-flip rate of cdpo (0 ≤ ε ≤ ½) and robust (0 ≤ ε < ½); other losses need 0."""
    simpo_gamma: float = 0.5
    """γ, SimPO's target reward margin (loss_type=simpo only)."""
    sft_weight: float = 0.0
    """Weight λ of an added NLL term on the chosen response (mean per token); ORPO's paper uses 1."""
    length_normalize: bool = False
    """Use mean instead of summed token log-probs per response (always on for simpo and orpo)."""
    reference: str = "auto"
    """π_ref: copy (frozen copy), adapter (LoRA base with adapters off), precomputed (one pass before training), auto (adapter with LoRA, else copy)."""
    batching: str = "auto"
    """padded, padding_free (pairs packed in one row), prefix_shared (prompt computed once per pair), auto (padding_free if run.padding_free else padded)."""

    def validate(self) -> None:
        if self.loss_type not in PREFERENCE_LOSSES:
            raise ValueError(f"loss_type must be one of {', '.join(PREFERENCE_LOSSES)}; got {self.loss_type!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0; got {self.beta}")
        check_reference_choice(self.reference, self.model.lora)
        self.batching_name()
        takes = inspect.signature(PREFERENCE_LOSSES[self.loss_type]).parameters
        if self.label_smoothing and "label_smoothing" not in takes:
            raise ValueError(f"label_smoothing applies to cdpo and robust, not {self.loss_type}")

    def batching_name(self) -> str:
        """The batching actually used (computed from ``batching`` and ``run.padding_free``)."""
        return resolve_pair_batching(self.batching, self.run.padding_free)

    def loss_options(self) -> dict:
        """Keyword options the chosen loss function takes (label_smoothing, gamma)."""
        takes = inspect.signature(PREFERENCE_LOSSES[self.loss_type]).parameters
        options = {"label_smoothing": self.label_smoothing, "gamma": self.simpo_gamma}
        return {k: v for k, v in options.items() if k in takes}


# ---- 1. log-probs of chosen and rejected in one forward pass ------------------------------------
# Each batching is a collate function and a reader of its forward pass; the reader returns
# (Σ_t log π(y_t|x, y_<t) per sequence (2B,), tokens per sequence (2B,)), chosen block first.


def padded_logps(model, batch: dict) -> tuple[Tensor, Tensor]:
    logps, mask = forward_logps(model, batch)  # (2B, T-1) each, zero outside responses
    return sequence_logps(logps, mask), mask.sum(-1).to(logps.dtype)


def packed_logps(model, batch: dict) -> tuple[Tensor, Tensor]:
    logps, mask = forward_logps(model, batch)  # (1, N-1): all 2B sequences in one row
    n_seq = batch["seq_lens"].shape[0]
    seq = torch.repeat_interleave(torch.arange(n_seq, device=logps.device), batch["seq_lens"])  # (N,)
    seq = seq[1:]  # (N-1,) aligned with the shifted labels: the sequence of the predicted token
    sums = logps.new_zeros(n_seq).index_add(0, seq, logps[0])
    counts = logps.new_zeros(n_seq).index_add(0, seq, mask[0].to(logps.dtype))
    return sums, counts


def prefix_shared_logps(model, batch: dict) -> tuple[Tensor, Tensor]:
    logps = position_logps(model, batch, batch["logit_index"], batch["target_ids"]).logps  # (M,) response tokens
    return response_sums(logps, batch)  # (2B,), (2B,)


@dataclass(frozen=True)
class Batching:
    """How the pairs of a micro-batch go through one forward pass."""

    collate: Callable[[list[dict], int], dict]
    """(pair items, pad id) -> batch tensors."""
    logps: Callable[[torch.nn.Module, dict], tuple[Tensor, Tensor]]
    """(model, batch) -> (sequence log-probs (2B,), response lengths (2B,)), chosen block first."""


BATCHINGS: dict[str, Batching] = {
    name: Batching(PAIR_COLLATES[name], logps)
    for name, logps in (("padded", padded_logps), ("padding_free", packed_logps), ("prefix_shared", prefix_shared_logps))
}


def with_reference_logps(collate: Callable[[list[dict], int], dict]):
    """Wrap a collate function so that precomputed reference log-probs stored in the items
    travel in the batch as ``ref_logps (2B,)`` (chosen block then rejected block)."""

    def wrapped(items, pad_id):
        batch = collate(items, pad_id)
        if "ref_chosen_logps" in items[0]:
            ref = [it["ref_chosen_logps"] for it in items] + [it["ref_rejected_logps"] for it in items]
            batch["ref_logps"] = torch.tensor(ref, dtype=torch.float)  # (2B,)
        return batch

    return wrapped


# ---- 2. reference log-probs -------------------------------------------------------------------


def make_reference(policy, mode: str, loss_type: str) -> Reference | None:
    """The live reference model for ``copy``/``adapter``; None for ``precomputed`` and for the
    reference-free losses (which never read π_ref)."""
    if loss_type in REFERENCE_FREE or mode == "precomputed":
        return None
    return Reference(policy, mode)  # "auto": adapter with LoRA, else copy


def reference_logps(reference: Reference | None, batching: Batching, batch: dict) -> Tensor | None:
    """log π_ref(y|x) per sequence (2B,): precomputed in the batch, or a no-grad forward pass."""
    if "ref_logps" in batch:
        return batch["ref_logps"]
    if reference is None:
        return None
    with torch.no_grad(), reference.active() as ref_model:
        return batching.logps(ref_model, batch)[0]


@torch.no_grad()
def precompute_reference_logps(model, items: list[dict], batching: Batching, pad_id: int,
                               batch_size: int, accelerator=None) -> list[dict]:
    """Copies of ``items`` with ``ref_chosen_logps`` and ``ref_rejected_logps`` (summed log π_ref)
    from one pass of ``model`` (the initial policy, = π_ref) over them, batched as in training."""
    device = next(model.parameters()).device
    # Same autocast as the training step, so the first step's reference log-probs match exactly.
    autocast = accelerator.autocast if accelerator is not None else nullcontext
    was_training = model.training
    model.eval()
    out = [dict(it) for it in items]
    order = sorted(range(len(items)), key=lambda i: items[i]["length"])  # similar lengths: little padding
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        batch = {key: v.to(device) if torch.is_tensor(v) else v for key, v in batching.collate([items[i] for i in idx], pad_id).items()}
        with autocast():
            logps, _ = batching.logps(model, batch)  # (2B,)
        B = len(idx)
        for j, i in enumerate(idx):
            out[i]["ref_chosen_logps"] = float(logps[j])
            out[i]["ref_rejected_logps"] = float(logps[B + j])
    model.train(was_training)
    return out


# ---- 3. the loss per pair ---------------------------------------------------------------------


def dpo_losses(cfg: DPOConfig, logps: Tensor, ref_logps: Tensor | None, counts: Tensor) -> tuple[Tensor, dict]:
    """Per-pair losses (B,) and metrics from sequence log-probs (2B,), chosen block first."""
    B = logps.shape[0] // 2
    lengths = counts.clamp_min(1)  # (2B,)
    average = cfg.length_normalize or cfg.loss_type in REFERENCE_FREE
    policy = logps / lengths if average else logps  # (2B,)
    ref = None  # (2B,) log π_ref, the same normalisation as the policy's
    if ref_logps is not None and cfg.loss_type not in REFERENCE_FREE:
        ref = ref_logps / lengths if average else ref_logps
    losses, metrics = preference_loss(
        cfg.loss_type,
        policy[:B], policy[B:],
        None if ref is None else ref[:B], None if ref is None else ref[B:],
        beta=cfg.beta, sft_weight=cfg.sft_weight,
        chosen_nll=-logps[:B] / lengths[:B],  # (B,) per-token NLL of y_w
        **cfg.loss_options(),
    )
    if ref_logps is not None:
        # k1 on the data set's responses: mean over the 2B sequences of Σ_t (log π_θ − log π_ref).
        metrics["kl"] = (logps - ref_logps).detach().float().mean()
    return losses, metrics


def dpo_batch_loss(cfg: DPOConfig, batching: Batching, reference: Reference | None):
    def loss(model, batch):
        ref_logps = reference_logps(reference, batching, batch)  # (2B,) or None
        logps, counts = batching.logps(model, batch)  # (2B,) each: one forward pass for both sides
        losses, metrics = dpo_losses(cfg, logps, ref_logps, counts)  # (B,)
        return (losses * batch["weight"]).sum(), {k: float(v) for k, v in metrics.items()}

    return loss


def pair_weight(batch: dict) -> float:
    """Loss units of a batch: the summed pair weights."""
    return float(batch["weight"].sum())


# ---- evaluation on held-out pairs -------------------------------------------------------------


@torch.no_grad()
def evaluate_pairs(model, items: list[dict], cfg: DPOConfig, batching: Batching, reference: Reference | None,
                   pad_id: int, batch_size: int = 16) -> dict[str, float]:
    """Implicit-reward accuracy and margin (and the loss, log-probs, KL) on held-out pairs.

    ``accuracy``: fraction of pairs with r(y_w) > r(y_l) (ties count as wrong), r the implicit
    reward β·log π_θ/π_ref (β·mean log π_θ for simpo/orpo); ``margin``: mean r(y_w) − r(y_l).
    """
    device = next(model.parameters()).device
    collate = with_reference_logps(batching.collate)
    totals: dict[str, float] = {}
    n = 0
    for k in range(0, len(items), batch_size):
        chunk = items[k : k + batch_size]
        batch = {key: v.to(device) if torch.is_tensor(v) else v for key, v in collate(chunk, pad_id).items()}
        ref_logps = reference_logps(reference, batching, batch)
        logps, counts = batching.logps(model, batch)
        losses, metrics = dpo_losses(cfg, logps, ref_logps, counts)
        metrics["loss"] = losses.mean()
        for name, v in metrics.items():
            totals[name] = totals.get(name, 0.0) + float(v) * len(chunk)  # batch means -> pair means
        n += len(chunk)
    out = {name: v / max(n, 1) for name, v in totals.items()}
    out["accuracy"] = out.pop("rewards/accuracies")
    out["margin"] = out.pop("rewards/margins")
    return out


# ---- putting it together ----------------------------------------------------------------------


def build_dpo_task(cfg: DPOConfig, policy, train: list[dict], evals: list[dict], pad_id: int,
                   accelerator=None) -> tuple[Task, Reference | None]:
    """The loop's Task for DPO, and the live reference (None if precomputed or reference-free).

    With ``reference=precomputed`` the reference log-probs of ``train`` and ``evals`` are
    computed here, once, by ``policy`` (which is π_ref before training starts).
    """
    batching = BATCHINGS[cfg.batching_name()]
    check_batching(cfg.batching_name(), policy)
    reference = make_reference(policy, cfg.reference, cfg.loss_type)
    if cfg.reference == "precomputed" and cfg.loss_type not in REFERENCE_FREE:
        train = precompute_reference_logps(policy, train, batching, pad_id, cfg.optim.batch_size, accelerator)
        evals = precompute_reference_logps(policy, evals, batching, pad_id, cfg.optim.batch_size, accelerator)
    collate = with_reference_logps(batching.collate)

    def evaluate(model):
        return evaluate_pairs(model, evals, cfg, batching, reference, pad_id, cfg.optim.batch_size)

    task = Task(
        items=train,
        collate=lambda items: collate(items, pad_id),
        loss=dpo_batch_loss(cfg, batching, reference),
        units=pair_weight,
        evaluate=evaluate if evals else None,
        groups=[it.get("group", -1) for it in train] if cfg.data.group_rankings else None,
        name=cfg.loss_type if cfg.loss_type != "sigmoid" else "dpo",
    )
    return task, reference


@entry("dpo")
def run_dpo(cfg: DPOConfig):
    """Train ``cfg.model.path`` on the comparisons of ``cfg.data``; save the policy (a plain HF
    directory, LoRA merged) to ``cfg.run.output_dir``. Returns the loop's ``TrainResult``
    (``final_eval`` holds the held-out accuracy and margin when there is eval data)."""
    cfg.validate()
    seed_everything(cfg.run.seed)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, cfg.run.seed, expect=("PreferencePair",), name="dpo")
    policy = load_causal_lm(cfg.model)
    choose_logps_path(policy, cfg.run.logps_path)
    accelerator = make_accelerator(cfg.run, model=policy)
    policy = policy.to(accelerator.device)
    task, reference = build_dpo_task(cfg, policy, data.train, data.eval, tokenizer.pad_token_id, accelerator)
    if reference is not None:
        reference.to(accelerator.device)
    trainer = Trainer(policy, task, cfg.optim, cfg.run, accelerator=accelerator, config=cfg)
    result = trainer.fit()
    trainer.save_final(lambda out: save_model(trainer.unwrapped(), tokenizer, out))
    if trainer.acc.is_main_process:
        if result.final_eval:
            ev = result.final_eval
            print(f"[alignkit] {task.name}: held-out reward accuracy {ev['accuracy']:.3f}, margin {ev['margin']:.4f}")
    return result
