"""Forward passes over a rollout batch: the policy's log-probs of the sampled tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from alignkit.ops import masked_sum, token_logps
from alignkit.rollout.batch import RolloutBatch


def response_slice(x: Tensor, batch: RolloutBatch) -> Tensor:
    """Columns of a (B, P+T, ...) model output that predict / evaluate the response: (B, T, ...).

    Position P−1+t sees x and a_<t, i.e. the state s_t, and predicts a_t.
    """
    P, T = batch.prompt_width, batch.response_ids.shape[1]
    return x[:, P - 1 : P - 1 + T]


def policy_forward(model, batch: RolloutBatch, temperature: float, **kwargs):
    """One forward of ``model`` over [x | y]: (response logits (B, T, V) divided by the sampling
    temperature, log π(a_t|s_t) (B, T) zero outside the mask, the raw model output)."""
    out = model(**batch.model_inputs(), use_cache=False, **kwargs)
    logits = response_slice(out.logits, batch)  # (B, T, V)
    if temperature > 0:  # the distribution the tokens were sampled from
        logits = logits / temperature
    logps = token_logps(logits, batch.response_ids) * batch.response_mask
    return logits, logps, out


@torch.no_grad()
def rollout_logps(model, batch: RolloutBatch, temperature: float, batch_size: int, **kwargs) -> tuple[Tensor, list]:
    """log π(a_t|s_t) for a whole rollout in forward batches of ``batch_size``: ((B, T), outputs)."""
    logps, outs = [], []
    for start in range(0, len(batch), batch_size):
        mb = batch.select(slice(start, start + batch_size))
        _, lp, out = policy_forward(model, mb, temperature, **kwargs)
        logps.append(lp.float())
        outs.append(out)
    return torch.cat(logps), outs


def sequence_kl(kl: Tensor, mask: Tensor) -> Tensor:
    """(B,) Σ_t KL_t over each response: the sequence-level KL the logs and controllers use."""
    return masked_sum(kl, mask, dim=1)
