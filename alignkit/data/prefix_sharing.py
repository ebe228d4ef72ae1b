"""Prefix sharing: a pair's prompt is computed once and both responses are scored against it
(DPO-family log-probs, and reward models through ``last_index``).

A pair becomes ONE sequence ``prompt ‖ chosen ‖ rejected`` instead of two sequences
``prompt ‖ chosen`` and ``prompt ‖ rejected``. On multi-turn data (HH-RLHF) the prompt is most of
the tokens, so this nearly halves the work of a DPO step. Two things make it exact:

* **Attention mask.** Causal, except that rejected tokens may not see chosen tokens::

                 keys →   prompt   chosen   rejected
      queries  prompt     causal     ·         ·
               chosen      all     causal      ·
               rejected    all        ·      causal

* **Position ids.** The rejected response continues from the end of the prompt, as it would in
  its own sequence: ``0 … P−1 | P … P+C−1 | P … P+R−1``.

With both, every response token sees exactly the context and positions it has in the separate
computation, so its logits are the same up to float rounding (tested to 1e-5 on every family
accepted, tests/test_conformance.py). The batch holds the mask as bool (True = may attend); it is
the layout, not what the model is given: :func:`alignkit.models.masks.attention_inputs` turns it
into the model's attention implementation's form (additive float for eager, which would ADD a
bool mask, i.e. mask nothing) and applies the model's sliding windows (counted in position ids,
per layer type where layers alternate). Flash-attention takes no such mask: refused there.

Log-probs cannot come from the usual "position t predicts token t+1" shift, because the first
rejected token is predicted by the LAST PROMPT TOKEN (row index P−1), not by the token before it
in the row (the chosen EOS). So the batch carries, for every response token, the flat index of
the position whose logits predict it (``logit_index``), the token (``target_ids``) and which
sequence it belongs to (``target_seq``). DPO reads the log-probs at those positions only
(:func:`alignkit.models.heads.position_logps`) and :func:`response_sums` sums them per response;
:func:`response_logps` does both from a model's full logits.

Layouts (both give the same log-probs):

* ``packed=False``: one pair per row, rows right padded: ``(B, T)`` with a ``(B, 1, T, T)``
  mask. Padding positions attend only to themselves, so no attention row is empty (an all-masked
  row gives NaN in some kernels, and NaN times a zero gradient is still NaN).
* ``packed=True``: all pairs in one padding-free row ``(1, N)`` with a ``(1, 1, N, N)`` mask
  that is also block diagonal across pairs.

Sequence order everywhere matches :func:`alignkit.data.collate_pairs`: the B chosen responses,
then the B rejected ones (sequence index ``s`` in ``[0, 2B)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from alignkit.ops import token_logps

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1
"""Branch of each token: the prompt is shared, the two responses are separate branches."""


def _segment(item: dict) -> tuple[list[int], list[int], list[int]]:
    """Token ids, position ids and branch ids of one pair's ``prompt ‖ chosen ‖ rejected``."""
    p, c, r = item["prompt_ids"], item["chosen_ids"], item["rejected_ids"]
    P, C, R = len(p), len(c), len(r)
    if P < 1:
        raise ValueError("prefix sharing needs a prompt of at least one token (it predicts the first response token)")
    ids = p + c + r
    positions = list(range(P + C)) + list(range(P, P + R))  # rejected restarts where the prompt ends
    branch = [PROMPT] * P + [CHOSEN] * C + [REJECTED] * R
    return ids, positions, branch


def _targets(P: int, C: int, R: int, offset: int) -> tuple[list[int], list[int]]:
    """Row indices (from ``offset``, the segment's start) of the positions predicting each chosen
    and each rejected token. Token k of a response is predicted by the position before it,
    except the first one of each response: the last prompt token predicts it."""
    last_prompt = offset + P - 1
    chosen = ([last_prompt] + [offset + P + k - 1 for k in range(1, C)]) if C else []
    rejected = ([last_prompt] + [offset + P + C + k - 1 for k in range(1, R)]) if R else []
    return chosen, rejected


