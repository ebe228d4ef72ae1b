"""KTO: Kahneman–Tversky optimisation on unpaired good/bad labels (Ethayarajh et al. 2024).

With the implicit reward r_θ(x, y) = log π_θ(y|x) − log π_ref(y|x) and the reference point

    z₀ = max(0, mean_i [ log π_θ(y'_i|x_i) − log π_ref(y'_i|x_i) ])       (mismatched pairs, no gradient)

each example costs

    desirable   y:  λ_D · (1 − σ(β·(r_θ(x, y) − z₀)))
    undesirable y:  λ_U · (1 − σ(β·(z₀ − r_θ(x, y))))

averaged over examples (:func:`alignkit.losses.kto_loss`). z₀ estimates KL(π_θ‖π_ref) from
mismatched pairs (x_i, y'_i): the prompts of the micro-batch, each with the completion of another
example (of a different prompt). As TRL does, y'_i is drawn ONCE before training (a seeded random cycle over the data), so
a micro-batch of one still has a mismatched pair and π_ref's log-probs of these pairs can be
precomputed like the others. In a multi-process run the mean is taken over all processes before
the max. The paper's advice for imbalanced data: choose λ_D, λ_U so that
λ_D·n_D / (λ_U·n_U) lies in [1, 4/3]; the run prints that ratio.

Pairwise data works too: each pair becomes a desirable (chosen) and an undesirable (rejected)
example. References (copy / adapter / precomputed) are as in :mod:`alignkit.train.dpo`.
"""

from __future__ import annotations

from alignkit.context import entry

import random
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from alignkit.config import DataConfig, ModelConfig, OptimConfig, RunConfig
from alignkit.data import collate_unpaired
from alignkit.losses import kto_kl_reference_point, kto_loss
from alignkit.models.heads import forward_logps
from alignkit.models.loading import Reference, load_causal_lm, load_tokenizer, save_model
from alignkit.ops import sequence_logps
from alignkit.train.common import check_reference_choice, choose_logps_path, prepare_data, seed_everything
from alignkit.train.loop import Task, Trainer, make_accelerator


