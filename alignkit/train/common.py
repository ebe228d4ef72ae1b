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
from alignkit.models.masks import batching_refusal
from alignkit.models.output_head import set_logps_path


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


#: The commands that read each record type, for the hint when a command is given the wrong data.
_COMMANDS = {
    "SFTExample": "sft", "TextExample": "sft", "PreferencePair": "rm, dpo, kto", "UnpairedExample": "kto",
    "RatedExample": "rm", "ResponseExample": "score", "PromptExample": "ppo, grpo, rloo, rs",
    "CritiquePair": "critic", "CritiquePoint": "critic",
}


def prepare_data(data: DataConfig, tokenizer, seed: int, expect: tuple[str, ...], name: str) -> PreparedData:
    """Read ``data.path`` (and the evaluation data: see :func:`eval_source`), check the records are of a
    kind in ``expect`` (record class names), tokenise them, print the report and return the items.

    A command that trains on demonstrations (``SFTExample`` expected, comparisons not) also takes
    ``text`` rows (every token a target) and comparison files, whose chosen replies it trains on (a
    ranking: its best reply), saying so."""
    from alignkit.data import load_dataset_records, record_kind, records, tokenize_records

    if not data.path:
        raise ValueError(f"{name}: set data.path to a training file (see `alignkit {name} --help`)")
    kinds = set(expect)
    demonstrations = "SFTExample" in kinds and "PreferencePair" not in kinds
    if demonstrations:
        kinds.add("TextExample")
    common = dict(
        format=None if data.format == "auto" else data.format,
        split=data.split,
        limit=data.limit or None,
        shuffle=data.shuffle,
        seed=seed,
        margin_labels=data.margin_labels or None,
        group_rankings=data.group_rankings,
        strict=data.strict,
        # Rows of other formats may mix in one file where they give the same records; demonstrations
        # and texts also mix (both become SFT items).
        kinds=(records.SFTExample, records.TextExample) if demonstrations else (),
        chosen_as_sft=demonstrations,
    )
    eval_path, eval_split = eval_source(data)
    train_records, eval_records, report = load_dataset_records(
        data.path, eval_fraction=0.0 if eval_path else data.eval_fraction,
        eval_size=None if eval_path or not data.eval_size else data.eval_size, **common
    )
    eval_report = None
    if eval_path:
        eval_records, _, eval_report = load_dataset_records(eval_path, **{**common, "split": eval_split})
        eval_report.train, eval_report.eval = 0, eval_report.train  # all of it is evaluation data
    wrong = {type(r).__name__ for r in train_records + eval_records} - kinds
    if wrong:
        raise ValueError(_wrong_records(name, data.path, report.format, wrong, kinds, demonstrations))
    comparisons = [f for f in sorted(report.formats) if demonstrations and record_kind(f) is records.PreferencePair]
    if comparisons:
        print(f"[alignkit] {name}: {data.path} holds comparisons (format {', '.join(comparisons)}): training on the "
              "chosen reply of each comparison (the best reply of a ranking)")
    lengths = dict(max_length=data.max_length, max_prompt_length=data.max_prompt_length,
                   assistant_turns=data.assistant_turns)
    train, _ = tokenize_records(train_records, tokenizer, report=report, **lengths)
    evals, _ = tokenize_records(eval_records, tokenizer, report=eval_report or report, **lengths)
    print(f"[alignkit] {name} data: {len(train)} train / {len(evals)} eval items\n{report.summary()}")
    if eval_report is not None:
        where = eval_path + (f" split {eval_split}" if data.eval_split else "")
        print(f"[alignkit] {name} eval data ({where}):\n{eval_report.summary()}")
    return PreparedData(train, evals, train_records, eval_records, report)


