"""Collation and packing: shapes, label masks, and packed log-probs equal to padded ones."""

from __future__ import annotations

import pytest
import torch

from alignkit.data import (
    IGNORE_INDEX,
    PreferencePair,
    RatedExample,
    SFTExample,
    UnpairedExample,
    chat_format,
    collate_pairs,
    collate_rated,
    collate_sft,
    collate_unpaired,
    pack_pairs,
    pack_sft,
    tokenize_records,
)
from alignkit.models.factory import DEFAULT_CORPUS, tiny_llama, train_tokenizer
from alignkit.models.heads import lm_forward
from alignkit.models.masks import packed_visibility

USER = lambda text: {"role": "user", "content": text}  # noqa: E731
PROMPTS = ["What is the capital of France?", "Hi", "Tell me something rude, please, right now.", "2 plus 3?"]
ANSWERS = ["The capital of France is Paris.", "Hello!", "I'm sorry, I can't help with that.", "5"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(DEFAULT_CORPUS, vocab_size=512)


@pytest.fixture(scope="module")
def model(tok):
    m = tiny_llama(tok)
    m.eval()
    return m


@pytest.fixture(scope="module")
def sft_items(tok):
    return tokenize_records([SFTExample([USER(p)], a) for p, a in zip(PROMPTS, ANSWERS)], tok)[0]


@pytest.fixture(scope="module")
def pair_items(tok):
    records = [
        PreferencePair([USER(p)], a, ANSWERS[(i + 1) % 4] + " Anyway.", margin=float(i), weight=1 / (i + 1))
        for i, (p, a) in enumerate(zip(PROMPTS, ANSWERS))
    ]
    return tokenize_records(records, tok)[0]


def test_collate_sft_pads_right_and_masks_prompt_and_padding(tok, sft_items):
    batch = collate_sft(sft_items, tok.pad_token_id)
    B, T = len(sft_items), max(len(i["input_ids"]) for i in sft_items)
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (B, T), "attention_mask": (B, T), "labels": (B, T), "prompt_lengths": (B,)
    }
    for row, item in enumerate(sft_items):
        n, p = len(item["input_ids"]), int(batch["prompt_lengths"][row])
        assert batch["input_ids"][row, :n].tolist() == item["input_ids"]
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (T - n)
        assert batch["labels"][row].tolist() == item["labels"] + [IGNORE_INDEX] * (T - n)
        assert (batch["labels"][row, :p] == IGNORE_INDEX).all() and batch["labels"][row, p] != IGNORE_INDEX
        # the labels end with the template's end of turn (EOS here) and the trailer it renders after it
        fmt = chat_format(tok)
        tail = tok(fmt.trailer, add_special_tokens=False)["input_ids"]
        assert batch["labels"][row, n - len(tail) - 1 : n].tolist() == [fmt.end_of_turn_id] + tail


def test_collate_pairs_chosen_block_then_rejected_block(tok, pair_items):
    batch = collate_pairs(pair_items, tok.pad_token_id)
    B = len(pair_items)
    T = max(len(i["prompt_ids"]) + max(len(i["chosen_ids"]), len(i["rejected_ids"])) for i in pair_items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2 * B, T)
    assert batch["margin"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert batch["weight"].tolist() == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])
    assert batch["group"].tolist() == [-1] * B and batch["prompt_lengths"].shape == (2 * B,)
    for i, item in enumerate(pair_items):
        for row, side in ((i, "chosen_ids"), (B + i, "rejected_ids")):
            seq = item["prompt_ids"] + item[side]
            p = len(item["prompt_ids"])
            assert batch["input_ids"][row, : len(seq)].tolist() == seq
            assert batch["labels"][row].tolist() == [IGNORE_INDEX] * p + item[side] + [IGNORE_INDEX] * (T - len(seq))
            assert int(batch["attention_mask"][row].sum()) == len(seq)


def test_collate_unpaired_and_rated(tok):
    records = [UnpairedExample([USER("a b c")], "yes", True), UnpairedExample([USER("a")], "no no no no", False)]
    items = tokenize_records(records, tok)[0]
    batch = collate_unpaired(items, tok.pad_token_id)
    assert batch["label"].dtype == torch.bool and batch["label"].tolist() == [True, False]
    assert batch["input_ids"].shape == (2, max(i["length"] for i in items))
    p0 = len(items[0]["prompt_ids"])
    assert (batch["labels"][0, :p0] == IGNORE_INDEX).all()
    assert batch["labels"][0, p0 : items[0]["length"]].tolist() == items[0]["completion_ids"]

    rated = tokenize_records([RatedExample([USER("a")], "b", 2.5), RatedExample([USER("c d")], "e", -1.0)], tok)[0]
    batch = collate_rated(rated, tok.pad_token_id)
    assert batch["score"].tolist() == [2.5, -1.0] and batch["input_ids"].shape[0] == 2
    assert batch["attention_mask"].sum(1).tolist() == [i["length"] for i in rated]


