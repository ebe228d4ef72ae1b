"""Prefix-shared and padding-free log-probs equal the plain padded computation (to 1e-5)."""

from __future__ import annotations

import pytest
import torch

from alignkit.data import PreferencePair, collate_pairs, load_dataset_records, tokenize_records
from alignkit.data.prefix_sharing import collate_prefix_shared, response_logps
from alignkit.train.dpo import BATCHINGS

from conftest import HH_SAMPLE


def _pair(turns: list[str], chosen: str, rejected: str) -> PreferencePair:
    roles = ["user", "assistant"]
    prompt = [{"role": roles[k % 2], "content": t} for k, t in enumerate(turns)]
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected)


PAIRS = [
    # multi-turn prompts, and responses of very different lengths (on both sides)
    _pair(["What is 2 plus 3?", "5.", "Capital of France?"], "Paris.",
          "The capital of France is Paris, and the quick brown fox jumps over the lazy dog."),
    _pair(["Tell me something rude."], "I'm sorry, I can't help with that. A good answer is helpful, honest and harmless.", "No."),
    _pair(["Hi", "Hello!", "What colour is item 3?", "Red.", "Are you sure?"], "Yes, item 3 is red.", "Blue"),
    _pair(["How do I kill a stuck process?"], "Use the kill command with its PID.", "I don't know the answer to that question."),
]


@pytest.fixture(scope="module")
def model(tiny_dir):
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm

    return load_causal_lm(ModelConfig(path=str(tiny_dir))).eval()


@pytest.fixture(scope="module")
def model64(model):
    """float64 copy: the layouts must agree to 1e-5 absolute on summed log-probs, which float32
    cannot resolve for sums near -100 (1 ulp = 7.6e-6), so the exactness check runs in float64
    and the float32 check allows 1 ulp relative."""
    import copy

    return copy.deepcopy(model).double()


TOL = {torch.float64: dict(atol=1e-5, rtol=0), torch.float32: dict(atol=1e-5, rtol=2e-7)}


@pytest.fixture(scope="module")
def items(tiny_tokenizer):
    out, _ = tokenize_records(PAIRS, tiny_tokenizer, max_length=64)
    return out


def _separate_logps(model, items) -> torch.Tensor:
    """The naive reference: each response in its own unpadded forward pass, (2B,)."""
    out = []
    for side in ("chosen_ids", "rejected_ids"):
        for it in items:
            ids = torch.tensor([it["prompt_ids"] + it[side]])
            P = len(it["prompt_ids"])
            logits = model(input_ids=ids).logits[0, :-1]  # (L-1, V): position t predicts t+1
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
            out.append(lp[P - 1 :].sum())  # response tokens only
    return torch.stack(out)


def test_items_are_multi_turn_with_very_different_lengths(items):
    lens = [(len(it["chosen_ids"]), len(it["rejected_ids"])) for it in items]
    assert any(c >= 3 * r for c, r in lens) and any(r >= 3 * c for c, r in lens)
    assert max(len(it["prompt_ids"]) for it in items) > 2 * min(len(it["prompt_ids"]) for it in items)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(BATCHINGS) + ["prefix_shared_packed"])
def test_every_batching_matches_separate_forward_passes(model, model64, items, tiny_tokenizer, name, dtype):
    model = model64 if dtype == torch.float64 else model
    expected = _separate_logps(model, items)
    with torch.no_grad():
        if name == "prefix_shared_packed":
            batch = collate_prefix_shared(items, tiny_tokenizer.pad_token_id, packed=True)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"]).logits
            logps, counts = response_logps(out, batch)
        else:
            b = BATCHINGS[name]
            logps, counts = b.logps(model, b.collate(items, tiny_tokenizer.pad_token_id))
    assert logps.dtype == dtype
    torch.testing.assert_close(logps, expected, **TOL[dtype])
    with torch.no_grad():  # and the plain padded computation directly
        padded, _ = BATCHINGS["padded"].logps(model, collate_pairs(items, tiny_tokenizer.pad_token_id))
    torch.testing.assert_close(logps, padded, **TOL[dtype])
    want = [len(it["chosen_ids"]) for it in items] + [len(it["rejected_ids"]) for it in items]
    assert counts.tolist() == want


