"""The rollout batch: sampled responses as tensors, and everything the online losses need.

Layout of one row (B rows, P prompt columns, T response columns)::

    input_ids      [ pad pad x_1 … x_p | a_0 a_1 … a_EOS pad pad ]
                     <—— left padded P ——> <—— right padded T ———>

Left-padded prompts line every response up at column P, so the model's logits for the response
tokens are one slice ``logits[:, P-1 : P+T-1]`` for the whole batch (position P-1+t predicts
a_t), and ``response_*`` tensors are plain (B, T) arrays whose column t is step t of every
episode. ``position_ids`` count from the first real prompt token, exactly as ``generate`` did,
so recomputed log-probs match the sampling distribution.

The mask is the single source of truth for what reaches a loss: ``response_mask`` is 1 on the
response tokens up to and including the first stop token (the chat template's end of turn or EOS,
called EOS below), and 0 on padding and on anything a backend returned after it. Those positions are also replaced by padding in ``input_ids`` and excluded
from ``attention_mask``, so they affect neither a loss nor (through attention) a kept position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from alignkit.rollout.generate import Generations


@dataclass
class RolloutBatch:
    """B sampled episodes (prompt x, response y = a_0 … a_{T-1}) and their per-token quantities.

    The first block is filled by :func:`build_rollout_batch`; the trainers fill the rest.
    Per-token tensors are 0 where ``response_mask`` is 0.
    """

    input_ids: Tensor  # (B, P+T) [x | y] token ids, prompt left padded, response right padded
    attention_mask: Tensor  # (B, P+T) 1 on real prompt tokens and on response tokens up to EOS
    position_ids: Tensor  # (B, P+T) position of each token counted from the first real prompt token
    response_ids: Tensor  # (B, T) a_t, the sampled tokens (pad after the end)
    response_mask: Tensor  # (B, T) m_t: 1 on a_0 … a_EOS (EOS included), 0 on padding and after EOS
    finished: Tensor  # (B,) bool: the response ended with EOS before max_new_tokens
    prompt_index: Tensor  # (B,) index of the sample's prompt in the rollout's prompt list
    logps: Tensor | None = None  # (B, T) log π_old(a_t|s_t), the policy that sampled
    ref_logps: Tensor | None = None  # (B, T) log π_ref(a_t|s_t)
    values: Tensor | None = None  # (B, T) V_old(s_t), the critic at sampling time (PPO)
    scores: Tensor | None = None  # (B,) r(x, y): the sequence score the objective maximises
    rewards: Tensor | None = None  # (B, T) r_t = −β·KL_t + [t = last]·r(x, y) (PPO)
    advantages: Tensor | None = None  # (B, T) Â_t (PPO), or (B,) one per sequence (GRPO/RLOO)
    returns: Tensor | None = None  # (B, T) R_t = Â_t + V_old(s_t), the value targets (PPO)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def prompt_width(self) -> int:
        """P: columns of (left-padded) prompt before the first response column."""
        return self.input_ids.shape[1] - self.response_ids.shape[1]

    @property
    def response_lengths(self) -> Tensor:
        """(B,) |y|: response tokens that count, EOS included."""
        return self.response_mask.sum(dim=1)

    def model_inputs(self) -> dict[str, Tensor]:
        """Keyword arguments for a causal LM (or value model) forward over [x | y]."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}

    def select(self, index: Tensor | list[int] | slice) -> RolloutBatch:
        """The sub-batch of rows ``index`` (every tensor field sliced along dim 0)."""
        if isinstance(index, list):
            index = torch.tensor(index, dtype=torch.long)
        return dataclasses.replace(self, **{
            f.name: (v[index] if isinstance(v, Tensor) else v)
            for f in dataclasses.fields(self)
            if (v := getattr(self, f.name)) is not None
        })

    def to(self, device) -> RolloutBatch:
        return dataclasses.replace(self, **{
            f.name: v.to(device) for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), Tensor)
        })


def response_mask_from_ids(response_ids: Tensor, lengths: Tensor, eos_id: int | Sequence[int]) -> Tensor:
    """(B, T) 1 on tokens up to and including the first EOS of each row, within ``lengths``;
    ``eos_id`` may be several stop ids (the end of turn and EOS).

    ``lengths`` (B,) is how many tokens the backend returned per row; anything past it (padding)
    and anything after the first EOS is masked out.
    """
    B, T = response_ids.shape
    positions = torch.arange(T).expand(B, T)  # (B, T)
    within = positions < lengths[:, None]
    is_eos = torch.isin(response_ids, _ids(eos_id)) & within
    # first EOS index per row (T when there is none): argmax of a bool finds the first True
    first_eos = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1), torch.full((B,), T))
    return (positions <= first_eos[:, None]) & within


def _ids(stop: int | Sequence[int]) -> Tensor:
    return torch.tensor([stop] if isinstance(stop, int) else list(stop), dtype=torch.long)


def build_rollout_batch(gens: Generations, pad_id: int, eos_id: int | Sequence[int]) -> RolloutBatch:
    """Tensors of a :class:`RolloutBatch` from a generator's output (lists of token ids).
    ``eos_id``: the stop token id(s), :func:`alignkit.data.tokenize.stop_token_ids`.

    The response width T is the longest kept response (through its first EOS), so padding
    columns that no row uses are never created.
    """
    B = len(gens.response_ids)
    if B == 0:
        raise ValueError("no generations to build a rollout batch from")
    lengths = torch.tensor([len(r) for r in gens.response_ids])
    T_raw = max(1, int(lengths.max()))
    raw = torch.full((B, T_raw), pad_id, dtype=torch.long)
    for i, r in enumerate(gens.response_ids):
        raw[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    mask = response_mask_from_ids(raw, lengths, eos_id)  # (B, T_raw)
    T = max(1, int(mask.sum(dim=1).max()))
    response_mask = mask[:, :T]
    response_ids = raw[:, :T].masked_fill(~response_mask, pad_id)  # (B, T) tokens after EOS -> pad

    P = max(len(p) for p in gens.prompt_ids)
    prompt_ids = torch.full((B, P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((B, P), dtype=torch.bool)
    for i, p in enumerate(gens.prompt_ids):
        prompt_ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)  # left padding
        prompt_mask[i, P - len(p) :] = True

    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P+T)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()  # (B, P+T)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)  # as generate() derives them
    # A row "finished" iff its kept tokens end with EOS (whatever the backend reported).
    last = response_ids.gather(1, (response_mask.sum(1) - 1).clamp_min(0)[:, None]).squeeze(1)  # (B,)
    finished = torch.isin(last, _ids(eos_id)) & response_mask.any(dim=1)
    prompt_index = torch.tensor(gens.prompt_index if gens.prompt_index else list(range(B)), dtype=torch.long)
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        response_ids=response_ids,
        response_mask=response_mask.float(),
        finished=finished,
        prompt_index=prompt_index,
    )
