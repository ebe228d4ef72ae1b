"""Small pieces the per-algorithm files share: reading + tokenising a data section, seeding, the
batchings of comparison pairs, and the choice of a reference policy."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from alignkit.config import DataConfig
from alignkit.data.collate import collate_pairs, pack_pairs
from alignkit.data.prefix_sharing import collate_prefix_shared


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class PreparedData:
    """Tokenised train/eval items and the report of what was read, skipped and truncated."""

    train: list[dict]
    eval: list[dict]
    train_records: list
    eval_records: list
    report: object


def prepare_data(data: DataConfig, tokenizer, seed: int, expect: tuple[str, ...], name: str) -> PreparedData:
    """Read ``data.path`` (and ``data.eval_path``), check the records are of a kind in ``expect``
    (record class names), tokenise them, print the report and return the items."""
    from alignkit.data import load_dataset_records, tokenize_records

    if not data.path:
        raise ValueError(f"{name}: set data.path to a training file (see `alignkit {name} --help`)")
    common = dict(
        format=None if data.format == "auto" else data.format,
        split=data.split,
        limit=data.limit or None,
        shuffle=data.shuffle,
        seed=seed,
        margin_labels=data.margin_labels or None,
        group_rankings=data.group_rankings,
        strict=data.strict,
    )
    train_records, eval_records, report = load_dataset_records(
        data.path, eval_fraction=0.0 if data.eval_path else data.eval_fraction,
        eval_size=None if data.eval_path or not data.eval_size else data.eval_size, **common
    )
    eval_report = None
    if data.eval_path:
        eval_records, _, eval_report = load_dataset_records(data.eval_path, **common)
    kinds = {type(r).__name__ for r in train_records + eval_records}
    wrong = kinds - set(expect)
    if wrong:
        raise ValueError(
            f"{name}: {data.path} holds {', '.join(sorted(wrong))} records but `alignkit {name}` trains on "
            f"{' or '.join(expect)}; set data.format or use the matching command"
        )
    lengths = dict(max_length=data.max_length, max_prompt_length=data.max_prompt_length,
                   assistant_turns=data.assistant_turns)
    train, _ = tokenize_records(train_records, tokenizer, report=report, **lengths)
    evals, _ = tokenize_records(eval_records, tokenizer, report=eval_report or report, **lengths)
    print(f"[alignkit] {name} data: {len(train)} train / {len(evals)} eval items\n{report.summary()}")
    if eval_report is not None:
        print(f"[alignkit] {name} eval data ({data.eval_path}):\n{eval_report.summary()}")
    return PreparedData(train, evals, train_records, eval_records, report)


#: How the pairs of a micro-batch go through one forward pass (DPO family, reward models): name ->
#: collate ``(pair items, pad id) -> batch``. All give the same per-sequence results up to float
#: rounding; padding-free and prefix-shared batches carry ``last_index`` / ``logit_index``.
PAIR_COLLATES = {
    "padded": collate_pairs,  # chosen and rejected as 2B right-padded rows
    "padding_free": lambda items, pad_id: pack_pairs(items),  # the 2B sequences packed in one row
    "prefix_shared": collate_prefix_shared,  # one row prompt ‖ chosen ‖ rejected per pair
}


def resolve_pair_batching(batching: str, padding_free: bool) -> str:
    """The pair batching a config's ``batching`` means ('auto': padding_free with
    ``run.padding_free``, else padded); rejects unknown names."""
    if batching not in ("auto", *PAIR_COLLATES):
        raise ValueError(f"batching must be auto, {', '.join(PAIR_COLLATES)}; got {batching!r}")
    if batching == "auto":
        return "padding_free" if padding_free else "padded"
    return batching


def check_pair_batching(batching: str, model) -> None:
    """Batchings other than padded need an attention that takes a 4-D mask (sdpa or eager)."""
    attention = getattr(getattr(model, "config", None), "_attn_implementation", "sdpa")
    if batching != "padded" and attention not in ("sdpa", "eager"):
        raise ValueError(f"batching={batching} needs an attention implementation that takes a 4-D mask "
                         f"(sdpa or eager); the model uses {attention!r}: use batching=padded")


def check_reference_choice(reference: str, lora: bool) -> None:
    """A config's π_ref choice (DPO, KTO): copy, adapter (LoRA only), precomputed or auto."""
    if reference not in ("auto", "copy", "adapter", "precomputed"):
        raise ValueError(f"reference must be auto, copy, adapter or precomputed; got {reference!r}")
    if reference == "adapter" and not lora:
        raise ValueError("reference=adapter needs model.lora=true (the reference is the base with adapters off)")