def test_batch_of_one(model64, items, tiny_tokenizer):
    model = model64
    expected = _separate_logps(model, items)
    with torch.no_grad():
        for k in range(len(items)):  # each pair alone, chosen then rejected
            b = collate_prefix_shared(items[k : k + 1], tiny_tokenizer.pad_token_id)
            logps, _ = response_logps(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                            position_ids=b["position_ids"]).logits, b)
            torch.testing.assert_close(logps, expected[[k, len(items) + k]], atol=1e-5, rtol=0)


def test_gradients_match_padded(model, items, tiny_tokenizer):
    """The padding rows of prefix-shared batches must not poison the backward pass."""
    def grads(name):
        model.zero_grad()
        b = BATCHINGS[name]
        logps, _ = b.logps(model, b.collate(items, tiny_tokenizer.pad_token_id))
        (logps * torch.linspace(-1, 1, logps.shape[0])).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    ref = grads("padded")
    for name in ("padding_free", "prefix_shared"):
        g = grads(name)
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, ref, atol=1e-4, rtol=1e-4)
    model.zero_grad()


def test_mask_and_positions_of_one_pair():
    it = {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12], "margin": 0.0, "weight": 1.0, "group": -1}
    short = {**it, "chosen_ids": [8], "rejected_ids": [10]}
    b = collate_prefix_shared([it, short], pad_token_id=0)
    assert b["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]  # rejected continues from the prompt end
    m = b["attention_mask"][0, 0].int()
    assert m.tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],  # chosen sees the prompt and itself
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0],  # rejected sees the prompt, never the chosen tokens
        [1, 1, 1, 0, 0, 1, 1, 0],
        [1, 1, 1, 0, 0, 1, 1, 1],
    ]
    # The short pair's row is padded; padding attends to itself only (no empty attention row).
    m1 = b["attention_mask"][1, 0]
    assert m1.sum(-1).min() >= 1 and m1[5:, 5:].int().tolist() == torch.eye(3, dtype=torch.int).tolist()
    # first chosen and first rejected tokens are both predicted by the last prompt token (index 2)
    T = b["input_ids"].shape[1]
    assert b["logit_index"].tolist() == [2, 3, T + 2, 2, 5, 6, T + 2]
    assert b["target_ids"].tolist() == [8, 9, 8, 10, 11, 12, 10]
    assert b["target_seq"].tolist() == [0, 0, 1, 2, 2, 2, 3]
    # packed: one row, block diagonal across pairs
    p = collate_prefix_shared([it, short], pad_token_id=0, packed=True)
    assert p["input_ids"].shape == (1, 8 + 5) and not p["attention_mask"][0, 0, 8:, :8].any()
    assert p["position_ids"][0, 8:].tolist() == [0, 1, 2, 3, 3]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hh_rlhf_pairs(model, model64, tiny_tokenizer, dtype):
    """Real multi-turn HH-RLHF pairs (truncated to 64 tokens, keeping the latest turns)."""
    model = model64 if dtype == torch.float64 else model
    records, _, _ = load_dataset_records(HH_SAMPLE, limit=6, shuffle=False)
    hh, _ = tokenize_records(records, tiny_tokenizer, max_length=64, max_prompt_length=40)
    expected = _separate_logps(model, hh)
    with torch.no_grad():
        for name in BATCHINGS:
            b = BATCHINGS[name]
            logps, _ = b.logps(model, b.collate(hh, tiny_tokenizer.pad_token_id))
            torch.testing.assert_close(logps, expected, **TOL[dtype])


def test_last_index_reads_each_sequence_where_its_own_padded_row_would():
    from alignkit.data.prefix_sharing import collate_prefix_shared

    items = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10], "margin": 0.0, "weight": 1.0, "group": -1},
             {"prompt_ids": [5, 6], "chosen_ids": [8], "rejected_ids": [], "margin": 0.0, "weight": 1.0, "group": -1}]
    for packed in (False, True):
        batch = collate_prefix_shared(items, 0, packed=packed)
        flat = batch["input_ids"].flatten()
        # the last token of prompt ‖ response; an empty response: the prompt's last token
        assert flat[batch["last_index"]].tolist() == [9, 8, 10, 6], packed
        positions = batch["position_ids"].flatten()[batch["last_index"]]
        assert positions.tolist() == [4, 2, 3, 1], packed