@dataclass
class KTOConfig:
    """`alignkit kto`: KTO on completions labelled desirable or undesirable (or on pairs, split in two)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to train, usually the SFT model; it is also the reference π_ref."""
    data: DataConfig = field(default_factory=DataConfig)
    """Unpaired records (prompt, completion, label) or comparisons (each pair gives one desirable and one undesirable example)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and batch sizes (batch_size counts examples)."""
    run: RunConfig = field(default_factory=RunConfig)
    """Output, checkpoints, logging."""
    beta: float = 0.1
    """β: sharpness of the value function and strength of the implicit KL constraint."""
    desirable_weight: float = 1.0
    """λ_D, the loss weight of desirable examples."""
    undesirable_weight: float = 1.0
    """λ_U, the loss weight of undesirable examples."""
    reference: str = "auto"
    """π_ref: copy (frozen copy), adapter (LoRA base with adapters off), precomputed (one pass before training), auto (adapter with LoRA, else copy)."""

    def validate(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0; got {self.beta}")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ValueError("desirable_weight and undesirable_weight must be >= 0")
        check_reference_choice(self.reference, self.model.lora)


# ---- data: unpaired items with a mismatched completion each --------------------------------------


def unpaired_items(items: list[dict]) -> list[dict]:
    """Unpaired items as they are; a pair item becomes a desirable and an undesirable item."""
    out = []
    for it in items:
        if "completion_ids" in it:
            out.append(it)
            continue
        for side, label in (("chosen_ids", True), ("rejected_ids", False)):
            out.append({"prompt_ids": it["prompt_ids"], "completion_ids": it[side], "label": label,
                        "length": len(it["prompt_ids"]) + len(it[side])})
    return out


def assign_mismatched(items: list[dict], seed: int, max_length: int, lookahead: int = 8) -> list[dict]:
    """Give each item ``kl_completion_ids``: the completion of the next item on a seeded random
    cycle through the data whose prompt differs (looking at most ``lookahead`` items ahead; the
    two examples made from one pair share a prompt), cut so that prompt + completion fits in
    ``max_length``."""
    n = len(items)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    out = [dict(it) for it in items]
    for k, i in enumerate(order):
        ahead = [order[(k + j) % n] for j in range(1, min(lookahead, n - 1) + 1)] or [i]
        other = next((j for j in ahead if items[j]["prompt_ids"] != items[i]["prompt_ids"]), ahead[0])
        room = max(1, max_length - len(items[i]["prompt_ids"]))
        out[i]["kl_completion_ids"] = items[other]["completion_ids"][:room]
    return out


def collate_kto(items: list[dict], pad_id: int) -> dict:
    """``(2B, T)`` padded batch: rows ``0..B-1`` the examples (x_i, y_i), rows ``B..2B-1`` the
    mismatched pairs (x_i, y'_i); ``label (B,)``; and ``ref_logps (2B,)`` when precomputed."""
    mismatched = [{**it, "completion_ids": it["kl_completion_ids"]} for it in items]
    batch = collate_unpaired(list(items) + mismatched, pad_id)  # (2B, T)
    batch["label"] = batch["label"][: len(items)]  # (B,) the mismatched rows carry no label
    if "ref_logps" in items[0]:
        batch["ref_logps"] = torch.tensor([it["ref_logps"] for it in items] + [it["kl_ref_logps"] for it in items])
    return batch


# ---- log-probs ------------------------------------------------------------------------------------


def _rows(batch: dict, rows: slice) -> dict:
    return {k: batch[k][rows] for k in ("input_ids", "attention_mask", "labels")}


def kto_logps(model, batch: dict, grad: bool = True) -> tuple[Tensor, Tensor]:
    """(log π(y_i|x_i) (B,) with gradient, log π(y'_i|x_i) (B,) without): the mismatched pairs
    only feed the detached z₀, so they run under no_grad and keep no activations."""
    B = batch["label"].shape[0]
    with nullcontext() if grad else torch.no_grad():
        logps = sequence_logps(*forward_logps(model, _rows(batch, slice(0, B))))  # (B,)
    with torch.no_grad():
        kl_logps = sequence_logps(*forward_logps(model, _rows(batch, slice(B, 2 * B))))  # (B,)
    return logps, kl_logps


def reference_logps(reference: Reference | None, batch: dict) -> Tensor:
    """log π_ref of the 2B rows (examples, then mismatched pairs): precomputed or one forward pass."""
    if "ref_logps" in batch:
        return batch["ref_logps"]
    with torch.no_grad(), reference.active() as ref_model:
        return sequence_logps(*forward_logps(ref_model, batch))  # (2B,)


@torch.no_grad()
def precompute_reference_logps(model, items: list[dict], pad_id: int, batch_size: int, accelerator=None) -> list[dict]:
    """Copies of ``items`` with ``ref_logps`` and ``kl_ref_logps`` from one pass of the initial policy."""
    device = next(model.parameters()).device
    autocast = accelerator.autocast if accelerator is not None else nullcontext
    was_training = model.training
    model.eval()
    out = [dict(it) for it in items]
    order = sorted(range(len(items)), key=lambda i: items[i]["length"])
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        batch = {key: v.to(device) for key, v in collate_kto([items[i] for i in idx], pad_id).items()}
        with autocast():
            ref = sequence_logps(*forward_logps(model, batch))  # (2B,)
        for j, i in enumerate(idx):
            out[i]["ref_logps"], out[i]["kl_ref_logps"] = float(ref[j]), float(ref[len(idx) + j])
    model.train(was_training)
    return out


def kl_reference_point(kl_logps: Tensor, kl_ref_logps: Tensor, filler: bool = False) -> Tensor:
    """z₀ of this step: over the micro-batch, or over all processes' micro-batches when distributed.
    A ``filler`` micro-batch (the loop's zero-weight stand-in on a process with fewer items)
    joins the all-reduce with nothing in it."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return kto_kl_reference_point(kl_logps, kl_ref_logps)
    diff = (kl_logps - kl_ref_logps).detach().float() * (0.0 if filler else 1.0)
    count = 0.0 if filler else float(diff.numel())
    stats = torch.stack([diff.sum(), torch.tensor(count, device=diff.device)])
    dist.all_reduce(stats)  # every process runs the same number of micro-batches, so this pairs up
    return kto_kl_reference_point(stats[:1] / stats[1].clamp_min(1.0), torch.zeros(1, device=diff.device))


# ---- loss and evaluation ----------------------------------------------------------------------------


def kto_batch_loss(cfg: KTOConfig, reference: Reference | None):
    def loss(model, batch):
        B = batch["label"].shape[0]
        ref = reference_logps(reference, batch)  # (2B,)
        logps, kl_logps = kto_logps(model, batch)  # (B,), (B,)
        z0 = kl_reference_point(kl_logps, ref[B:], filler=bool(batch.get("filler", False)))
        losses, metrics = kto_loss(logps, ref[:B], batch["label"], z0, beta=cfg.beta,
                                   lambda_d=cfg.desirable_weight, lambda_u=cfg.undesirable_weight)
        metrics["kl"] = (logps - ref[:B]).detach().float().mean()  # k1 on the data's completions
        return losses.sum(), {k: float(v) for k, v in metrics.items()}

    return loss


@torch.no_grad()
def evaluate_unpaired(model, items: list[dict], cfg: KTOConfig, reference: Reference | None, pad_id: int,
                      batch_size: int = 16) -> dict[str, float]:
    """Held-out implicit rewards r = β·(log π_θ − log π_ref): mean over desirable and undesirable
    examples, their difference (``margin``), ``accuracy`` = fraction of (desirable, undesirable)
    example pairs ranked correctly (ties count half; the ROC AUC), and ``loss`` with z₀ estimated
    over the whole held-out set."""
    device = next(model.parameters()).device
    rewards, labels, kl = [], [], []
    for k in range(0, len(items), batch_size):
        batch = {key: v.to(device) for key, v in collate_kto(items[k : k + batch_size], pad_id).items()}
        B = batch["label"].shape[0]
        ref = reference_logps(reference, batch)
        logps, kl_logps = kto_logps(model, batch, grad=False)
        rewards.append((logps - ref[:B]).float().cpu())
        kl.append((kl_logps - ref[B:]).float().cpu())
        labels.append(batch["label"].cpu())
    r, y = torch.cat(rewards), torch.cat(labels)
    z0 = torch.cat(kl).mean().clamp_min(0)
    losses, _ = kto_loss(r, torch.zeros_like(r), y, z0, beta=cfg.beta,
                         lambda_d=cfg.desirable_weight, lambda_u=cfg.undesirable_weight)
    good, bad = cfg.beta * r[y], cfg.beta * r[~y]
    out = {"loss": float(losses.mean()), "kl_ref_point": float(z0)}
    if len(good) and len(bad):
        diff = good[:, None] - bad[None, :]  # (n_D, n_U) every desirable vs every undesirable
        out.update({"accuracy": float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()),
                    "rewards/chosen": float(good.mean()), "rewards/rejected": float(bad.mean()),
                    "margin": float(good.mean() - bad.mean())})
    return out


# ---- putting it together ------------------------------------------------------------------------------


def build_kto_task(cfg: KTOConfig, policy, train: list[dict], evals: list[dict], pad_id: int,
                   accelerator=None) -> tuple[Task, Reference | None]:
    """The loop's Task for KTO and the live reference (None when precomputed)."""
    max_length = cfg.data.max_length
    train = assign_mismatched(unpaired_items(train), cfg.run.seed, max_length)
    evals = assign_mismatched(unpaired_items(evals), cfg.run.seed + 1, max_length) if evals else []
    n_d = sum(it["label"] for it in train)
    n_u = len(train) - n_d
    if n_u and cfg.undesirable_weight:
        ratio = cfg.desirable_weight * n_d / (cfg.undesirable_weight * n_u)
        advice = "" if 1.0 <= ratio <= 4 / 3 else " (the paper advises 1 to 4/3: adjust desirable_weight / undesirable_weight)"
        print(f"[alignkit] kto: {n_d} desirable / {n_u} undesirable; λ_D·n_D/(λ_U·n_U) = {ratio:.3f}{advice}")
    reference = None
    if cfg.reference == "precomputed":
        train = precompute_reference_logps(policy, train, pad_id, cfg.optim.batch_size, accelerator)
        evals = precompute_reference_logps(policy, evals, pad_id, cfg.optim.batch_size, accelerator)
    else:
        reference = Reference(policy, cfg.reference)

    def evaluate(model):
        return evaluate_unpaired(model, evals, cfg, reference, pad_id, cfg.optim.batch_size)

    task = Task(items=train, collate=lambda items: collate_kto(items, pad_id), loss=kto_batch_loss(cfg, reference),
                units=lambda batch: float(batch["label"].shape[0]), evaluate=evaluate if evals else None, name="kto")
    return task, reference


@entry("kto")
def run_kto(cfg: KTOConfig):
    """Train ``cfg.model.path`` with KTO on ``cfg.data``; save the policy (plain HF directory) to
    ``cfg.run.output_dir``. Returns the loop's ``TrainResult``."""
    cfg.validate()
    seed_everything(cfg.run.seed)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, cfg.run.seed, expect=("UnpairedExample", "PreferencePair"), name="kto")
    policy = load_causal_lm(cfg.model)
    choose_logps_path(policy, cfg.run.logps_path)
    accelerator = make_accelerator(cfg.run, model=policy)
    policy = policy.to(accelerator.device)
    task, reference = build_kto_task(cfg, policy, data.train, data.eval, tokenizer.pad_token_id, accelerator)
    if reference is not None:
        reference.to(accelerator.device)
    trainer = Trainer(policy, task, cfg.optim, cfg.run, accelerator=accelerator, config=cfg)
    result = trainer.fit()
    trainer.save_final(lambda out: save_model(trainer.unwrapped(), tokenizer, out))
    if trainer.acc.is_main_process:
        if "accuracy" in result.final_eval:
            ev = result.final_eval
            print(f"[alignkit] kto: held-out reward AUC {ev['accuracy']:.3f}, margin {ev['margin']:.4f}")
    return result
