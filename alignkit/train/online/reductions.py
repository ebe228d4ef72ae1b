"""Loss reductions of the online methods: explicit, and invariant to how a minibatch is split.

The minibatch loss is Σ w·ℓ / (units of the whole minibatch): per-token losses ℓ (B, T) weighted by
w (B, T) and divided by the units of all its micro-batches on all processes (the engine's step
does the division), so splitting a minibatch over accumulation steps or processes changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor


def _token_weights(mask: Tensor) -> tuple[Tensor, Tensor]:
    return mask, mask.sum()


def _sequence_weights(mask: Tensor) -> tuple[Tensor, Tensor]:
    per_token = mask / mask.sum(dim=1, keepdim=True).clamp_min(1)  # (B, T): 1/|y_i| on sequence i's tokens
    return per_token, mask.new_tensor(float(mask.shape[0]))


#: name -> mask (B, T) -> (per-token weights w (B, T), number of units).
#: 'token': mean over all response tokens of the minibatch (PPO implementations, DAPO, Dr. GRPO);
#: 'sequence': mean over sequences of each one's token mean (GRPO, Shao et al. 2024, eq. 3).
LOSS_REDUCTIONS: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "token": _token_weights,
    "sequence": _sequence_weights,
}