def _mask(segment: Tensor, branch: Tensor) -> Tensor:
    """(N, N) bool, True = query i may attend to key j: same pair, causal in row order, and the
    key is in the prompt or in the query's own branch. Padding attends to itself only."""
    N = segment.shape[0]
    causal = torch.ones((N, N), dtype=torch.bool).tril_()
    same_pair = segment[:, None] == segment[None, :]  # (N, N)
    visible_branch = (branch[None, :] == PROMPT) | (branch[None, :] == branch[:, None])  # (N, N)
    mask = causal & same_pair & visible_branch & (segment[:, None] != PAD)
    pad = (segment == PAD).nonzero().squeeze(1)  # (n_pad,)
    mask[pad, pad] = True  # each padding position sees itself
    return mask


def collate_prefix_shared(items: Sequence[dict], pad_token_id: int, packed: bool = False) -> dict[str, Tensor]:
    """Pair items -> one ``prompt ‖ chosen ‖ rejected`` sequence per pair.

    Returns (``R`` rows = B, or 1 when ``packed``; ``M`` = number of response tokens):

    * ``input_ids (R, T)``, ``position_ids (R, T)``, ``attention_mask (R, 1, T, T)`` bool;
    * ``logit_index (M,)``: flat index into the ``(R·T)`` positions of the logits that predict
      each response token; ``target_ids (M,)`` those tokens; ``target_seq (M,)`` their sequence
      (``s < B``: chosen of pair s; ``s ≥ B``: rejected of pair s − B);
    * ``last_index (2B,)``: flat index of each sequence's last token (where a reward model's
      scalar head is read), chosen block then rejected block;
    * per pair ``(B,)``: ``prompt_lengths``, ``chosen_lengths``, ``rejected_lengths``,
      ``margin``, ``weight``, ``group``; ``num_tokens`` (scalar): real tokens in the batch.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    B = len(items)
    segments = [_segment(it) for it in items]
    lengths = [len(s[0]) for s in segments]
    T = sum(lengths) if packed else max(lengths)
    rows = 1 if packed else B
    input_ids = torch.full((rows, T), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((rows, T), dtype=torch.long)
    segment_id = torch.full((rows, T), PAD, dtype=torch.long)  # which pair a position holds
    branch = torch.full((rows, T), PAD, dtype=torch.long)
    logit_index: list[list[int]] = [[] for _ in range(2 * B)]  # per sequence s, flat indices
    last_index = [0] * (2 * B)  # per sequence s, flat index of its last token (reward models read it)
    offset = 0
    for i, (it, (ids, pos, br)) in enumerate(zip(items, segments)):
        row, start = (0, offset) if packed else (i, 0)
        n = len(ids)
        input_ids[row, start : start + n] = torch.tensor(ids)
        position_ids[row, start : start + n] = torch.tensor(pos)
        segment_id[row, start : start + n] = i
        branch[row, start : start + n] = torch.tensor(br)
        chosen, rejected = _targets(len(it["prompt_ids"]), len(it["chosen_ids"]), len(it["rejected_ids"]), start)
        logit_index[i] = [row * T + j for j in chosen]
        logit_index[B + i] = [row * T + j for j in rejected]
        P, C, R = len(it["prompt_ids"]), len(it["chosen_ids"]), len(it["rejected_ids"])
        # an empty response is read at the prompt's last token, as in its own padded row
        last_index[i] = row * T + start + P + C - 1
        last_index[B + i] = row * T + (start + n - 1 if R else start + P - 1)
        offset += n
    targets = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]  # (2B,) lists
    mask = torch.stack([_mask(segment_id[r], branch[r]) for r in range(rows)])  # (R, T, T)
    return {
        "input_ids": input_ids,  # (R, T)
        "position_ids": position_ids,  # (R, T)
        "attention_mask": mask[:, None],  # (R, 1, T, T) bool, True = may attend
        "logit_index": torch.tensor([j for idx in logit_index for j in idx], dtype=torch.long),  # (M,)
        "target_ids": torch.tensor([t for seq in targets for t in seq], dtype=torch.long),  # (M,)
        "last_index": torch.tensor(last_index, dtype=torch.long),  # (2B,)
        "target_seq": torch.repeat_interleave(
            torch.arange(2 * B), torch.tensor([len(seq) for seq in targets])
        ),  # (M,)
        "prompt_lengths": torch.tensor([len(it["prompt_ids"]) for it in items]),  # (B,)
        "chosen_lengths": torch.tensor([len(it["chosen_ids"]) for it in items]),  # (B,)
        "rejected_lengths": torch.tensor([len(it["rejected_ids"]) for it in items]),  # (B,)
        "margin": torch.tensor([it["margin"] for it in items], dtype=torch.float),  # (B,)
        "weight": torch.tensor([it["weight"] for it in items], dtype=torch.float),  # (B,)
        "group": torch.tensor([it["group"] for it in items], dtype=torch.long),  # (B,)
        "num_tokens": torch.tensor(sum(lengths)),  # real (non-padding) tokens
    }


def collate_prompt_groups(groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                          pad_token_id: int) -> dict[str, Tensor]:
    """Responses that share a prompt -> one row ``prompt ‖ y_1 ‖ … ‖ y_K`` per group, for reading
    a reward model at each response's last token (:func:`alignkit.models.heads.sequence_rewards`
    with ``ends=last_index``).

    The pair layout above with K branches instead of two: response k sees the prompt and itself
    only, and its positions continue from the end of the prompt (``P … P+|y_k|−1``), so its last
    token has the context and position it has in its own sequence ``prompt ‖ y_k``. A group of
    one response is that sequence itself. Rows are right padded (padding attends to itself).

    Returns (``R`` = number of groups, ``S`` = number of responses, in group order):
    ``input_ids (R, T)``, ``position_ids (R, T)``, ``attention_mask (R, 1, T, T)`` bool (True =
    may attend), ``last_index (S,)`` the flat index into the ``(R·T)`` positions of each
    response's last token (an empty response: the prompt's last token, as in its own row), and
    ``num_tokens`` (scalar) the real tokens of the batch.
    """
    if not groups:
        raise ValueError("cannot collate an empty batch")
    lengths = [len(p) + sum(len(r) for r in rs) for p, rs in groups]
    R, T = len(groups), max(lengths)
    input_ids = torch.full((R, T), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((R, T), dtype=torch.long)
    segment = torch.full((R, T), PAD, dtype=torch.long)
    branch = torch.full((R, T), PAD, dtype=torch.long)
    last_index: list[int] = []
    for row, (prompt, responses) in enumerate(groups):
        P = len(prompt)
        if P < 1:
            raise ValueError("prefix sharing needs a prompt of at least one token")
        ids, pos, br = list(prompt), list(range(P)), [PROMPT] * P
        for k, response in enumerate(responses):
            n = len(response)
            last_index.append(row * T + (len(ids) + n - 1 if n else P - 1))
            ids += list(response)
            pos += range(P, P + n)  # every response restarts where the prompt ends
            br += [k + 1] * n  # branch k+1: sees the prompt and itself (PROMPT = 0, PAD = -1)
        input_ids[row, : len(ids)] = torch.tensor(ids)
        position_ids[row, : len(ids)] = torch.tensor(pos)
        segment[row, : len(ids)] = 0
        branch[row, : len(ids)] = torch.tensor(br)
    mask = torch.stack([_mask(segment[r], branch[r]) for r in range(R)])  # (R, T, T)
    return {
        "input_ids": input_ids,  # (R, T)
        "position_ids": position_ids,  # (R, T)
        "attention_mask": mask[:, None],  # (R, 1, T, T) bool
        "last_index": torch.tensor(last_index, dtype=torch.long),  # (S,)
        "num_tokens": torch.tensor(sum(lengths)),
    }


def response_logps(logits: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Sequence log-probs of the 2B responses of a prefix-shared batch, from the model's logits.

    Args:
        logits: ``(R, T, V)`` of the model run on ``input_ids`` with the batch's
            ``attention_mask`` and ``position_ids``.
        batch: from :func:`collate_prefix_shared`.

    Returns:
        ``(logps (2B,), counts (2B,))``: Σ_t log π(y_t | x, y_<t) of each response (chosen block
        then rejected block) and its number of tokens (float).
    """
    picked = logits.flatten(0, 1)[batch["logit_index"]]  # (M, V): the rows predicting each response token
    return response_sums(token_logps(picked[None], batch["target_ids"][None])[0], batch)


def response_sums(logps: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(logps (2B,), counts (2B,))`` of a prefix-shared batch from the log-probs ``(M,)`` of its
    response tokens (in ``target_ids`` order; e.g. read at ``logit_index`` by
    :func:`alignkit.models.heads.position_logps`)."""
    n_seq = 2 * batch["margin"].shape[0]
    seq = batch["target_seq"]
    sums = logps.new_zeros(n_seq).index_add(0, seq, logps)  # (2B,)
    counts = logps.new_zeros(n_seq).index_add(0, seq, torch.ones_like(logps))  # (2B,)
    return sums, counts
