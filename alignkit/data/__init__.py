"""Preference data: read records, normalise them, tokenise them, batch them.

One entry point loads any supported source and format::

    train, eval, report = load_dataset_records("hh.jsonl", eval_fraction=0.05)
    print(report.summary())
    items, report = tokenize_records(train, tokenizer, max_length=512, max_prompt_length=256,
                                     report=report)
    batch = collate_pairs(items[:8], tokenizer.pad_token_id)

Pipeline: :mod:`readers` (rows with locations) -> :mod:`formats` (records, skips counted in a
:class:`DataReport`) -> :mod:`tokenize` (token-id items) -> :mod:`collate` (tensors). The online
methods read only prompts, from any format that has them: :func:`read_prompts` (:mod:`prompts`).
"""

from __future__ import annotations

from pathlib import Path

from alignkit.data.collate import (
    collate_pairs,
    collate_rated,
    collate_sft,
    collate_unpaired,
    pack_pairs,
    pack_sft,
)
from alignkit.data.formats import (
    DEFAULT_MARGIN_LABELS,
    FORMATS,
    LLAMA2_MARGIN_SMALL,
    NormaliseOptions,
    detect_format,
    implicit_prompt,
    normalise_rows,
    parse_hh_transcript,
    read_source,
    record_kind,
)
from alignkit.data.prompts import read_prompts
from alignkit.data.readers import has_splits, read_rows, split_rows
from alignkit.data.records import (
    PreferencePair,
    PromptExample,
    RatedExample,
    Record,
    ResponseExample,
    SFTExample,
    TextExample,
    UnpairedExample,
)
from alignkit.data.report import DataError, DataReport
from alignkit.data.tokenize import (
    ASSISTANT_TURNS,
    IGNORE_INDEX,
    ChatFormat,
    chat_format,
    encode_prompt,
    encode_responses,
    plain_chat,
    render_prompt,
    stop_token_ids,
    tokenize_pair,
    tokenize_rated,
    tokenize_records,
    tokenize_sft,
    tokenize_unpaired,
)


def load_dataset_records(
    path: str | Path,
    format: str | None = None,
    split: str = "train",
    limit: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    eval_fraction: float = 0.0,
    eval_size: int | None = None,
    margin_labels: dict[str, float] | None = None,
    group_rankings: bool = False,
    strict: bool = False,
    kinds: tuple[type, ...] = (),
    chosen_as_sft: bool = False,
) -> tuple[list[Record], list[Record], DataReport]:
    """Read ``path`` and return ``(train_records, eval_records, report)``.

    Args:
        path: a ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a ``save_to_disk`` directory, or
            a Hugging Face Hub data set name (only when no such local path exists).
        format: one of :data:`FORMATS` (``pairwise``, ``hh``, ``ranked``, ``unpaired``,
            ``ratings``, ``response``, ``sft``, ``text``, ``prompt``, ...): every row is read as
            that format; ``None`` detects it from each row's fields.
        split: the split of a ``datasets`` source.
        limit: read only the first ``limit`` rows (before shuffling).
        shuffle, seed: shuffle the rows with ``random.Random(seed)``.
        eval_fraction, eval_size: hold out that fraction / number of rows for evaluation. The
            split is by row, so the pairs of one ranking stay on one side.
        margin_labels: label -> margin for string margins (default :data:`DEFAULT_MARGIN_LABELS`);
            keys are matched case- and space-insensitively.
        group_rankings: keep the pairs of a k-way ranking together (shared ``group`` id,
            ``weight`` 1/number-of-pairs) instead of as independent pairs.
        strict: make structural problems (HH or conversation pairs that do not share a prompt,
            malformed transcripts) errors instead of reported skips.
        kinds: record types the caller reads. With ``format=None`` every row's format is
            detected; rows of formats giving any of these may mix in one file (empty: rows must
            give the first row's record type, so HH and pairwise rows mix). A row of another
            kind is an error naming it, the first row and both formats.
        chosen_as_sft: read comparisons (pairwise, hh, ranked) as demonstrations
            (:class:`SFTExample`) of their chosen reply; a ranking gives its best reply.
    """
    rows, report = read_source(path, format, split, limit)
    train_rows, eval_rows = split_rows(rows, shuffle, seed, eval_fraction, eval_size)
    labels = DEFAULT_MARGIN_LABELS if margin_labels is None else margin_labels
    options = NormaliseOptions(
        margin_labels={" ".join(k.lower().split()): float(v) for k, v in labels.items()},
        group_rankings=group_rankings,
        strict=strict,
        detect_each_row=format is None,
        kinds=tuple(kinds),
        first=rows[0][0],
        chosen_as_sft=chosen_as_sft,
    )
    train = normalise_rows(train_rows, report.format, report, options)
    evals = normalise_rows(eval_rows, report.format, report, options)
    report.train, report.eval = len(train), len(evals)
    if not train:
        raise DataError(f"{path}: no usable training records.\n{report.summary()}")
    return train, evals, report


__all__ = [
    "ASSISTANT_TURNS",
    "ChatFormat",
    "DEFAULT_MARGIN_LABELS",
    "FORMATS",
    "IGNORE_INDEX",
    "LLAMA2_MARGIN_SMALL",
    "DataError",
    "DataReport",
    "NormaliseOptions",
    "PreferencePair",
    "PromptExample",
    "RatedExample",
    "Record",
    "ResponseExample",
    "SFTExample",
    "TextExample",
    "UnpairedExample",
    "collate_pairs",
    "collate_rated",
    "collate_sft",
    "collate_unpaired",
    "detect_format",
    "chat_format",
    "encode_prompt",
    "encode_responses",
    "has_splits",
    "implicit_prompt",
    "load_dataset_records",
    "normalise_rows",
    "pack_pairs",
    "pack_sft",
    "parse_hh_transcript",
    "plain_chat",
    "read_prompts",
    "read_rows",
    "record_kind",
    "render_prompt",
    "split_rows",
    "stop_token_ids",
    "tokenize_pair",
    "tokenize_rated",
    "tokenize_records",
    "tokenize_sft",
    "tokenize_unpaired",
]
