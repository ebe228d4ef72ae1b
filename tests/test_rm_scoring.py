"""Reward-model scoring on the fast path, against a plain per-example Hugging Face forward.

* ``score`` / :class:`~alignkit.rollout.rewards.RewardModel` (what ppo, grpo, rloo, rs and
  ``alignkit score`` read, through :func:`alignkit.models.scoring.score_sequences`): responses to
  the same prompt in one row with the prompt computed once,
  rows in length order, the head read at each sequence's last token only; an encoder, which cannot
  share a prompt, on padded rows. Each score equals ``AutoModelForSequenceClassification`` on that
  conversation alone, in the input order, on five decoder families and BERT.
* ``eval-rm`` (:func:`~alignkit.train.rm.score_pairs` under every batching): the same on those
  families.
* Centring: the mean training reward comes from the training forward passes; ``alignkit rm``
  runs no forward pass of its own after training.

Float64 models, so "equal" is 1e-6.
"""

from __future__ import annotations

import pytest
import torch

from alignkit.data import RatedExample, tokenize_records
from alignkit.models.factory import TINY_FAMILY_SHAPES, tiny_family_model
from alignkit.models.heads import ScalarHead
from alignkit.models.scoring import row_costs, plan_rows
from alignkit.rollout.rewards import RewardModel

DECODERS = ["llama", "gpt2", "opt", "gpt_neox", "phi3"]


def _prompt(text):
    return [{"role": "user", "content": text}]


#: Three prompts with 3, 1 and 2 responses (a pair row, a lone row, a pair), interleaved.
ROWS = [(_prompt("What is the colour of item 3?"), "It is red."),
        (_prompt("Count to five."), "1 2 3 4 5"),
        (_prompt("What is the colour of item 3?"), "Blue, I think, but I am not sure at all."),
        (_prompt("Tell me about the fox."), "The quick brown fox jumps over the lazy dog."),
        (_prompt("What is the colour of item 3?"), "I don't know."),
        (_prompt("Tell me about the fox."), "No.")]


def _head(family, tokenizer):
    model = tiny_family_model(family, tokenizer, head="scalar", seed=1).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # rewards of a few units, so a misread token shows
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype) * 0.1)
    return model


def _items(tokenizer):
    records = [RatedExample(prompt=p, response=r, score=0.0) for p, r in ROWS]
    items, _ = tokenize_records(records, tokenizer, max_length=256, max_prompt_length=128)
    assert len(items) == len(ROWS)
    return items


def _alone(model, ids):
    """The reward of one unpadded conversation, as plain transformers computes it."""
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


@pytest.mark.parametrize("family", DECODERS + ["bert"])
def test_score_equals_one_plain_forward_per_conversation(family, tiny_tokenizer, monkeypatch):
    import alignkit.models.scoring as scoring

    model = _head(family, tiny_tokenizer)
    items = _items(tiny_tokenizer)
    want = torch.tensor([_alone(model, it["prompt_ids"] + it["response_ids"]) for it in items])
    shared = []
    real = scoring.collate_prompt_groups
    monkeypatch.setattr(scoring, "collate_prompt_groups", lambda *a, **k: shared.append(1) or real(*a, **k))
    got = RewardModel(ScalarHead(model), tiny_tokenizer, batch_size=4)([p for p, _ in ROWS], [r for _, r in ROWS])
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=0)
    # decoders share each prompt (a refused encoder takes padded rows)
    assert bool(shared) == (family != "bert")


def test_responses_to_one_prompt_share_one_row(tiny_tokenizer):
    """The rows score_sequences makes here: each prompt once, with all its responses."""
    items = _items(tiny_tokenizer)
    rows = plan_rows(items, *row_costs(ScalarHead(_head("llama", tiny_tokenizer))))
    assert sorted(sorted(idx) for _, idx in rows) == [[0, 2, 4], [1], [3, 5]]
    for prompt, idx in rows:
        assert all(items[i]["prompt_ids"] == prompt for i in idx)
    # the shared rows hold fewer tokens than one row per conversation
    shared = sum(len(p) + sum(len(items[i]["response_ids"]) for i in idx) for p, idx in rows)
    assert shared < sum(len(it["prompt_ids"]) + len(it["response_ids"]) for it in items)


