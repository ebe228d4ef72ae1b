"""Statistics over every process's share of a rollout: sums, maxima and whitening.

Each process samples and scores only its share of the prompts; whatever must be a whole-rollout
number (a whitening μ and σ, the largest share, a logged mean) is reduced here. In a single
process each function returns its input's own statistic, so the code reads the same either way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over all processes (the values themselves in a single process)."""
    if not _distributed():
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(value: float) -> float:
    """The largest ``value`` over all processes (the largest share, the slowest time)."""
    if not _distributed():
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def whiten_over_processes(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """:func:`~alignkit.ops.masked_whiten` with μ and σ² (unbiased) over the masked elements of
    *every* process's share of the rollout: the whole-batch statistic, whatever the split.
    With fewer than two masked elements in all there is no variance: ``x`` is returned masked."""
    x64, m64 = x.double(), mask.double()
    n, total, squares = all_reduce_sum([float(m64.sum()), float((x64 * m64).sum()), float((x64**2 * m64).sum())])
    if n <= 1:
        return x * mask
    mean = total / n
    var = (squares - n * mean**2) / (n - 1)
    return (x - mean) * (1.0 / math.sqrt(max(var, 0.0) + eps)) * mask