def _wrong_records(name: str, path: str, fmt: str, wrong: set[str], kinds: set[str], demonstrations: bool) -> str:
    """Why ``alignkit name`` cannot train on ``path``, and what reads it / what it needs instead."""
    from alignkit.data import FORMATS

    needed = [f"{n} ({f.fields})" for n, f in FORMATS.items() if f.kind.__name__ in kinds]
    if demonstrations:
        needed.append("pairwise, hh or ranked comparisons (their chosen replies)")
    got = ", ".join(f"{k} (read by `alignkit {_COMMANDS.get(k, '?')}`)" for k in sorted(wrong))
    return (f"{name}: {path} is format '{fmt}' ({FORMATS[fmt].fields}), which gives {got}; `alignkit {name}` "
            f"reads the formats {'; '.join(needed)}. Use the command that reads this data, or give data in one of "
            "those formats")


def eval_source(data: DataConfig) -> tuple[str, str]:
    """Where evaluation data comes from, as ``(path, split)``; ``("", "")`` when it is a held-out part of
    ``data.path`` (``eval_fraction`` / ``eval_size``) or there is none.

    ``data.eval_split`` names a split of a `datasets` source (``eval_path`` if given, else ``path``): a
    DatasetDict's test split. ``eval_path`` alone is read at ``data.split``."""
    from alignkit.data import has_splits

    if not data.eval_split:
        return (data.eval_path, data.split) if data.eval_path else ("", "")
    source = data.eval_path or data.path
    if data.eval_fraction or data.eval_size:
        raise ValueError(f"data.eval_split={data.eval_split!r} evaluates on a split of {source}, and "
                         "data.eval_fraction / eval_size would carve another out of data.path: give only one")
    if not has_splits(source):
        raise ValueError(f"data.eval_split={data.eval_split!r} picks a split of a `datasets` source (a save_to_disk "
                         f"directory or a hub name), but {source} is a file, which has no splits: give the evaluation "
                         "file as data.eval_path and leave data.eval_split empty")
    if source == data.path and data.eval_split == data.split:
        raise ValueError(f"data.eval_split={data.eval_split!r} is the training split (data.split): evaluation would "
                         "re-read the training rows; name the held-out split (e.g. test)")
    return source, data.eval_split


def prepare_prompts(data: DataConfig, tokenizer=None, name: str = "the online methods") -> list:
    """The distinct prompts of ``data.path`` (any format with a prompt, prompt-only rows included) as chat
    messages, in file order; prints the read/kept/skipped/truncated report (truncation counted against
    ``data.max_prompt_length`` when a ``tokenizer`` is given)."""
    from alignkit.data import read_prompts

    if not data.path:
        raise ValueError(f"{name}: set data.path to a file of prompts ({{\"prompt\": ...}} rows, or any format with a "
                         "prompt), or pass prompts in Python")
    prompts, report = read_prompts(
        data.path, format=None if data.format == "auto" else data.format, split=data.split,
        limit=data.limit or None, strict=data.strict, tokenizer=tokenizer, max_prompt_length=data.max_prompt_length,
    )
    print(f"[alignkit] {len(prompts)} distinct prompts from {data.path}\n{report.summary()}")
    return prompts


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


def check_batching(batching: str, model) -> None:
    """Refuse, before training, a batching (padded, padding_free, prefix_shared) that ``model``'s
    family and attention implementation cannot run exactly; the message names the one that works
    (rules in :func:`alignkit.models.masks.batching_refusal`, docs/batching.md)."""
    reason = batching_refusal(batching, model)
    if reason is not None:
        raise ValueError(reason)


def choose_logps_path(model, option: str) -> None:
    """Apply ``run.logps_path`` (auto, chunked, full) to ``model`` (and the copies made of it
    later, such as a frozen reference) and print which path its log-probs take and why; a forced
    ``chunked`` that the model cannot take is refused here, before training
    (rules in :mod:`alignkit.models.output_head`)."""
    print(f"[alignkit] {set_logps_path(model, option)}")


def check_reference_choice(reference: str, lora: bool) -> None:
    """A config's π_ref choice (DPO, KTO): copy, adapter (LoRA only), precomputed or auto."""
    if reference not in ("auto", "copy", "adapter", "precomputed"):
        raise ValueError(f"reference must be auto, copy, adapter or precomputed; got {reference!r}")
    if reference == "adapter" and not lora:
        raise ValueError("reference=adapter needs model.lora=true (the reference is the base with adapters off)")