def test_score_without_a_shared_prompt_reads_padded_rows_in_the_input_order(tiny_tokenizer):
    model = _head("llama", tiny_tokenizer)
    rows = ROWS[:2] + ROWS[3:4]  # three different prompts, not in length order
    items = [it for k, it in enumerate(_items(tiny_tokenizer)) if k in (0, 1, 3)]
    want = torch.tensor([_alone(model, it["prompt_ids"] + it["response_ids"]) for it in items])
    got = RewardModel(ScalarHead(model), tiny_tokenizer, batch_size=2)([p for p, _ in rows], [r for _, r in rows])
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=0)
    assert RewardModel(ScalarHead(model), tiny_tokenizer)([], []).shape == (0,)


@pytest.mark.parametrize("family", DECODERS)
def test_eval_rm_scores_equal_one_plain_forward_per_sequence(family, tiny_tokenizer):
    from alignkit.data import PreferencePair
    from alignkit.train.rm import score_pairs, scoring_batching

    model = _head(family, tiny_tokenizer)
    head = ScalarHead(model)
    pairs = [PreferencePair(prompt=ROWS[a][0], chosen=ROWS[a][1], rejected=ROWS[b][1]) for a, b in [(0, 2), (3, 5), (2, 4)]]
    pairs.append(PreferencePair(prompt=ROWS[1][0], chosen=ROWS[1][1], rejected="One two."))
    items, _ = tokenize_records(pairs, tiny_tokenizer, max_length=256, max_prompt_length=128)
    want_c = torch.tensor([_alone(model, it["prompt_ids"] + it["chosen_ids"]) for it in items])
    want_r = torch.tensor([_alone(model, it["prompt_ids"] + it["rejected_ids"]) for it in items])
    assert scoring_batching(model) == "prefix_shared"  # eval-rm's default on these families
    for batching in ("prefix_shared", "padded", "padding_free"):
        c, r = score_pairs(head, items, tiny_tokenizer.pad_token_id, batch_size=3, batching=batching)
        torch.testing.assert_close(c, want_c.float(), atol=1e-6, rtol=0)
        torch.testing.assert_close(r, want_r.float(), atol=1e-6, rtol=0)


def test_rm_centring_reads_the_training_forwards_only(tiny_dir, tmp_path, monkeypatch):
    """The mean training reward (alignkit_reward_mean) is the mean of what the training forward
    passes computed; no pass over the data follows training."""
    import json

    from alignkit.config import ModelConfig, OptimConfig, RunConfig
    from alignkit.models import heads
    from alignkit.train.rm import RMConfig, run_rm
    from conftest import write_jsonl

    calls, rewards = [], []
    real = heads.ScalarHead.forward

    def counted(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(torch.is_grad_enabled())
        rewards.append(out.detach().double())
        return out

    monkeypatch.setattr(heads.ScalarHead, "forward", counted)
    rows = [{"prompt": f"What colour is item {i}?", "chosen": f"The colour of item {i} is red.",
             "rejected": "No. Go away."} for i in range(8)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = RMConfig(model=ModelConfig(path=str(tiny_dir)), optim=OptimConfig(batch_size=4, max_steps=2),
                   run=RunConfig(output_dir=str(tmp_path / "rm"), progress=False, report_to="jsonl"))
    cfg.data.path = str(data)
    run_rm(cfg)
    assert calls == [True, True]  # the two training steps, nothing after
    saved = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert saved["alignkit_reward_mean"] == pytest.approx(float(torch.cat(rewards).mean()), abs=1e-6)


def test_every_family_here_has_a_tiny_shape():
    assert set(DECODERS + ["bert"]) <= set(TINY_FAMILY_SHAPES)
