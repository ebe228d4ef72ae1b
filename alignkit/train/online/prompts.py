"""The prompts of an online run and which of them each rollout samples."""

from __future__ import annotations

import random

from alignkit.config import DataConfig

Messages = list[dict]


def load_prompts(data: DataConfig, seed: int = 0, tokenizer=None) -> list[Messages]:
    """The distinct prompts of ``data.path``, in file order; any format with a prompt will do
    (prompt-only, SFT, pairwise, HH, ranked, ratings, unpaired): only the prompts are used."""
    from alignkit.train.common import prepare_prompts

    return prepare_prompts(data, tokenizer)  # prints the read/kept/skipped/truncated report


def rollout_prompt_indices(n_prompts: int, per_rollout: int, seed: int, k: int) -> list[int]:
    """Prompt indices of rollout ``k``: consecutive slices of a stream of shuffled epochs.

    A pure function of (seed, k), so a resumed run draws the same prompts.
    """
    out: list[int] = []
    pos = k * per_rollout
    while len(out) < per_rollout:
        epoch, i = divmod(pos, n_prompts)
        order = list(range(n_prompts))
        random.Random(seed * 100_003 + epoch).shuffle(order)
        take = order[i : i + per_rollout - len(out)]
        out += take
        pos += len(take)
    return out
