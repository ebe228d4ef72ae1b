"""Non-finite numbers (NaN, ±inf): the one error type and the check both training and sampling use.

A diverged run (a learning rate far too high, a data row with a score of 1e39, an fp16
overflow) shows up as a non-finite loss, gradient norm, weight or logit. The engine skips such an
update and stops after a run of them (:class:`alignkit.train.engine.Engine`); the generator refuses
to sample from non-finite logits (:mod:`alignkit.rollout.generate`). Both raise
:class:`NonFiniteError` with a message that names the cause and the fix. Nothing here imports the
rest of alignkit, so rollout code can use it without importing the training machinery.
"""

from __future__ import annotations

import torch


class NonFiniteError(RuntimeError):
    """Training or sampling met non-finite numbers; the message says where and what to change."""


#: What usually makes a run diverge, and what to change: the tail of every NonFiniteError.
FIXES = ("lower optim.lr, look for extreme numbers in the data (scores, margins), or train in fp32 "
         "(run.mixed_precision=no)")


def nonfinite_tensors(module: torch.nn.Module) -> list[str]:
    """Names of ``module``'s floating-point parameters and buffers holding a NaN or an inf."""
    named = list(module.named_parameters()) + list(module.named_buffers())
    return [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def describe(names: list[str], limit: int = 3) -> str:
    """``a, b, c and 4 more``: a short list of tensor names for a message."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
