"""Tokenised items -> torch batches: right-padded batches, and padding-free packed rows.

Padded batches (shapes as in docs/CONTRACTS.md): ``input_ids``/``attention_mask``/``labels`` are
``(B, T)``, right padded with ``pad_token_id``; ``labels`` is -100 on prompt and padding, so a
label marks exactly the response tokens (EOS included). Every padded batch also carries
``prompt_lengths`` (per sequence) for trainers that need the boundary.

Packed rows put several sequences in one row ``(1, N)`` with no padding. Attention must not cross
sequences: the row carries ``position_ids`` restarting at 0 per sequence and NO attention mask,
the way transformers trains on packed rows. Given ``position_ids`` and no mask, transformers
finds the sequences from the restarts and builds the block-diagonal causal mask in the form its
attention implementation takes (bool for sdpa, additive float for eager, ``cu_seqlens`` for
flash-attention), sliding windows included; :func:`alignkit.models.masks.attention_inputs` builds
it for the few families whose masks ignore position ids (OPT), and the batching check refuses the
rest (docs/batching.md). No N×N mask is held. The label at each sequence start is -100, so no
token learns to predict the next sequence's first token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from alignkit.data.tokenize import IGNORE_INDEX


def _pad(
    sequences: Sequence[list[int]], prompt_lengths: Sequence[int], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad ``prompt + response`` sequences; labels keep only the response tokens."""
    B, T = len(sequences), max(len(s) for s in sequences)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for i, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
        ids = torch.tensor(seq, dtype=torch.long)
        input_ids[i, : len(seq)] = ids
        attention_mask[i, : len(seq)] = 1
        labels[i, p : len(seq)] = ids[p:]
    return {
        "input_ids": input_ids,  # (B, T)
        "attention_mask": attention_mask,  # (B, T) 1 = real token
        "labels": labels,  # (B, T) -100 on prompt and padding
        "prompt_lengths": torch.tensor(list(prompt_lengths), dtype=torch.long),  # (B,)
    }