def test_pack_sft_rows_masks_positions_and_labels(sft_items):
    lengths = [len(i["input_ids"]) for i in sft_items]
    max_tokens = max(lengths) + 1
    assert lengths[0] + lengths[1] <= max_tokens < lengths[0] + lengths[1] + lengths[2]
    rows = pack_sft(sft_items, max_tokens)
    # Greedy in order: a row closes when the next item does not fit.
    expected, current = [], []
    for n in lengths:
        if current and sum(current) + n > max_tokens:
            expected.append(current)
            current = []
        current.append(n)
    expected.append(current)
    assert [r["seq_lens"].tolist() for r in rows] == expected and len(expected[0]) == 2
    assert all(r["input_ids"].shape[1] <= max_tokens for r in rows)
    assert torch.cat([r["input_ids"][0] for r in rows]).tolist() == [t for i in sft_items for t in i["input_ids"]]

    row = rows[0]
    assert "attention_mask" not in row  # the restarting position ids mark the sequences (no N×N mask held)
    a, b = lengths[0], lengths[1]
    assert row["position_ids"][0].tolist() == list(range(a)) + list(range(b))
    mask = packed_visibility(row["position_ids"])[0, 0]  # what a model is made to attend
    assert mask[:a, :a].equal(torch.ones(a, a, dtype=torch.bool).tril())
    assert mask[a:, a:].equal(torch.ones(b, b, dtype=torch.bool).tril())
    assert not mask[a:, :a].any() and not mask[:a, a:].any()  # no attention across sequences
    assert row["labels"][0].tolist() == sft_items[0]["labels"] + sft_items[1]["labels"]
    assert row["labels"][0, a] == IGNORE_INDEX  # a sequence start is never a target
    with pytest.raises(ValueError, match="more than max_tokens=5"):
        pack_sft(sft_items, 5)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V), (B, T) -> (B, T) log p(label_t | tokens < t), 0 where the label is -100."""
    logps = logits[:, :-1].log_softmax(-1)  # (B, T-1, V) predicts tokens 1..T-1
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    gathered = logps.gather(-1, targets.clamp(min=0)[..., None])[..., 0]  # (B, T-1)
    return torch.nn.functional.pad(gathered * mask, (1, 0))  # (B, T) aligned with labels


@torch.no_grad()
def test_packed_sft_logps_equal_padded(model, tok, sft_items):
    padded = collate_sft(sft_items, tok.pad_token_id)
    ref = token_logps(model(padded["input_ids"], attention_mask=padded["attention_mask"]).logits, padded["labels"])
    (row,) = pack_sft(sft_items, max_tokens=10_000)
    out = lm_forward(model, row)
    packed = token_logps(out.logits, row["labels"])[0]  # (N,)
    for s, (start, n) in enumerate(zip(row["seq_starts"].tolist(), row["seq_lens"].tolist())):
        assert packed[start : start + n].shape == ref[s, :n].shape
        torch.testing.assert_close(packed[start : start + n], ref[s, :n], atol=1e-5, rtol=0)
        assert ref[s, :n].abs().sum() > 0  # the comparison covers real response tokens


@torch.no_grad()
def test_packed_pairs_logps_and_last_tokens_equal_padded(model, tok, pair_items):
    padded = collate_pairs(pair_items, tok.pad_token_id)
    out = model(padded["input_ids"], attention_mask=padded["attention_mask"], output_hidden_states=True)
    ref_logps = token_logps(out.logits, padded["labels"]).sum(-1)  # (2B,) log π(response | prompt)
    ref_last = out.hidden_states[-1][torch.arange(8), padded["attention_mask"].sum(1) - 1]  # (2B, H)

    row = pack_pairs(pair_items)
    B = len(pair_items)
    assert row["seq_pair"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert row["seq_is_chosen"].tolist() == [True] * B + [False] * B
    assert row["margin"].tolist() == padded["margin"].tolist() and row["weight"].shape == (B,)
    assert row["seq_lens"].tolist() == padded["attention_mask"].sum(1).tolist()
    assert row["input_ids"].shape[1] == int(padded["attention_mask"].sum())  # no padding at all

    # no cache: transformers finds packed sequences from position ids only without one
    out = model(row["input_ids"], position_ids=row["position_ids"], use_cache=False, output_hidden_states=True)
    per_token = token_logps(out.logits, row["labels"])[0]  # (N,)
    seq_logps = torch.stack([per_token[s : s + n].sum() for s, n in zip(row["seq_starts"], row["seq_lens"])])
    torch.testing.assert_close(seq_logps, ref_logps, atol=1e-5, rtol=0)
    last = out.hidden_states[-1][0, row["last_index"]]  # (2B, H): what a reward head reads
    torch.testing.assert_close(last, ref_last, atol=1e-5, rtol=0)
