"""Prompts for the online methods (PPO, GRPO, RLOO, rejection sampling), from any data file that
has them, with the same read / kept / skipped / truncated report as the offline commands::

    prompts, report = read_prompts("prompts.jsonl", tokenizer=tok, max_prompt_length=384)
    print(report.summary())

A prompt-only file (``{"prompt": "..."}`` or ``{"prompt": [chat messages]}`` per row, the usual
input of GRPO/RLOO/PPO elsewhere) is read as well as SFT, pairwise, HH, ranked, ratings, unpaired
or critique files, whose replies are ignored; rows of these formats may be mixed in one file.
Each distinct prompt is kept once, in file order; empty prompts and repeats are counted skips
(``empty_prompt``, ``duplicate_prompt``), and with a tokenizer every prompt longer than
``max_prompt_length`` tokens (which generation cuts to its last ``max_prompt_length`` tokens) is
counted as truncated.
"""

from __future__ import annotations

from pathlib import Path

from alignkit.data.formats import FORMATS, NormaliseOptions, normalise_prompt, read_source
from alignkit.data.records import Messages
from alignkit.data.report import DUPLICATE_PROMPT, DataError, DataReport
from alignkit.data.tokenize import encode_prompt


def read_prompts(
    path: str | Path,
    format: str | None = None,
    split: str = "train",
    limit: int | None = None,
    strict: bool = False,
    tokenizer=None,
    max_prompt_length: int | None = None,
) -> tuple[list[Messages], DataReport]:
    """The distinct prompts of ``path`` in file order, and the report of what was read.

    ``format`` reads every row as that format (``None``: each row's format is detected);
    ``split``, ``limit`` and ``strict`` mean what they mean for
    :func:`alignkit.data.load_dataset_records`. With ``tokenizer`` and ``max_prompt_length`` each
    kept prompt is tokenised as generation will see it and counted in ``report.truncated`` when
    longer.
    """
    rows, report = read_source(path, format, split, limit)
    options = NormaliseOptions(
        strict=strict,
        detect_each_row=format is None,
        kinds=tuple(f.kind for f in FORMATS.values() if f.prompt is not None),  # all mix
        first=rows[0][0],
    )
    seen: set[tuple] = set()
    prompts: list[Messages] = []
    for loc, row in rows:
        prompt = normalise_prompt(row, loc, report.format, report, options)
        if prompt is None:
            continue
        key = tuple((m["role"], m["content"]) for m in prompt)
        if key in seen:  # the online methods sample each prompt alike: a repeat adds nothing
            report.skip(DUPLICATE_PROMPT, loc)
            continue
        seen.add(key)
        prompts.append(prompt)
        if tokenizer is not None and max_prompt_length is not None:
            report.tokenized += 1
            if len(encode_prompt(tokenizer, prompt)) > max_prompt_length:
                report.truncate(loc, prompt=True, response=False)
    report.kept = report.train = len(prompts)
    if not prompts:
        raise DataError(f"{path}: no usable prompts.\n{report.summary()}")
    return prompts, report
