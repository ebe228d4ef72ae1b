"""Reading a reward model over many (prompt, response) sequences: each reward at its sequence's
last token only, a prompt that several responses share computed once where that is cheaper.

Scoring (``alignkit score``, reward models in PPO / GRPO / RLOO / rejection sampling, the RM
trainer's regression evaluation) needs one number per sequence: the scalar head at the last token
(:func:`alignkit.models.heads.sequence_rewards`, which also runs the last layer's MLP at that token
only). Two things make it cheaper than one padded forward per batch in file order:

* **length-sorted batches**: rows of similar length are batched together, so little padding is
  computed;
* **shared prompts**: GRPO and RLOO sample a group of G responses per prompt, rejection sampling N
  of them, and score files often rate several responses to one prompt. Responses to the same
  prompt (the same token ids after truncation) go in one row ``prompt ‖ y_1 ‖ … ‖ y_K``
  (:func:`alignkit.data.prefix_sharing.collate_prompt_groups`): the prompt is computed once, each
  response sees the prompt and itself, at the positions of its own sequence, so its reward is
  that of its own sequence (tested against ``AutoModelForSequenceClassification`` on each sequence
  alone, tests/test_rm_fast.py).

A shared row is not always cheaper: the attention runs over the whole row under its mask
(``T²`` query-key pairs), so K long responses to a short prompt cost more in one row than apart.
:func:`plan_rows` adds a response to its prompt's row only while the estimated FLOPs of the row
(``2·N·T`` for the matmuls, ``4·L·d·T²`` for the attention, N matmul weights, L layers, d the
attention width) stay below those of scoring it alone. Sharing is used only where the model's
family and attention implementation are served exactly with the 4-D mask
(:func:`alignkit.models.masks.batching_refusal`); elsewhere (encoders, flash-attention, unknown
families) every sequence is its own padded row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from alignkit.data.collate import collate_rated
from alignkit.data.prefix_sharing import collate_prompt_groups
from alignkit.models.heads import sequence_rewards
from alignkit.models.masks import batching_refusal


def row_costs(head) -> tuple[float, float]:
    """(FLOPs per token, FLOPs per attended query-key pair) of one forward of ``head``: 2 per
    weight of every matrix a token is multiplied by (``nn.Linear`` and GPT-2's ``Conv1D``; not
    the embedding lookups), and 4·L·d per pair (scores and weighted values, L layers of width d)."""
    from alignkit.train.flops import attention_shape

    weights = sum(p.numel() for m in head.modules() if not isinstance(m, torch.nn.Embedding)
                  for p in m.parameters(recurse=False) if p.dim() == 2)
    layers, width = attention_shape(head)
    return 2.0 * weights, 4.0 * layers * width


def plan_rows(items: Sequence[dict], per_token: float, per_pair: float,
              max_responses: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Rows to score ``items`` (``prompt_ids``, ``response_ids``) in: ``(prompt_ids, [item index, …])``
    each, every item in exactly one row. Items with the same prompt ids share a row while that
    is estimated cheaper than scoring the item alone (module docstring), and at most
    ``max_responses`` to a row (a forward's batch size: a group of 64 samples is not one row)."""

    def cost(T: int) -> float:
        return per_token * T + per_pair * T * T

    groups: dict[tuple[int, ...], list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(tuple(it["prompt_ids"]), []).append(i)
    rows = []
    for prompt, members in groups.items():
        P = len(prompt)
        members = sorted(members, key=lambda i: len(items[i]["response_ids"]))  # short ones pack best
        row, T = [], P
        for i in members:
            n = len(items[i]["response_ids"])
            full = max_responses is not None and len(row) >= max_responses
            if row and (full or cost(T + n) > cost(T) + cost(P + n)):
                rows.append((list(prompt), row))
                row, T = [], P
            row.append(i)
            T += n
        rows.append((list(prompt), row))
    return rows


@torch.no_grad()
def score_sequences(head, items: Sequence[dict], pad_id: int, batch_size: int = 32,
                    share_prompts: bool | None = None) -> Tensor:
    """Reward of each item (``prompt_ids``, ``response_ids``) under the scalar head ``head``
    (a :class:`~alignkit.models.heads.ScalarHead`), ``(N,)`` float32 on the CPU, in the order of
    ``items``. About ``batch_size`` sequences go through the model per forward pass.

    ``share_prompts``: None (default) shares prompts where the model is served exactly and some
    prompt repeats; False never; True requires it (refused, with the reason, where not exact)."""
    n = len(items)
    out = torch.empty(n)
    if n == 0:
        return out
    device = next(head.parameters()).device
    refusal = batching_refusal("prefix_shared", getattr(head, "model", head))
    repeats = len({tuple(it["prompt_ids"]) for it in items}) < n
    if refusal is None and any(not it["prompt_ids"] for it in items):
        refusal = "a sequence has no prompt token to share"
    if share_prompts and refusal is not None:
        raise ValueError(f"share_prompts=True cannot be served: {refusal}")
    if share_prompts is None:
        share_prompts = refusal is None and repeats
    if not share_prompts:  # one padded row per sequence, similar lengths together
        order = sorted(range(n), key=lambda i: len(items[i]["prompt_ids"]) + len(items[i]["response_ids"]))
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate_rated([items[i] for i in idx], pad_id).items()
                     if torch.is_tensor(v)}
            out[idx] = sequence_rewards(head, batch).float().cpu()
        return out
    rows = plan_rows(items, *row_costs(head), max_responses=batch_size)
    rows.sort(key=lambda r: len(r[0]) + sum(len(items[i]["response_ids"]) for i in r[1]))
    start = 0
    while start < len(rows):
        stop, count = start, 0
        while stop < len(rows) and (count == 0 or count + len(rows[stop][1]) <= batch_size):
            count += len(rows[stop][1])
            stop += 1
        chunk = rows[start:stop]
        batch = collate_prompt_groups([(p, [items[i]["response_ids"] for i in idx]) for p, idx in chunk], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        rewards = sequence_rewards(head, batch, ends=batch["last_index"]).float().cpu()  # (S,) in row order
        out[[i for _, idx in chunk for i in idx]] = rewards
        start = stop
    return out
