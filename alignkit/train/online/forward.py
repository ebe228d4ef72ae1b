"""Forward passes over a rollout batch: the policy's log-probs of the sampled tokens.

The log-probs (and the entropy, where logged) are read at the response positions only, through
:func:`alignkit.models.heads.position_logps`: from the last hidden states through the output head
in chunks (no ``(B, P+T, V)`` logits), or from the model's logits where the head cannot be split
off or ``run.logps_path=full`` (:mod:`alignkit.models.output_head` says which and why). Both
give the same numbers and gradients up to float rounding (tests/test_online_logps.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from alignkit.models.heads import position_logps
from alignkit.ops import masked_sum
from alignkit.rollout.batch import RolloutBatch


def response_slice(x: Tensor, batch: RolloutBatch) -> Tensor:
    """Columns of a (B, P+T, ...) model output that predict / evaluate the response: (B, T, ...).

    Position P−1+t sees x and a_<t, i.e. the state s_t, and predicts a_t.
    """
    P, T = batch.prompt_width, batch.response_ids.shape[1]
    return x[:, P - 1 : P - 1 + T]


class PolicyForward(NamedTuple):
    """What :func:`policy_forward` returns."""

    logps: Tensor
    """(B, T) log π(a_t|s_t) at the sampling temperature, 0 outside ``response_mask``."""
    entropy: Tensor | None
    """(B, T) H(π(·|s_t)) at the sampling temperature, 0 outside the mask, detached (a logged metric); None unless asked for."""
    output: object
    """The model's own output (PPO's ``values`` ride on it; its ``logits`` are ``(B, 0, V)`` on the chunked path)."""


def policy_forward(model, batch: RolloutBatch, temperature: float, entropy: bool = False, **kwargs) -> PolicyForward:
    """One forward of ``model`` over [x | y]: log π(a_t|s_t) of the sampled tokens under the
    distribution they were drawn from (the logits divided by the sampling ``temperature``; 0,
    greedy, reads the undivided distribution), and its entropy if ``entropy`` (detached: the online
    losses only log it, so the full path keeps no ``(N, V)`` softmax for a backward pass)."""
    B, L = batch.input_ids.shape
    rows, cols = batch.response_mask.bool().nonzero(as_tuple=True)  # (N,) each: the response tokens that count
    index = rows * L + batch.prompt_width - 1 + cols  # (N,) flat into the (B·L) positions; P−1+t predicts a_t
    tau = temperature if temperature > 0 else 1.0
    out = position_logps(model, batch.model_inputs(), index, batch.response_ids[rows, cols], temperature=tau,
                         entropy=entropy, entropy_grad=False, **kwargs)
    shape = batch.response_ids.shape  # (B, T)
    logps = out.logps.new_zeros(shape).index_put((rows, cols), out.logps)  # (B, T)
    ent = None if out.entropy is None else out.entropy.new_zeros(shape).index_put((rows, cols), out.entropy)
    return PolicyForward(logps, ent, out.output)


@torch.no_grad()
def rollout_logps(model, batch: RolloutBatch, temperature: float, batch_size: int, **kwargs) -> tuple[Tensor, list]:
    """log π(a_t|s_t) for a whole rollout in forward batches of ``batch_size``: ((B, T), outputs)."""
    logps, outs = [], []
    for start in range(0, len(batch), batch_size):
        mb = batch.select(slice(start, start + batch_size))
        lp, _, out = policy_forward(model, mb, temperature, **kwargs)
        logps.append(lp.float())
        outs.append(out)
    return torch.cat(logps), outs


def sequence_kl(kl: Tensor, mask: Tensor) -> Tensor:
    """(B,) Σ_t KL_t over each response: the sequence-level KL the logs and controllers use."""
    return masked_sum(kl, mask, dim=1)