def pad_sequences(sequences: Sequence[list[int]], prompt_lengths: Sequence[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``prompt + response`` token lists into ``input_ids``/``attention_mask``/``labels``
    ``(B, T)``; labels keep the tokens after each prompt length (evaluation helpers use this)."""
    return _pad(sequences, prompt_lengths, pad_token_id)


def _check(items: Sequence[dict]) -> None:
    if not items:
        raise ValueError("cannot collate an empty batch")


def collate_sft(items: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """SFT items -> ``input_ids``, ``attention_mask``, ``labels`` ``(B, T)``."""
    _check(items)
    prompt_lengths = [  # the leading -100 labels
        next((i for i, x in enumerate(it["labels"]) if x != IGNORE_INDEX), len(it["labels"]))
        for it in items
    ]
    batch = _pad([it["input_ids"] for it in items], prompt_lengths, pad_token_id)
    # Labels come from the item (not re-derived) so any mask the item carries is kept.
    for i, it in enumerate(items):
        batch["labels"][i, : len(it["labels"])] = torch.tensor(it["labels"], dtype=torch.long)
    return batch


def collate_pairs(items: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pair items -> one ``(2B, T)`` batch: rows ``0..B-1`` chosen, rows ``B..2B-1`` rejected.

    One forward pass scores both sides; ``margin``, ``weight``, ``group`` are ``(B,)`` and
    ``prompt_lengths`` is ``(2B,)`` like the sequences.
    """
    _check(items)
    chosen = [it["prompt_ids"] + it["chosen_ids"] for it in items]
    rejected = [it["prompt_ids"] + it["rejected_ids"] for it in items]
    prompt_lengths = [len(it["prompt_ids"]) for it in items] * 2
    batch = _pad(chosen + rejected, prompt_lengths, pad_token_id)  # (2B, T)
    batch["margin"] = torch.tensor([it["margin"] for it in items], dtype=torch.float)  # (B,)
    batch["weight"] = torch.tensor([it["weight"] for it in items], dtype=torch.float)  # (B,)
    batch["group"] = torch.tensor([it["group"] for it in items], dtype=torch.long)  # (B,)
    return batch


def collate_unpaired(items: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """KTO items -> ``(B, T)`` batch plus ``label (B,)`` bool (True = desirable)."""
    _check(items)
    batch = _pad(
        [it["prompt_ids"] + it["completion_ids"] for it in items],
        [len(it["prompt_ids"]) for it in items],
        pad_token_id,
    )
    batch["label"] = torch.tensor([it["label"] for it in items], dtype=torch.bool)  # (B,)
    return batch


def collate_rated(items: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rated items -> ``(B, T)`` batch plus ``score (B,)``."""
    _check(items)
    batch = _pad(
        [it["prompt_ids"] + it["response_ids"] for it in items],
        [len(it["prompt_ids"]) for it in items],
        pad_token_id,
    )
    batch["score"] = torch.tensor([it["score"] for it in items], dtype=torch.float)  # (B,)
    return batch


# ---------------------------------------------------------------------------------------------
# Packing


def _pack(sequences: Sequence[list[int]], labels: Sequence[list[int]]) -> dict[str, torch.Tensor]:
    """Concatenate sequences into one row; position ids restart at 0 at each sequence start."""
    lens = torch.tensor([len(s) for s in sequences], dtype=torch.long)  # (S,)
    starts = torch.cumsum(lens, 0) - lens  # (S,) offset of each sequence in the row
    N = int(lens.sum())
    input_ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long)  # (N,)
    row_labels = torch.tensor([t for s in labels for t in s], dtype=torch.long)  # (N,)
    row_labels[starts] = IGNORE_INDEX  # never learn to predict across a sequence boundary
    seq_id = torch.repeat_interleave(torch.arange(len(sequences)), lens)  # (N,)
    position_ids = torch.arange(N) - starts[seq_id]  # (N,) 0.. within each sequence: the boundaries
    return {
        "input_ids": input_ids[None],  # (1, N)
        "position_ids": position_ids[None],  # (1, N)
        "labels": row_labels[None],  # (1, N)
        "seq_starts": starts,  # (S,)
        "seq_lens": lens,  # (S,)
    }


def pack_sft(items: Sequence[dict], max_tokens: int) -> list[dict[str, torch.Tensor]]:
    """Greedily pack SFT items, in order, into rows of at most ``max_tokens`` tokens.

    Order is kept (a row closes when the next item does not fit) so data order, and therefore
    resumption, is deterministic. An item longer than ``max_tokens`` is an error: truncate it
    with ``max_length`` when tokenising.
    """
    _check(items)
    rows, current, used = [], [], 0
    for it in items:
        n = len(it["input_ids"])
        if n > max_tokens:
            raise ValueError(
                f"an SFT item has {n} tokens, more than max_tokens={max_tokens}; "
                "tokenise with max_length <= max_tokens"
            )
        if current and used + n > max_tokens:
            rows.append(current)
            current, used = [], 0
        current.append(it)
        used += n
    rows.append(current)
    return [_pack([c["input_ids"] for c in row], [c["labels"] for c in row]) for row in rows]


def pack_pairs(items: Sequence[dict]) -> dict[str, torch.Tensor]:
    """All pairs in one padding-free row: the B chosen sequences then the B rejected ones.

    The sequence order matches :func:`collate_pairs`, so per-sequence results line up the same
    way. Besides the packed tensors it returns, per sequence ``(2B,)``: ``seq_starts``,
    ``seq_lens``, ``prompt_lengths``, ``last_index`` (the last token, for a reward model),
    ``seq_pair`` (which pair) and ``seq_is_chosen``; and per pair ``(B,)``: ``margin``,
    ``weight``, ``group``. Sum log-probs of sequence s over labels in
    ``[seq_starts[s], seq_starts[s] + seq_lens[s])``.
    """
    _check(items)
    B = len(items)
    sequences, labels = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for it in items:
            p = it["prompt_ids"]
            sequences.append(p + it[side])
            labels.append([IGNORE_INDEX] * len(p) + it[side])
    row = _pack(sequences, labels)
    row["prompt_lengths"] = torch.tensor([len(it["prompt_ids"]) for it in items] * 2)  # (2B,)
    row["last_index"] = row["seq_starts"] + row["seq_lens"] - 1  # (2B,)
    row["seq_pair"] = torch.arange(B).repeat(2)  # (2B,)
    row["seq_is_chosen"] = torch.arange(2 * B) < B  # (2B,)
    row["margin"] = torch.tensor([it["margin"] for it in items], dtype=torch.float)  # (B,)
    row["weight"] = torch.tensor([it["weight"] for it in items], dtype=torch.float)  # (B,)
    row["group"] = torch.tensor([it["group"] for it in items], dtype=torch.long)  # (B,)
    return row
