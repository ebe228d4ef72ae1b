"""Deterministic batch order: length buckets, groups kept together, resumable by position.

The order of one epoch is a pure function of ``(seed, epoch)``, so resuming needs only the number
of batches already consumed, and every process computes the same global order and takes its own
slice of each global micro-batch (each example is seen once per epoch across processes).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

#: Examples per bucket = this × the global micro-batch size. Sorting inside a bucket makes
#: batches of similar lengths (little padding) while keeping the order random across buckets.
BUCKET_FACTOR = 32


def make_units(n_items: int, groups: Sequence[int] | None) -> list[list[int]]:
    """Atomic units of sampling: single items, or all items sharing a group id (>= 0)."""
    if groups is None:
        return [[i] for i in range(n_items)]
    units: list[list[int]] = []
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        if g < 0:
            units.append([i])
        elif g in by_group:
            by_group[g].append(i)
        else:
            by_group[g] = [i]
            units.append(by_group[g])
    return units


def epoch_batches(
    units: list[list[int]],
    lengths: Sequence[int],
    global_batch: int,
    seed: int,
    epoch: int,
    bucket: bool = True,
) -> list[list[list[int]]]:
    """The global batches (one per optimizer step) of one epoch, each a list of up to
    ``global_batch`` units, units inside a batch sorted by length.

    The composition of a step depends only on ``global_batch``, not on how it is later split
    into micro-batches and processes, so 8 × 1 and 2 × 4 accumulation see the same examples.
    With ``bucket``, units of similar length share a batch (little padding).
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(units)))
    rng.shuffle(order)
    unit_len = [max(lengths[i] for i in u) for u in units]
    if bucket:
        size = global_batch * BUCKET_FACTOR
        buckets = [order[i : i + size] for i in range(0, len(order), size)]
        order = [u for b in buckets for u in sorted(b, key=lambda u: unit_len[u])]
    batches = [order[i : i + global_batch] for i in range(0, len(order), global_batch)]
    if bucket:
        # Keep a short last batch last; shuffle the rest so long and short batches alternate.
        head, tail = (batches[:-1], batches[-1:]) if len(batches[-1]) < global_batch else (batches, [])
        rng.shuffle(head)
        batches = head + tail
    return [[units[u] for u in sorted(b, key=lambda u: unit_len[u])] for b in batches]


def split_batch(batch: list[list[int]], grad_accum: int, rank: int, world_size: int) -> list[list[int]]:
    """This process's micro-batches (item indices) of one global batch.

    The batch is cut into ``grad_accum`` consecutive chunks and each chunk into ``world_size``
    contiguous, near-equal shares. A share may be empty when the last batch of an epoch is short.
    """
    out = []
    n = len(batch)
    for j in range(grad_accum):
        chunk = batch[j * n // grad_accum : (j + 1) * n // grad_accum]
        m = len(chunk)
        share = chunk[rank * m // world_size : (rank + 1) * m // world_size]
        out.append([i for unit in share for i in unit])
    return out
